"""Output for people: aligned tables, human times, JSON, and a quiet exit on a closed pipe."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

#: The exit status of a command whose reader went away (`callpolicy stats | head -1`): like a
#: C tool killed by SIGPIPE (128 + 13), without its traceback.
EXIT_PIPE = 141


def span(seconds: float) -> str:
    """A duration for people: '42s', '3m07s', '11h59m', '2d03h'."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ago(ts: float | None, now: float) -> str:
    """'3m07s ago' for a past epoch time ('-' when there is none; 'now' within a second)."""
    if not ts:
        return "-"
    d = now - ts
    if abs(d) < 1:
        return "now"
    return f"{span(d)} ago" if d > 0 else f"in {span(d)}"


def until(ts: float | None, now: float) -> str:
    """'in 11h59m' for a future epoch time, 'expired 3s ago' for a past one."""
    if not ts:
        return "-"
    d = ts - now
    if abs(d) < 1:
        return "now"
    return f"in {span(d)}" if d > 0 else f"expired {span(d)} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: Any = None) -> None:
    """Print rows under headers in aligned columns (two spaces apart; the last one not padded)."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        line = "  ".join(c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r))
        out.write(line.rstrip() + "\n")


def print_json(data: Any) -> None:
    """The raw reply, indented (times stay epoch seconds)."""
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def closed_pipe() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null so the interpreter's final
    flush cannot fail again, and return the exit status."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE
