"""`callpolicy init DIR`: a commented service.toml and the example rules, from the package.

The files ship inside the wheel (`policy/examples/`, identical to the repository's
`service.toml` and `rules/` - tests/test_install.py checks it), so
`pip install callpolicy && callpolicy init /etc/callpolicy` needs no checkout.
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable
from pathlib import Path


class InitError(Exception):
    """The target holds files `init` would overwrite."""


def examples() -> list[tuple[str, Traversable]]:
    """(relative path, packaged file) of every example file: service.toml and rules/*.toml."""
    root = resources.files("policy") / "examples"
    out = [("service.toml", root / "service.toml")]
    rules = root / "rules"
    out += sorted((f"rules/{f.name}", f) for f in rules.iterdir() if f.name.endswith(".toml"))
    return out


def write_examples(target: Path, force: bool = False) -> list[Path]:
    """Write the examples under `target` (created if missing); refuse to overwrite unless `force`."""
    files = examples()
    existing = [target / rel for rel, _src in files if (target / rel).exists()]
    if existing and not force:
        raise InitError("would overwrite " + ", ".join(str(p) for p in existing) + " (use --force)")
    written = []
    for rel, src in files:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        written.append(dest)
    return written
