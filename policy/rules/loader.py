"""Reading rule files from disk: the only I/O of the rules package."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from policy.errors import RuleError
from policy.rules.compiler import compile_sources
from policy.rules.model import Ruleset

# rule file -> (mtime_ns, size, overrides files it names): rule_files re-reads a file only
# when it changed, so a watcher polling every second does not parse the rules every second
_refs_cache: dict[str, tuple[int, int, tuple[Path, ...]]] = {}


def toml_files(path: str | Path) -> list[Path]:
    """The rule files of a directory (every *.toml, in name order) or a single file."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.glob("*.toml") if f.is_file())
    return [p]


def data_refs(doc: dict[str, Any]) -> list[str]:
    """The `limit.overrides_file` names of a parsed rule file, in order."""
    out = []
    rules = doc.get("rule")
    for rule in rules if isinstance(rules, list) else ():
        limit = rule.get("limit") if isinstance(rule, dict) else None
        ref = limit.get("overrides_file") if isinstance(limit, dict) else None
        if isinstance(ref, str) and ref and "\0" not in ref:
            out.append(ref)
    return out


def _data_files(f: Path) -> tuple[Path, ...]:
    try:
        st = f.stat()
    except OSError:
        return ()
    cached = _refs_cache.get(str(f))
    if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2]
    try:
        refs = tuple(f.parent / r for r in data_refs(tomllib.loads(f.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        refs = ()  # a broken file: the reload reports it; nothing more to watch in it
    _refs_cache[str(f)] = (st.st_mtime_ns, st.st_size, refs)
    return refs


def rule_files(path: str | Path) -> list[Path]:
    """Every file the rules at `path` are made of, for a watcher to stat: the rule files (every
    *.toml of a directory, in name order, or the single file), then the overrides files they
    name (`limit.overrides_file`, resolved against the rule file's directory; listed even when
    missing, so that creating one is noticed). Never raises: an unreadable directory has none."""
    try:
        files = toml_files(path)
    except OSError:
        return []
    out = list(files)
    seen = set(out)
    for f in files:
        for ref in _data_files(f):
            if ref not in seen:
                seen.add(ref)
                out.append(ref)
    return out


def load_rules(path: str | Path) -> Ruleset:
    """Read and compile a rules directory or file; raises RuleError naming file, rule, key."""
    try:
        files = toml_files(path)
    except OSError as exc:
        raise RuleError(str(path), None, None, f"cannot read: {exc}") from None
    if not files:
        raise RuleError(str(path), None, None, "no *.toml rule files")
    sources = []
    for f in files:
        try:
            sources.append((str(f), f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise RuleError(str(f), None, None, f"cannot read: {exc}") from None
    return compile_sources(sources)
