"""The admin commands, like `kamcmd dlg.*`: stats, profile, end, terminate, reload, ping, reconcile."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson

from policy.cli.connect import client, client_args, confirm, fail
from policy.cli.format import ago, print_json, span, table, until
from policy.client import Client
from policy.preview import Over, PreviewResult
from policy.store.base import MAX_PAGE


def _key(profile: str, value: str | None) -> str:
    return profile if value is None else f"{profile}={value}"


# -- stats ----------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    """Print dialog stats and decisions, like `kamcmd stats.get_statistics dialog:`."""
    with client(args) as c:
        r = c.request("stats")
    if not r.get("ok"):
        return fail(r)
    if args.json:
        print_json(r)
        return 0
    now = time.time()
    for k, v in r["dialogs"].items():
        print(f"dialog:{k} = {v}")
    for k, v in r["decisions"].items():
        print(f"decisions:{k} = {v}")
    for rule, outcomes in r["rules"].items():
        for outcome, n in outcomes.items():
            print(f"rule:{rule}:{outcome} = {n}")
    print(f"rules_version = {r['rules_version']} ({r['rules_loaded']} rules, "
          f"{r['reloads']} reloads, {r['reload_errors']} reload errors)")
    if r.get("last_reload_error"):
        print(f"last_reload_error = {r['last_reload_error']}")
    print(f"store = {r['store']}")
    if "uptime" in r:
        print(f"uptime = {span(r['uptime'])}")
    for name, node in (r.get("evapi") or {}).get("nodes", {}).items():
        state = f"connected since {ago(node.get('since'), now)}" if node.get("connected") else "not connected"
        err = f", last error: {node['last_error']}" if node.get("last_error") else ""
        print(f"evapi:{name} = {state}, {node.get('received', 0)} received, {node.get('replied', 0)} replied, "
              f"{node.get('connects', 0)} connects, {node.get('auth_failures', 0)} auth failures{err}")
    for key in ("connections", "reconcile", "radius"):
        if key in r:
            print(f"{key} = {orjson.dumps(r[key]).decode()}")
    return 0


# -- profile ----------------------------------------------------------------------------------


def _pages(c: Client, op: str, field: str, limit: int | None, **fields: Any) -> tuple[list[Any], dict[str, Any]]:
    """Every item of a paged listing (at most `limit`); (items, the first error reply or {})."""
    items: list[Any] = []
    cursor = ""
    while True:
        page = MAX_PAGE if limit is None else max(1, min(MAX_PAGE, limit - len(items)))
        r = c.request(op, cursor=cursor, limit=page, **fields)
        if not r.get("ok"):
            return items, r
        items += r[field]
        cursor = r.get("cursor") or ""
        if not cursor or (limit is not None and len(items) >= limit):
            return items[:limit] if limit is not None else items, {}


def cmd_profile(args: argparse.Namespace) -> int:
    """`profile size|list|values PROFILE [VALUE]`, like dlg.profile_get_size / dlg.profile_list /
    OpenSIPS profile_get_values."""
    if args.action == "values":
        return _profile_values(args)
    with client(args) as c:
        if args.action == "size":
            r = c.request("profile_size", profile=args.profile, value=args.value)
            if not r.get("ok"):
                return fail(r)
            if args.json:
                print_json(r)
            else:
                print(r["size"])
            return 0
        calls, err = _pages(c, "profile_list", "calls", args.limit, profile=args.profile, value=args.value)
    if err:
        return fail(err)
    if args.json:
        print_json({"ok": True, "profile": args.profile, "value": args.value, "calls": calls})
        return 0
    now = time.time()
    rows = []
    for call in calls:
        prof = ",".join(_key(p["profile"], p["value"]) for p in call["profiles"])
        rows.append((call["call_id"], call.get("from_tag") or "-", call["state"], call["account"] or "-",
                     call["from"] or "-", call["to"] or "-", ago(call.get("start_ts") or call.get("init_ts"), now),
                     until(call["expires"], now), call.get("node") or "-", prof))
    if rows:
        table(("CALL-ID", "FROM-TAG", "STATE", "ACCOUNT", "FROM", "TO", "STARTED", "EXPIRES", "NODE",
               "PROFILES"), rows)
    print(f"{len(calls)} call(s)")
    return 0


def _profile_values(args: argparse.Namespace) -> int:
    if args.value is not None:
        print("callpolicy: `profile values` takes a profile only (its values are what it lists)", file=sys.stderr)
        return 2
    with client(args) as c:
        values, err = _pages(c, "profile_values", "values", None, profile=args.profile)
    if err:
        return fail(err)
    values.sort(key=lambda v: (-v["size"], v["value"]))
    total = sum(v["size"] for v in values)
    shown = values[:args.top] if args.top is not None else values
    if args.json:
        print_json({"ok": True, "profile": args.profile, "values": shown, "count": len(values), "calls": total})
        return 0
    if shown:
        table(("VALUE", "SIZE"), [(v["value"], v["size"]) for v in shown])
    more = f", {len(values) - len(shown)} not shown" if len(shown) < len(values) else ""
    print(f"{len(values)} value(s), {total} call(s) in profile {args.profile}{more}")
    return 0


# -- end / terminate ------------------------------------------------------------------------------


def _size(c: Client, profile: str, value: str | None) -> tuple[int | None, dict[str, Any]]:
    r = c.request("profile_size", profile=profile, value=value)
    return (int(r["size"]), {}) if r.get("ok") else (None, r)


def _confirmed_size(c: Client, args: argparse.Namespace, question: str) -> tuple[int, int]:
    """(exit status, size) of the profile key `args` names, once the operator said yes to
    `question` (formatted with `size` and `key`); size 0: stop with that status (an error, an
    empty key, or no)."""
    key = _key(args.profile, args.target)
    size, err = _size(c, args.profile, args.target)
    if err:
        return fail(err), 0
    if not size:
        print(f"nothing held in {key}")
        return 0, 0
    if not confirm(question.format(size=size, key=key), args.yes):
        return 1, 0
    return 0, size


def cmd_end(args: argparse.Namespace) -> int:
    """Release counts: one call (`release` op), or every call in a profile key, after confirmation.
    The calls stay up in the proxy: `terminate` ends them there."""
    if args.profile is None:
        if args.target is None:
            print("callpolicy: end CALL-ID, or end --profile PROFILE [VALUE]", file=sys.stderr)
            return 2
        with client(args) as c:
            r = c.request("release", call_id=args.target, from_tag=args.from_tag)
        if not r.get("ok"):
            return fail(r)
        if args.json:
            print_json(r)
        else:
            print("released" if r["released"] else "not held (nothing to release)")
        return 0
    key = _key(args.profile, args.target)
    with client(args) as c:
        rc, size = _confirmed_size(c, args, "Release the {size} call(s) in {key}? Counts only: the calls stay up "
                                            "in the proxy (`terminate` ends them)")
        if not size:
            return rc
        r = c.request("release", profile=args.profile, value=args.target)
    if not r.get("ok"):
        return fail(r)
    if args.json:
        print_json(r)
    else:
        print(f"released {r['released']} call(s) in {key}")
    return 0


_ACTIONS = {"bye": "BYE sent to both sides", "cancel": "CANCEL sent (the caller gets 487)",
            "none": "already ending"}


def _dialog_line(node: str, d: dict[str, Any]) -> str:
    if d.get("error"):
        what = f"error: {d['error']}"
    else:
        what = _ACTIONS.get(d["action"], d["action"])
        what += ", counts released" if d.get("released") else ", counts not released yet (its end notice is late)"
    return f"{node}: {d['call_id']} from-tag {d['from_tag'] or '-'} ({d['state']}): {what}"


def cmd_terminate(args: argparse.Namespace) -> int:
    """Ask the Kamailio that holds a call (or every call in a profile key) to end it."""
    if args.profile is None:
        if args.target is None:
            print("callpolicy: terminate CALL-ID, or terminate --profile PROFILE VALUE", file=sys.stderr)
            return 2
        with client(args, timeout=args.timeout + args.wait) as c:
            r = c.request("terminate", call_id=args.target, from_tag=args.from_tag, wait=args.wait)
        if not r.get("ok"):
            return fail(r)
        if args.json:
            print_json(r)
            return 0 if r["terminated"] else 1
        for rep in r["nodes"]:
            if "error" in rep:
                print(f"{rep['node']}: error: {rep['error']}")
            for d in rep.get("dialogs", ()):
                print(_dialog_line(rep["node"], d))
        if not r["terminated"]:
            held = " (the store holds it: `end` releases its counts)" if r["held"] else ""
            print(f"no dialog {args.target} ended: no node has it{held}")
            return 1
        return 0
    key = _key(args.profile, args.target)
    with client(args) as c:
        rc, size = _confirmed_size(c, args, "End the {size} call(s) in {key} in the proxies (BYE or CANCEL to "
                                            "both sides)?")
    if not size:
        return rc
    # many calls: each is a round trip to its proxy; give the whole run time to finish
    with client(args, timeout=max(args.timeout, 60.0) + args.wait + size / 50) as c:
        r = c.request("terminate", profile=args.profile, value=args.target, wait=args.wait)
    if not r.get("ok"):
        return fail(r)
    if args.json:
        print_json(r)
        return 0 if not r["errors"] else 1
    print(f"{key}: {r['calls']} call(s): {r['terminated']} ended in their proxy, {r['released']} released, "
          f"{r['errors']} error(s), {r['skipped']} skipped")
    for res in r["results"]:
        if "error" in res:
            print(f"  {res['node']}: {res['call_id']}: error: {res['error']}")
    if r["skipped"]:
        print(f"  skipped: admitted by no evapi node (RADIUS, the CLI): `callpolicy end --profile "
              f"{args.profile}{' ' + args.target if args.target else ''}` releases their counts")
        for s in r["skipped_calls"][:10]:
            print(f"    {s['call_id']} (node {s['node'] or '-'})")
    return 0 if not r["errors"] else 1


# -- reload, ping, reconcile ----------------------------------------------------------------------


def preview_lines(preview: dict[str, Any]) -> list[str]:
    """The `reload` reply's preview as text (the same lines check-rules --against-live prints)."""
    from policy.caps import Cap

    res = PreviewResult(count=preview["count"], calls_over=preview["calls_over"], keys=preview["keys"],
                        skipped=list(preview.get("skipped", ())))
    res.over = [Over(o["profile"], o["value"], o["size"],
                     Cap(o["limit"], o["rule"], o["how"], bool(o.get("shadow")), o.get("per_call")))
                for o in preview["over_limit"]]
    return res.lines()


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running service to reload its rules; print which keys are over their new caps."""
    with client(args, timeout=max(args.timeout, 30.0)) as c:
        r = c.request("reload")
    if not r.get("ok"):
        return fail(r)
    if args.json:
        print_json(r)
        return 0
    print(f"reloaded: version {r['rules_version']}, {r['rules_loaded']} rules")
    if "preview" in r:
        for line in preview_lines(r["preview"]):
            print(line)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """Is the service there?"""
    with client(args) as c:
        r = c.request("ping")
    print("pong" if r.get("ok") else "error")
    return 0 if r.get("ok") else 1


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Compare the store with the proxies' dialog lists now and repair it (or, --dry-run, report)."""
    fields: dict[str, Any] = {"dry_run": bool(args.dry_run)}
    if args.node:
        fields["node"] = args.node
    with client(args, timeout=max(args.timeout, 60.0)) as c:
        r = c.request("reconcile", **fields)
    if not r.get("ok"):
        return fail(r)
    if args.json:
        print_json(r)
        return 1 if r.get("errors") else 0
    verb = "would be" if args.dry_run else "were"
    for name, rep in r["nodes"].items():
        if "error" in rep:
            print(f"{name}: error: {rep['error']}")
            continue
        print(f"{name}: {rep['dialogs']} dialogs on the node, {rep['held']} calls in the store; "
              f"{rep['released']} {verb} released, {rep['added']} added, {rep['answered']} answered "
              f"({rep['duration_ms']} ms)")
        for kind in ("released", "added", "answered"):
            for call in rep["calls"][kind]:
                over = f"  over: {', '.join(call['over_limit'])}" if call.get("over_limit") else ""
                print(f"  {kind:8} {call['call_id']} {call['from_tag']}  account={call['account']}{over}")
    return 1 if r.get("errors") else 0


