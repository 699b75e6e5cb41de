"""Rules from the command line: `check-rules` (offline, or against the live counts) and `check`."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
import uuid
from typing import Any

from policy.cli.connect import client, client_args, fail
from policy.cli.format import print_json
from policy.errors import RuleError
from policy.preview import Preview, PreviewResult
from policy.settings import load_settings


def live_preview(args: argparse.Namespace, pv: Preview) -> PreviewResult:
    """Feed a preview with the running service's sizes (`profile_size`, `profile_values` pages)."""
    from policy.cli.admin import _pages

    with client(args) as c:
        for p in pv.whole_profiles():
            r = c.request("profile_size", profile=p)
            if r.get("ok"):
                pv.add(p, None, int(r["size"]))
            elif r.get("error", {}).get("code") != "unknown_profile":  # a new profile holds nothing yet
                pv.skip(p, f"{r['error']['code']}: {r['error']['message']}")
        for p in pv.value_profiles():
            values, err = _pages(c, "profile_values", "values", None, profile=p)
            if err and err.get("error", {}).get("code") != "unknown_profile":
                pv.skip(p, f"{err['error']['code']}: {err['error']['message']}")
            pv.add_values(p, ((v["value"], int(v["size"])) for v in values))
    return pv.finish()


def cmd_check_rules(args: argparse.Namespace) -> int:
    """Validate rule files offline, with the same messages as a reload; with --against-live, list
    the profile keys the running service holds over the new caps."""
    from policy.rules import load_rules

    path = args.path
    if path is None:  # the rules the settings name (./rules without a config)
        s = load_settings(args.config)
        path = str(s.path(s.rules))
    try:
        rs = load_rules(path)
    except RuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = (f"ok: {len(rs.rules)} rules, {len(rs.classifiers)} classifiers, "
               f"{len(rs.profiles)} profiles in {len(rs.files)} file(s); version {rs.version}")
    if not args.against_live:
        if args.json:
            print_json({"ok": True, "version": rs.version, "rules": len(rs.rules)})
        else:
            print(summary)
        return 0
    result = live_preview(args, Preview(rs, time.time(), args.top))
    if args.json:
        print_json({"ok": True, "version": rs.version, "rules": len(rs.rules), "preview": result.to_json()})
        return 0
    print(summary)
    print("against the running service's counts (calls already up are never cut by new rules):")
    for line in result.lines():
        print(line)
    return 0


def _bad(message: str) -> int:
    print(f"callpolicy check: {message}", file=sys.stderr)
    return 2


def cmd_check(args: argparse.Namespace) -> int:
    """Send a real check (or a dry run) and print the decision."""
    from policy.rules.fields import ATTR_NAME_RE

    if not args.from_ or not args.to:
        return _bad("--from and --to are required (the rules read them; a check without them would hold a "
                    "slot under empty values)")
    if args.src_ip is not None:
        try:
            ipaddress.ip_address(args.src_ip)
        except ValueError:
            return _bad(f"--src-ip {args.src_ip!r} is not an IP address")
    attrs: dict[str, str] = {}
    for a in args.attr or ():
        name, eq, value = a.partition("=")
        if not eq or not ATTR_NAME_RE.match(name):
            return _bad(f"--attr {a!r}: expected NAME=VALUE with NAME letters, digits and _ (not first a digit)")
        if name in attrs:
            return _bad(f"--attr {name!r} given twice")
        attrs[name] = value
    fields: dict[str, Any] = {
        "call_id": args.call_id or f"cli-{uuid.uuid4()}", "from_tag": args.from_tag,
        "from": args.from_, "to": args.to, "ruri": args.ruri, "account": args.account,
        "src_ip": args.src_ip, "dry_run": True if args.dry_run else None, "attrs": attrs or None,
    }
    with client(args) as c:
        r = c.request("check", **fields)
    if not r.get("ok"):
        return fail(r)
    if args.json:
        print_json(r)
        return 0
    line = r["decision"].upper()
    if r["decision"] == "deny":
        line += f" {r['code']} {r['reason']} (rule {r['rule']})"
    if r.get("duplicate"):
        line += " (already held)"
    print(f"{line}  call_id={fields['call_id']}")
    for p in r["profiles"]:
        val = f"={p['value']}" if p["value"] is not None else ""
        lim = f"/{p['limit']}" if "limit" in p else ""
        tag = " shadow" if p.get("shadow") else ""
        print(f"  {p['profile']}{val}: {p['size']}{lim}  ({p['rule']}{tag})")
    for s in r["shadow"]:
        print(f"  shadow: rule {s['rule']} would deny ({s['size']}/{s['limit']})")
    if "explain" in r:
        if r["attrs"]:
            print("  attrs: " + ", ".join(f"{k}={v}" for k, v in r["attrs"].items()))
        for e in r["explain"]:
            print(f"  {'+' if e['matched'] else '-'} {e['rule']}: {e['why']}")
            print("".join(f"      cap {c}\n" for c in e.get("caps", ())), end="")
    if "store_error" in r:
        print(f"  store error: {r['store_error']}")
    if r["decision"] == "allow" and not args.dry_run and not r.get("duplicate"):
        print(f"  held until it expires or: callpolicy end {fields['call_id']}")
    return 0


def register(sub: Any) -> None:
    """Add `check-rules` and `check`."""
    sp = sub.add_parser("check-rules", help="validate rule files (offline, or --against-live counts)")
    sp.add_argument("path", nargs="?", help="rules directory or file (default: the one service.toml names)")
    sp.add_argument("--against-live", action="store_true",
                    help="also list the profile keys the running service holds over the new caps")
    sp.add_argument("--top", type=int, default=50, metavar="N", help="--against-live: list at most N keys")
    client_args(sp)
    sp.set_defaults(func=cmd_check_rules)

    sp = sub.add_parser("check", help="send a check and print the decision")
    sp.add_argument("--from", dest="from_", metavar="URI", help="From URI (required)")
    sp.add_argument("--to", metavar="URI", help="To URI (required)")
    sp.add_argument("--ruri", help="Request-URI")
    sp.add_argument("--account")
    sp.add_argument("--src-ip", dest="src_ip", metavar="IP")
    sp.add_argument("--call-id", dest="call_id", help="default: a new random one")
    sp.add_argument("--from-tag", dest="from_tag")
    sp.add_argument("--attr", action="append", metavar="NAME=VALUE", help="extra attribute attrs.NAME (repeat)")
    sp.add_argument("--dry-run", action="store_true", help="evaluate without reserving; explain the rules")
    client_args(sp)
    sp.set_defaults(func=cmd_check)
