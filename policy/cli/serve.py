"""`callpolicy serve`: run the service, with command-line options over service.toml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from policy.cli.connect import add_config
from policy.errors import RuleError, SnapshotError
from policy.settings import Settings, load_settings, validate


def settings(args: argparse.Namespace) -> Settings:
    """service.toml (--config) with the `serve` options applied, validated."""
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
    validate(s)
    if s.evapi_nodes:
        s.evapi_secret()  # a missing or unreadable evapi secret stops `serve` at once, naming the key
    return s


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the service."""
    from policy import logs, server

    s = settings(args)
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


def register(sub: Any) -> None:
    """Add `serve`."""
    sp = sub.add_parser("serve", help="run the service")
    add_config(sp)
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
