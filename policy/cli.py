"""The `callpolicy` command: serve, and admin commands that feel like `kamcmd dlg.*`."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson

from policy.errors import PolicyError, RuleError, SettingsError, SnapshotError
from policy.settings import TOKEN_ENV, Settings, load_settings, load_tokens


def _default_config() -> str | None:
    env = os.environ.get("CALLPOLICY_CONFIG")
    if env:
        return env
    return "service.toml" if Path("service.toml").exists() else None


def _settings(args: argparse.Namespace) -> Settings:
    s = load_settings(args.config)
    if getattr(args, "rules", None):
        s.rules = str(Path(args.rules).resolve())
    if getattr(args, "listen", None):
        s.tcp = s.udp = None if args.listen == "none" else args.listen
    if getattr(args, "tcp", None):
        s.tcp = None if args.tcp == "none" else args.tcp
    if getattr(args, "udp", None):
        s.udp = None if args.udp == "none" else args.udp
    if getattr(args, "unix", None):
        s.unix = None if args.unix == "none" else str(Path(args.unix).resolve())
    if getattr(args, "store", None):
        s.store = args.store
        if args.store.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
            s.redis_url = args.store
    if getattr(args, "snapshot", None):
        s.snapshot = None if args.snapshot == "none" else str(Path(args.snapshot).resolve())
    if getattr(args, "metrics", None):
        s.metrics = None if args.metrics == "none" else args.metrics
    if getattr(args, "evapi", None):
        # each --evapi adds a node to [evapi] nodes; "--evapi none" drops the configured ones first
        nodes = list(s.evapi_nodes)
        for value in args.evapi:
            nodes = [] if value == "none" else [*nodes, value]
        s.evapi_nodes = list(dict.fromkeys(nodes))
    if getattr(args, "evapi_token_file", None):
        s.evapi_token_file = str(Path(args.evapi_token_file).resolve())
    if getattr(args, "log_format", None):
        s.log_format = args.log_format
    if getattr(args, "log_level", None):
        s.log_level = args.log_level
    for attr in ("early_timeout", "default_timeout"):
        val = getattr(args, attr, None)
        if val is not None:
            setattr(s, attr, val)
    from policy.settings import validate

    validate(s)
    if s.evapi_nodes:
        s.evapi_secret()  # a missing or unreadable evapi secret stops `serve` at once, naming the key
    return s


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the service."""
    from policy import logs, server

    s = _settings(args)
    logs.configure(s.log_level, s.log_format, timestamps=s.log_timestamps)
    try:
        server.run(s)
    except RuleError as exc:
        print(f"callpolicy: rules not loaded: {exc}", file=sys.stderr)
        return 2
    except SnapshotError as exc:  # raised by the store's close() at the stop, not at start
        print(f"callpolicy: stopped with an error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"callpolicy: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def client_token(s: Settings) -> str | None:
    """The token the CLI presents: $CALLPOLICY_TOKEN, else the first admin token of the config it can
    read ([auth] tokens, tokens_file); None without one (a Unix socket peer may be admin by its uid).
    Never a command-line argument: it would show in `ps` and the shell's history."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return env
    try:
        tokens, _warnings = load_tokens(s)
    except SettingsError:
        return None  # e.g. a tokens file this user may not read: try without
    tok = tokens.first("admin")
    return tok.secret if tok is not None else None


def _client(args: argparse.Namespace) -> Any:
    from policy.client import Client

    unix = args.unix_client
    server = args.server
    s = load_settings(args.config) if args.config else Settings()
    if not unix and not server:
        # the Unix socket first: it keeps a reserve of connections for the admin CLI
        sock = s.path(s.unix) if s.unix else None
        if sock is not None and sock.exists():
            unix = str(sock)
        elif s.tcp:
            server = s.tcp
        elif sock is not None:
            unix = str(sock)
    return Client(server=server, unix=unix, timeout=args.timeout, token=client_token(s))


def _print(reply: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
    return 0 if reply.get("ok") else 1


def _fail(reply: dict[str, Any]) -> int:
    err = reply.get("error", {})
    print(f"error: {err.get('code')}: {err.get('message')}", file=sys.stderr)
    if err.get("code") in ("unauthenticated", "forbidden"):
        print(f"hint: admin commands need an admin token: set {TOKEN_ENV}, or make an admin token in "
              "[auth] tokens / tokens_file readable, or use the Unix socket as an allowed uid "
              "(docs/security.md)", file=sys.stderr)
    return 1


def cmd_stats(args: argparse.Namespace) -> int:
    """Print dialog stats and decisions, like `kamcmd stats.get_statistics dialog:`."""
    with _client(args) as c:
        r = c.request("stats")
    if args.json or not r.get("ok"):
        return _print(r, True) if r.get("ok") else _fail(r)
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
    for key in ("connections", "evapi", "reconcile", "radius"):
        if key in r:
            print(f"{key} = {orjson.dumps(r[key]).decode()}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """`profile size|list PROFILE [VALUE]`, like dlg.profile_get_size / dlg.profile_list."""
    op = "profile_size" if args.action == "size" else "profile_list"
    with _client(args) as c:
        r = c.request(op, profile=args.profile, value=args.value)
    if not r.get("ok"):
        return _fail(r)
    if args.json:
        return _print(r, True)
    if op == "profile_size":
        print(r["size"])
    else:
        for call in r["calls"]:
            prof = ", ".join(p["profile"] + (f"={p['value']}" if p["value"] is not None else "")
                             for p in call["profiles"])
            print(f"{call['call_id']}  {call['state']:6}  from={call['from']}  to={call['to']}  "
                  f"account={call['account']}  expires={call['expires']:.0f}  [{prof}]")
        print(f"{len(r['calls'])} call(s)")
    return 0


def cmd_end(args: argparse.Namespace) -> int:
    """Force the release of a call (`dlg.terminate_dlg`, for counters): the admin `release` op."""
    with _client(args) as c:
        r = c.request("release", call_id=args.call_id)
    if not r.get("ok"):
        return _fail(r)
    if args.json:
        return _print(r, True)
    print("released" if r["released"] else "not held (nothing to release)")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Compare the store with the proxies' dialog lists now and repair it (or, --dry-run, report)."""
    fields: dict[str, Any] = {"dry_run": bool(args.dry_run)}
    if args.node:
        fields["node"] = args.node
    with _client(args) as c:
        r = c.request("reconcile", **fields)
    if not r.get("ok"):
        return _fail(r)
    if args.json:
        return _print(r, True)
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


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running service to reload its rules."""
    with _client(args) as c:
        r = c.request("reload")
    if not r.get("ok"):
        return _fail(r)
    print(f"reloaded: version {r['rules_version']}, {r['rules_loaded']} rules")
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """Is the service there?"""
    with _client(args) as c:
        r = c.request("ping")
    print("pong" if r.get("ok") else "error")
    return 0 if r.get("ok") else 1


def cmd_check_rules(args: argparse.Namespace) -> int:
    """Validate rule files offline, with the same messages as a reload."""
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
    print(f"ok: {len(rs.rules)} rules, {len(rs.classifiers)} classifiers, "
          f"{len(rs.profiles)} profiles in {len(rs.files)} file(s); version {rs.version}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Send a real check (or a dry run) and print the decision."""
    fields: dict[str, Any] = {
        "call_id": args.call_id or f"cli-{uuid.uuid4()}",
        "from": args.from_, "to": args.to, "ruri": args.ruri, "account": args.account,
        "src_ip": args.src_ip, "dry_run": True if args.dry_run else None,
    }
    if args.attr:
        fields["attrs"] = dict(a.split("=", 1) for a in args.attr)
    with _client(args) as c:
        r = c.request("check", **fields)
    if not r.get("ok"):
        return _fail(r)
    if args.json:
        return _print(r, True)
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
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="callpolicy", description=__doc__)
    p.add_argument("--config", "-c", default=_default_config(),
                   help="service.toml (default: ./service.toml or $CALLPOLICY_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("serve", help="run the service")
    sp.add_argument("--rules", help="rules directory or file")
    sp.add_argument("--listen", help="HOST:PORT for TCP and UDP ('none' for neither)")
    sp.add_argument("--tcp", help="HOST:PORT for TCP only ('none' to disable)")
    sp.add_argument("--udp", help="HOST:PORT for UDP only ('none' to disable)")
    sp.add_argument("--unix", help="Unix socket path ('none' to disable)")
    sp.add_argument("--store", help="'embedded', or a redis:// / redis+sentinel:// / redis+cluster:// URL")
    sp.add_argument("--snapshot", help="embedded store snapshot file ('none' to disable)")
    sp.add_argument("--metrics", help="HOST:PORT for Prometheus /metrics ('none' to disable)")
    sp.add_argument("--evapi", action="append",
                    help="Kamailio evapi HOST:PORT to connect to, added to [evapi] nodes (repeat for "
                         "several; 'none' first drops the configured nodes)")
    sp.add_argument("--evapi-token-file", dest="evapi_token_file",
                    help="file holding the evapi shared secret (Kamailio's EVAPI_TOKEN)")
    sp.add_argument("--early-timeout", type=float, dest="early_timeout")
    sp.add_argument("--default-timeout", type=float, dest="default_timeout")
    sp.add_argument("--log-format", choices=("auto", "json", "console", "journald"))
    sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sp.set_defaults(func=cmd_serve)

    def client_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--server", "-s", help="HOST:PORT of the service (default from service.toml)")
        q.add_argument("--unix", dest="unix_client", help="Unix socket of the service")
        q.add_argument("--timeout", type=float, default=5.0)
        q.add_argument("--json", action="store_true", help="print the raw JSON reply")

    sp = sub.add_parser("stats", help="dialog stats and decisions")
    client_args(sp)
    sp.set_defaults(func=cmd_stats)

    sp = sub.add_parser("profile", help="profile size|list PROFILE [VALUE]")
    sp.add_argument("action", choices=("size", "list"))
    sp.add_argument("profile")
    sp.add_argument("value", nargs="?")
    client_args(sp)
    sp.set_defaults(func=cmd_profile)

    sp = sub.add_parser("end", help="force the release of a call")
    sp.add_argument("call_id")
    client_args(sp)
    sp.set_defaults(func=cmd_end)

    sp = sub.add_parser("reconcile", help="repair the counts from the proxies' own dialog lists now")
    sp.add_argument("--node", help="one evapi node (HOST:PORT as in [evapi] nodes); default: all")
    sp.add_argument("--dry-run", action="store_true", help="report what would be repaired, change nothing")
    client_args(sp)
    sp.set_defaults(func=cmd_reconcile)

    sp = sub.add_parser("reload", help="reload the rules of the running service")
    client_args(sp)
    sp.set_defaults(func=cmd_reload)

    sp = sub.add_parser("ping", help="is the service up?")
    client_args(sp)
    sp.set_defaults(func=cmd_ping)

    sp = sub.add_parser("check-rules", help="validate rule files offline")
    sp.add_argument("path", nargs="?", help="rules directory or file (default: the one service.toml names)")
    sp.set_defaults(func=cmd_check_rules)

    sp = sub.add_parser("init", help="write a commented service.toml and example rules into DIR")
    sp.add_argument("dir", help="where to write them (created if missing), e.g. /etc/callpolicy")
    sp.add_argument("--force", action="store_true", help="overwrite files that exist")
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("check", help="send a check and print the decision")
    sp.add_argument("--from", dest="from_", help="From URI")
    sp.add_argument("--to", help="To URI")
    sp.add_argument("--ruri", help="Request-URI")
    sp.add_argument("--account")
    sp.add_argument("--src-ip", dest="src_ip")
    sp.add_argument("--call-id", dest="call_id", help="default: a new random one")
    sp.add_argument("--attr", action="append", help="NAME=VALUE extra attribute (repeat)")
    sp.add_argument("--dry-run", action="store_true", help="evaluate without reserving; explain the rules")
    client_args(sp)
    sp.set_defaults(func=cmd_check)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `callpolicy` console script."""
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except (SettingsError, PolicyError) as exc:
        print(f"callpolicy: {exc}", file=sys.stderr)
        return 2
    return rc


