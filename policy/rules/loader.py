"""Reading rule files from disk: the only I/O of the rules package."""

from __future__ import annotations

from pathlib import Path

from policy.errors import RuleError
from policy.rules.compiler import compile_sources
from policy.rules.model import Ruleset


def toml_files(path: str | Path) -> list[Path]:
    """The rule files of a directory (every *.toml, in name order) or a single file."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.glob("*.toml") if f.is_file())
    return [p]


def rule_files(path: str | Path) -> list[Path]:
    """Every file the rules at `path` are made of (what a watcher stats to notice an edit)."""
    return toml_files(path)


def load_rules(path: str | Path) -> Ruleset:
    """Read and compile a rules directory or file; raises RuleError naming file, rule, key."""
    files = toml_files(path)
    if not files:
        raise RuleError(str(path), None, None, "no *.toml rule files")
    sources = []
    for f in files:
        try:
            sources.append((str(f), f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise RuleError(str(f), None, None, f"cannot read: {exc}") from None
    return compile_sources(sources)
