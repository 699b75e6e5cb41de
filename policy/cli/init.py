"""`callpolicy init DIR`: the commented service.toml and the example rules (`policy.init`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented service.toml and the example rules into DIR."""
    from policy.init import InitError, write_examples

    target = Path(args.dir)
    try:
        written = write_examples(target, force=args.force)
    except InitError as exc:
        print(f"callpolicy: {exc}", file=sys.stderr)
        return 1
    for f in written:
        print(f"wrote {f}")
    cfg = target / "service.toml"
    print(f"next: callpolicy --config {cfg} check-rules\n      callpolicy --config {cfg} serve")
    return 0


def register(sub: Any) -> None:
    """Add `init`."""
    sp = sub.add_parser("init", help="write a commented service.toml and example rules into DIR")
    sp.add_argument("dir", help="where to write them (created if missing), e.g. /etc/callpolicy")
    sp.add_argument("--force", action="store_true", help="overwrite files that exist")
    sp.set_defaults(func=cmd_init)
