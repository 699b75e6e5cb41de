"""The service's own settings: `service.toml`, with command-line overrides.

Relative paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy.errors import SettingsError

DEFAULT_PORT = 5099


@dataclass
class RadiusClient:
    """A RADIUS client (NAS) allowed to talk to the RADIUS front end."""

    address: str  # an address or a network in CIDR notation
    secret: str
    style: str = "reject"  # "reject" or "avp"
    name: str = ""


@dataclass
class Settings:
    """Everything `callpolicy serve` needs; defaults are what an operator expects."""

    # listeners
    tcp: str | None = f"127.0.0.1:{DEFAULT_PORT}"
    udp: str | None = f"127.0.0.1:{DEFAULT_PORT}"
    unix: str | None = "run/callpolicy.sock"
    reuse_port: bool = False
    # rules
    rules: str = "rules"
    watch: bool = True
    watch_interval: float = 1.0
    # store
    store: str = "embedded"  # "embedded" or a redis URL / "redis"
    snapshot: str | None = "run/snapshot.json"
    snapshot_interval: float = 10.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "callpolicy"
    store_timeout: float = 0.05
    store_connect_timeout: float = 1.0  # Redis: (re)connecting, TLS handshake included (background)
    sweep_interval: float = 1.0
    redis_sentinels: list[str] = field(default_factory=list)
    redis_service: str = "mymaster"
    # dialogs
    early_timeout: float = 300.0
    default_timeout: float = 43200.0
    # protocol
    max_message: int = 64 * 1024
    partial_timeout: float = 10.0
    max_connections: int = 4096
    # logging
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console
    # metrics (Prometheus); None = off
    metrics: str | None = None
    # evapi: Kamailio nodes to connect to ("host:port")
    evapi_nodes: list[str] = field(default_factory=list)
    evapi_reconnect_max: float = 5.0
    # RADIUS
    radius_auth: str | None = None
    radius_acct: str | None = None
    radius_clients: list[RadiusClient] = field(default_factory=list)
    radius_dictionary: str | None = None
    radius_mapping: dict[str, str] = field(default_factory=dict)
    # where the file was
    base_dir: Path = field(default_factory=Path.cwd)
    source: str = "<defaults>"

    def path(self, p: str | None) -> Path | None:
        """A settings path resolved against the settings file's directory."""
        if p is None:
            return None
        q = Path(p)
        return q if q.is_absolute() else self.base_dir / q


_SCHEMA: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    "listen": {
        "tcp": ("tcp", (str, bool)),
        "udp": ("udp", (str, bool)),
        "unix": ("unix", (str, bool)),
        "reuse_port": ("reuse_port", bool),
    },
    "rules": {
        "dir": ("rules", str),
        "watch": ("watch", bool),
        "watch_interval": ("watch_interval", (int, float)),
    },
    "store": {
        "backend": ("store", str),
        "snapshot": ("snapshot", (str, bool)),
        "snapshot_interval": ("snapshot_interval", (int, float)),
        "url": ("redis_url", str),
        "prefix": ("redis_prefix", str),
        "timeout": ("store_timeout", (int, float)),
        "connect_timeout": ("store_connect_timeout", (int, float)),
        "sweep_interval": ("sweep_interval", (int, float)),
        "sentinels": ("redis_sentinels", list),
        "sentinel_service": ("redis_service", str),
    },
    "dialogs": {
        "early_timeout": ("early_timeout", (int, float)),
        "default_timeout": ("default_timeout", (int, float)),
    },
    "protocol": {
        "max_message": ("max_message", int),
        "partial_timeout": ("partial_timeout", (int, float)),
        "max_connections": ("max_connections", int),
    },
    "log": {"level": ("log_level", str), "format": ("log_format", str)},
    "metrics": {"listen": ("metrics", (str, bool))},
    "evapi": {"nodes": ("evapi_nodes", list), "reconnect_max": ("evapi_reconnect_max", (int, float))},
    "radius": {
        "auth": ("radius_auth", (str, bool)),
        "acct": ("radius_acct", (str, bool)),
        "dictionary": ("radius_dictionary", str),
        "clients": ("radius_clients", list),
        "mapping": ("radius_mapping", dict),
    },
}


