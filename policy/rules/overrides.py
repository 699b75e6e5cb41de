"""Overrides files: per-value caps a billing system rewrites (`limit.overrides_file`).

Two formats, by the file's extension:

- `.csv`: one `value,max` per line, UTF-8 (a leading BOM is ignored). Blank lines and lines
  whose first non-blank character is `#` are skipped. The first other line may be the header
  `value,max`. A value may be quoted (`"a,b",3`) but not span lines; it must not be empty or
  have spaces around it; max is a whole number >= 0. A value given twice is an error.
- `.toml`: `value = max` pairs at the top level (`acme = 3`, `"sip:x@y" = 5`).

Every error names the line (CSV) or the key (TOML). Pure: text in, dict out.
"""

from __future__ import annotations

import csv
import tomllib

MAX_COUNT_DIGITS = 18


class DataError(Exception):
    """A bad overrides file: `line` (1-based; None when not known) and what is wrong."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def parse_overrides(name: str, text: str) -> dict[str, tuple[int, int]]:
    """value -> (max, line) of an overrides file; the format follows the name's extension."""
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix == "csv":
        return parse_csv(text)
    if suffix == "toml":
        return parse_toml(text)
    raise DataError(None, "an overrides file must be a .csv or a .toml file")


def _count(raw: str, line: int) -> int:
    cap = raw.strip()
    if not cap or not cap.isdigit() or not cap.isascii():
        raise DataError(line, f"max must be a whole number >= 0, not {raw!r}")
    if len(cap) > MAX_COUNT_DIGITS:
        raise DataError(line, f"max {cap!r} is too large")
    return int(cap)


def parse_csv(text: str) -> dict[str, tuple[int, int]]:
    """value -> (max, line) of CSV text (see the module's doc for the format)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    out: dict[str, tuple[int, int]] = {}
    header_allowed = True
    for number, line in enumerate(text.split("\n"), 1):
        if line.endswith("\r"):
            line = line[:-1]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if '"' in line:
            try:
                fields = next(csv.reader([line], strict=True))
            except csv.Error as exc:
                raise DataError(number, f"bad CSV: {exc}") from None
        else:
            fields = line.split(",")
        if header_allowed:
            header_allowed = False
            if [f.strip().lower() for f in fields] == ["value", "max"]:
                continue
        if len(fields) != 2:
            raise DataError(number, f"expected 2 fields (value,max), not {len(fields)}")
        value, raw_cap = fields
        if not value:
            raise DataError(number, "the value is empty")
        if value != value.strip():
            raise DataError(number, f"value {value!r} has spaces around it")
        cap = _count(raw_cap, number)
        if value in out:
            raise DataError(number, f"value {value!r} is already on line {out[value][1]}")
        out[value] = (cap, number)
    return out


def parse_toml(text: str) -> dict[str, tuple[int, int]]:
    """value -> (max, 0) of a TOML file of `value = max` pairs."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DataError(None, f"invalid TOML: {exc}") from None
    except RecursionError:
        raise DataError(None, "invalid TOML: nested too deep") from None
    out: dict[str, tuple[int, int]] = {}
    for value, cap in doc.items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            shown = repr(cap) if isinstance(cap, int | float | str) else type(cap).__name__
            raise DataError(None, f"key {value!r}: max must be a whole number >= 0, not {shown}")
        out[value] = (cap, 0)
    return out
