"""The `callpolicy` command: serve, and admin commands that feel like `kamcmd dlg.*` / `opensips-cli`.

One module per group of commands, each adding its subcommands to the parser (`register`):

- `serve`: run the service (`policy.cli.serve`);
- `stats`, `profile size|list|values`, `end`, `terminate`, `reload`, `ping`, `reconcile`:
  the admin ops over the admin socket (`policy.cli.admin`);
- `check-rules` (offline, or `--against-live`), `check` (`policy.cli.rules`);
- `top`: the live view (`policy.cli.top`);
- `init`: the example files (`policy.cli.init`).

How a command reaches the service (socket, token) is `policy.cli.connect`; tables, human
times and the quiet exit on a closed pipe are `policy.cli.format`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from policy import __version__
from policy.cli import admin, init, rules, serve, top
from policy.cli.connect import client_token, default_config
from policy.cli.format import closed_pipe
from policy.cli.serve import settings as _settings
from policy.errors import PolicyError, SettingsError

__all__ = ["_settings", "build_parser", "client_token", "main", "version"]


def version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    try:
        return metadata.version("callpolicy")
    except metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(prog="callpolicy", description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", "-V", action="version", version=f"callpolicy {version()}")
    p.add_argument("--config", "-c", default=default_config(),
                   help="service.toml (default: ./service.toml or $CALLPOLICY_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(sub)
    admin.register(sub)
    top.register(sub)
    rules.register(sub)
    init.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `callpolicy` console script."""
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's exit
    except BrokenPipeError:
        return closed_pipe()
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except (SettingsError, PolicyError) as exc:
        print(f"callpolicy: {exc}", file=sys.stderr)
        return 2
    return rc