def load_settings(path: str | Path | None) -> Settings:
    """Read service.toml (or return defaults for None); raises SettingsError naming the key."""
    s = Settings()
    if path is None:
        return s
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(str(p), None, f"cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(str(p), None, f"invalid TOML: {exc}") from None
    s.base_dir = p.resolve().parent
    s.source = str(p)
    for section, body in doc.items():
        if section not in _SCHEMA:
            raise SettingsError(str(p), section, f"unknown section (expected one of: {', '.join(_SCHEMA)})")
        if not isinstance(body, dict):
            raise SettingsError(str(p), section, "must be a table")
        for key, value in body.items():
            spec = _SCHEMA[section].get(key)
            name = f"{section}.{key}"
            if spec is None:
                raise SettingsError(
                    str(p), name, f"unknown key (expected one of: {', '.join(_SCHEMA[section])})"
                )
            attr, kind = spec
            if not isinstance(value, kind) or (kind in (int, (int, float)) and isinstance(value, bool)):
                raise SettingsError(str(p), name, f"has the wrong type ({type(value).__name__})")
            if value is False:
                value = None  # `tcp = false` switches a listener off
            elif value is True and attr not in ("reuse_port", "watch"):
                raise SettingsError(str(p), name, "true is not a value here (give an address or false)")
            if attr == "radius_clients":
                value = [_radius_client(str(p), i, c) for i, c in enumerate(value)]
            setattr(s, attr, value)
    validate(s)
    return s


def _radius_client(file: str, i: int, raw: Any) -> RadiusClient:
    key = f"radius.clients[{i}]"
    if not isinstance(raw, dict):
        raise SettingsError(file, key, "must be a table")
    unknown = set(raw) - {"address", "secret", "style", "name"}
    if unknown:
        raise SettingsError(file, f"{key}.{sorted(unknown)[0]}", "unknown key")
    for req in ("address", "secret"):
        if not isinstance(raw.get(req), str) or not raw[req]:
            raise SettingsError(file, f"{key}.{req}", "is required (a string)")
    style = raw.get("style", "reject")
    if style not in ("reject", "avp"):
        raise SettingsError(file, f"{key}.style", "must be 'reject' or 'avp'")
    return RadiusClient(raw["address"], raw["secret"], style, str(raw.get("name", "")))


def validate(s: Settings) -> None:
    """Check values that types alone cannot."""
    src = s.source
    for attr in ("tcp", "udp", "metrics", "radius_auth", "radius_acct"):
        val = getattr(s, attr)
        if val is not None:
            try:
                split_hostport(val)
            except ValueError as exc:
                raise SettingsError(src, attr, str(exc)) from None
    for attr in ("early_timeout", "default_timeout", "store_timeout", "store_connect_timeout", "watch_interval",
                 "sweep_interval"):
        if getattr(s, attr) <= 0:
            raise SettingsError(src, attr, "must be > 0")
    if s.max_message < 64:
        raise SettingsError(src, "protocol.max_message", "must be >= 64")
    if s.log_format not in ("auto", "json", "console"):
        raise SettingsError(src, "log.format", "must be auto, json or console")
    if not (s.store == "embedded" or s.store == "redis" or s.store.startswith(("redis://", "rediss://",
                                                                              "unix://", "redis+sentinel://"))):
        raise SettingsError(src, "store.backend", f"must be 'embedded', 'redis' or a redis URL, not {s.store!r}")


def split_hostport(value: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split `host:port`, `[v6]:port`, `host` or `:port`."""
    v = value.strip()
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ValueError(f"bad address {value!r}")
        host, rest = v[1:end], v[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif v.count(":") == 1:
        host, p = v.split(":")
        if not p.isdigit():
            raise ValueError(f"bad port in {value!r}")
        port = int(p)
    elif v.count(":") > 1:
        host, port = v, default_port
    else:
        host, port = v, default_port
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port in {value!r}")
    return host or "127.0.0.1", port
