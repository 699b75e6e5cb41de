"""How the admin commands reach the running service: which socket, which token, error output."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from policy.client import Client
from policy.errors import SettingsError
from policy.settings import TOKEN_ENV, Settings, load_settings, load_tokens


def default_config() -> str | None:
    """$CALLPOLICY_CONFIG, else ./service.toml when it exists."""
    env = os.environ.get("CALLPOLICY_CONFIG")
    if env:
        return env
    return "service.toml" if Path("service.toml").exists() else None


def add_config(p: argparse.ArgumentParser) -> None:
    """`--config` after the command too (`callpolicy serve --config X`): it wins over one before."""
    p.add_argument("--config", "-c", default=argparse.SUPPRESS,
                   help="service.toml (default: ./service.toml or $CALLPOLICY_CONFIG)")


def client_args(p: argparse.ArgumentParser, json: bool = True) -> None:
    """The options every command that talks to the service takes."""
    p.add_argument("--server", "-s", help="HOST:PORT of the service (default from service.toml)")
    p.add_argument("--unix", dest="unix_client", help="Unix socket of the service")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply (default 5)")
    if json:
        p.add_argument("--json", action="store_true", help="print the raw JSON reply (times as epoch seconds)")
    add_config(p)


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


def client(args: argparse.Namespace, timeout: float | None = None) -> Client:
    """A connection to the service: --server/--unix, else the configured Unix socket, else TCP."""
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
    return Client(server=server, unix=unix, timeout=timeout or args.timeout, token=client_token(s))


def fail(reply: dict[str, Any]) -> int:
    """Print an error reply on stderr (with a hint for a missing role); exit status 1."""
    err = reply.get("error", {})
    print(f"error: {err.get('code')}: {err.get('message')}", file=sys.stderr)
    if err.get("code") in ("unauthenticated", "forbidden"):
        print(f"hint: admin commands need an admin token: set {TOKEN_ENV}, or make an admin token in "
              "[auth] tokens / tokens_file readable, or use the Unix socket as an allowed uid "
              "(docs/security.md)", file=sys.stderr)
    return 1


def confirm(question: str, yes: bool) -> bool:
    """Ask on the terminal (y/N); `--yes` answers for it. Without a terminal and without --yes: no."""
    if yes:
        return True
    if not sys.stdin.isatty():
        print(f"{question} - not confirmed (no terminal): add --yes", file=sys.stderr)
        return False
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")
