"""`callpolicy top`: a live terminal view of the running service, refreshed over the admin socket.

One `top` op per refresh (counters, dialogs, health and the profile keys nearest their caps,
computed by the service from its rules: `policy.caps`); rates are the difference between two
refreshes. Drawn with `rich` on the alternate screen; Ctrl-C leaves it. Without a terminal
(a pipe, a script) or with `--once` it prints one frame and exits, like `top -b -n 1`.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from policy.cli.connect import client, client_args, fail
from policy.cli.format import ago, span
from policy.client import Client

if TYPE_CHECKING:
    from rich.console import Group

CHECK_OUTCOMES = ("allow", "deny", "store_allow", "store_deny")


def _rate(now: dict[str, Any], prev: dict[str, Any] | None, get: Any) -> str:
    if prev is None:
        return "-"
    dt = now["time"] - prev["time"]
    if dt <= 0:
        return "-"
    return f"{(get(now) - get(prev)) / dt:.1f}"


def _checks(r: dict[str, Any]) -> int:
    return sum(int(r["decisions"].get(k, 0)) for k in CHECK_OUTCOMES)


def _latency(now: dict[str, Any], prev: dict[str, Any] | None) -> str:
    a = now["latency"]
    if prev is not None:
        b = prev["latency"]
        n, s = a["count"] - b["count"], a["sum"] - b["sum"]
    else:
        n, s = a["count"], a["sum"]
    return f"{s / n * 1e6:.0f} µs" if n > 0 else "-"


def render(r: dict[str, Any], prev: dict[str, Any] | None, where: str) -> Group:
    """One frame from a `top` reply (and the previous one, for rates)."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    now = r["time"]
    head = Text.assemble(("callpolicy top", "bold"), f"  {where}  rules {r['rules_version']} ({r['rules_loaded']} "
                         f"rules)  up {span(r['uptime'])}  {time.strftime('%H:%M:%S', time.localtime(now))}")

    d, dec = r["dialogs"], r["decisions"]
    counts = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    for col in ("checks/s", "allow/s", "deny/s", "shadow/s", "latency", "active", "early", "checks", "allow",
                "deny", "shadow", "store errors", "failed", "expired"):
        counts.add_column(col, justify="right")
    counts.add_row(
        _rate(r, prev, _checks), _rate(r, prev, lambda x: x["decisions"].get("allow", 0)),
        _rate(r, prev, lambda x: x["decisions"].get("deny", 0)), _rate(r, prev, lambda x: x["shadow"]),
        _latency(r, prev), str(d["active_dialogs"]), str(d["early_dialogs"]), str(_checks(r)),
        str(dec.get("allow", 0)), str(dec.get("deny", 0)), str(r["shadow"]),
        str(dec.get("store_allow", 0) + dec.get("store_deny", 0)), str(d["failed_dialogs"]),
        str(d["expired_dialogs"]))

    near = Table(title="nearest their caps", title_justify="left", box=None, header_style="bold", pad_edge=False)
    for col, just in (("PROFILE", "left"), ("VALUE", "left"), ("CALLS", "right"), ("", "left"), ("%", "right"),
                      ("RULE", "left")):
        near.add_column(col, justify=just)  # type: ignore[arg-type]
    for n in r["nearest"]:
        limit, size = n["limit"], n["size"]
        pct = f"{size * 100 / limit:.0f}" if limit else "-"
        style = "red" if size >= limit else ("yellow" if limit and size >= 0.8 * limit else "")
        near.add_row(n["profile"], "-" if n["value"] is None else n["value"], Text(f"{size}/{limit}", style=style),
                     ProgressBar(total=max(limit, 1), completed=min(size, max(limit, 1)), width=20), pct,
                     n["rule"] + (" (shadow)" if n.get("shadow") else ""))
    if not r["nearest"]:
        near.add_row("-", "no limited key holds a call", "", "", "", "")

    profiles = Table(title="profiles", title_justify="left", box=None, header_style="bold", pad_edge=False)
    for col in ("PROFILE", "CALLS", "CAP", "VALUES"):
        profiles.add_column(col, justify="left" if col == "PROFILE" else "right")
    for p in r["profiles"]:
        cap = str(p["limit"]) if "limit" in p else (f"{p['limit_each']} each" if "limit_each" in p else "-")
        profiles.add_row(p["profile"], str(p["size"]), cap, str(p.get("values", "-")))

    health = Table(title="health", title_justify="left", box=None, show_header=False, pad_edge=False)
    health.add_column(style="bold")
    health.add_column()
    info = r.get("store_info") or {}
    store = r["store"]
    if info.get("circuit"):
        store += f", circuit {info['circuit']}"
    health.add_row("store", store)
    notices = r.get("notices") or {}
    if notices.get("pending"):
        health.add_row("notices", f"{notices['pending']} waiting for the store")
    evapi = r.get("evapi")
    if evapi:
        for name, node in evapi.get("nodes", {}).items():
            state = f"connected {ago(node.get('since'), now)}" if node.get("connected") else \
                f"NOT connected ({node.get('last_error') or 'connecting'})"
            health.add_row(f"node {name}", state)
    rec = r.get("reconcile")
    if isinstance(rec, dict) and rec.get("runs") is not None:
        health.add_row("reconcile", f"{rec['runs']} runs, {rec.get('reconciled_released', 0)} released, "
                                    f"{rec.get('reconciled_added', 0)} added, {rec.get('errors', 0)} errors")
    if r.get("scan_truncated"):
        health.add_row("note", f"only the first {r['values_scanned']} values were looked at")
    return Group(head, Text(""), counts, Text(""), near, Text(""), profiles, Text(""), health)


def _fetch(c: Client, limit: int) -> dict[str, Any]:
    return c.request("top", limit=limit)


def cmd_top(args: argparse.Namespace) -> int:
    """The live view (Ctrl-C quits)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    c = client(args)
    try:
        r = _fetch(c, args.limit)
        if not r.get("ok"):
            return fail(r)
        if args.once or not console.is_terminal:
            console.print(render(r, None, c.where))
            return 0
        prev: dict[str, Any] | None = None
        shown = 0
        try:
            with Live(render(r, prev, c.where), console=console, screen=True, auto_refresh=False) as live:
                while True:
                    shown += 1
                    if args.iterations and shown >= args.iterations:
                        break
                    time.sleep(args.interval)
                    prev, r = r, _fetch(c, args.limit)
                    if not r.get("ok"):
                        break
                    live.update(render(r, prev, c.where), refresh=True)
        except KeyboardInterrupt:
            pass
        if not r.get("ok"):
            return fail(r)
        return 0
    finally:
        c.close()


def register(sub: Any) -> None:
    """Add `top`."""
    sp = sub.add_parser("top", help="live view: checks/s, decisions, the keys nearest their caps, health")
    sp.add_argument("--interval", "-n", type=float, default=1.0, help="seconds between refreshes (default 1)")
    sp.add_argument("--limit", type=int, default=15, help="how many keys nearest their caps (default 15, max 100)")
    sp.add_argument("--iterations", type=int, default=0, help="stop after this many refreshes (default: Ctrl-C)")
    sp.add_argument("--once", action="store_true", help="print one frame and exit")
    client_args(sp, json=False)
    sp.set_defaults(func=cmd_top)