# -- the parser ----------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add the admin commands."""
    sp = sub.add_parser("stats", help="dialog stats, decisions, store and proxies")
    client_args(sp)
    sp.set_defaults(func=cmd_stats)

    sp = sub.add_parser("profile", help="profile size|list|values PROFILE [VALUE]",
                        description="size: calls in a profile or one value (dlg.profile_get_size); "
                                    "list: the calls (dlg.profile_list); values: each value's size, "
                                    "biggest first (OpenSIPS profile_get_values)")
    sp.add_argument("action", choices=("size", "list", "values"))
    sp.add_argument("profile")
    sp.add_argument("value", nargs="?")
    sp.add_argument("--top", type=int, metavar="N", help="values: only the N biggest")
    sp.add_argument("--limit", type=int, metavar="N", help="list: at most N calls (default: all, paged)")
    client_args(sp)
    sp.set_defaults(func=cmd_profile)

    sp = sub.add_parser("end", help="release the counts of a call, or of every call in a profile key",
                        description="end CALL-ID [--from-tag T] | end --profile PROFILE [VALUE]: releases "
                                    "counts only (the calls stay up in the proxy: see terminate)")
    sp.add_argument("target", nargs="?", metavar="CALL-ID|VALUE")
    sp.add_argument("--from-tag", dest="from_tag", help="the call's From-tag (how the proxy checked it)")
    sp.add_argument("--profile", help="release every call in this profile (or its VALUE)")
    sp.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    client_args(sp)
    sp.set_defaults(func=cmd_end)

    sp = sub.add_parser("terminate", help="end a call (or every call in a profile key) in its Kamailio",
                        description="terminate CALL-ID [--from-tag T] | terminate --profile PROFILE VALUE: "
                                    "the Kamailio holding the dialog sends BYE to both sides (CANCEL if it "
                                    "is not answered yet); the counts drop with its end notices")
    sp.add_argument("target", nargs="?", metavar="CALL-ID|VALUE")
    sp.add_argument("--from-tag", dest="from_tag", help="only the dialog with this From-tag")
    sp.add_argument("--profile", help="end every call in this profile (or its VALUE)")
    sp.add_argument("--wait", type=float, default=2.0,
                    help="seconds to wait for the counts to drop (default 2, at most 30)")
    sp.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    client_args(sp)
    sp.set_defaults(func=cmd_terminate)

    sp = sub.add_parser("reconcile", help="repair the counts from the proxies' own dialog lists now")
    sp.add_argument("--node", help="one evapi node (HOST:PORT as in [evapi] nodes); default: all")
    sp.add_argument("--dry-run", action="store_true", help="report what would be repaired, change nothing")
    client_args(sp)
    sp.set_defaults(func=cmd_reconcile)

    sp = sub.add_parser("reload", help="reload the rules of the running service (lists keys over new caps)")
    client_args(sp)
    sp.set_defaults(func=cmd_reload)

    sp = sub.add_parser("ping", help="is the service up?")
    client_args(sp, json=False)
    sp.set_defaults(func=cmd_ping)
