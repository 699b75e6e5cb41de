"""The service's own settings: `service.toml`, with command-line overrides.

Relative paths in the file are relative to the file's directory.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy.auth import MIN_SECRET, ROLES, Token, Tokens
from policy.errors import SettingsError

DEFAULT_PORT = 5099
#: The environment variable the CLI reads its token from (never the command line).
TOKEN_ENV = "CALLPOLICY_TOKEN"


@dataclass
class RadiusClient:
    """A RADIUS client (NAS) allowed to talk to the RADIUS front end."""

    address: str  # an address or a network in CIDR notation
    secret: str
    style: str = "reject"  # "reject" or "avp"
    name: str = ""
    require_message_authenticator: bool = True  # drop Access-Requests without one (BlastRADIUS)


@dataclass
class Settings:
    """Everything `callpolicy serve` needs; defaults are what an operator expects."""

    # listeners
    tcp: str | None = f"127.0.0.1:{DEFAULT_PORT}"
    udp: str | None = f"127.0.0.1:{DEFAULT_PORT}"
    unix: str | None = "run/callpolicy.sock"
    reuse_port: bool = False
    insecure: bool = False  # allow an unauthenticated listener beyond loopback (logged as a warning)
    udp_allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    unix_mode: int = 0o660
    unix_group: str | int | None = None
    # auth (docs/security.md)
    tokens: list[Token] = field(default_factory=list)  # inline [auth] tokens
    tokens_file: str | None = None
    unix_admin_uids: list[int | str] | None = None  # None: the service's own uid and root
    unix_proxy_uids: list[int | str] = field(default_factory=list)
    # rules
    rules: str = "rules"
    watch: bool = True
    watch_interval: float = 1.0
    # store
    store: str = "embedded"  # "embedded" or a redis URL / "redis"
    snapshot: str | None = "run/snapshot.json"
    snapshot_interval: float = 10.0
    fsync_interval: float = 1.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "callpolicy"
    store_timeout: float = 0.05
    store_connect_timeout: float = 1.0  # Redis: (re)connecting, TLS handshake included (background)
    sweep_interval: float = 1.0
    redis_sentinels: list[str] = field(default_factory=list)
    redis_service: str = "mymaster"
    redis_cluster: list[str] = field(default_factory=list)  # Redis Cluster seed nodes ("host:port")
    # dialogs
    early_timeout: float = 300.0
    default_timeout: float = 43200.0
    max_timeout: float | None = None  # cap on a client's `timeout`; None: default_timeout
    # protocol
    max_message: int = 64 * 1024
    partial_timeout: float = 10.0
    max_connections: int = 4096
    max_field: int = 1024
    max_vars: int = 32
    idle_timeout: float = 600.0  # 0: never close an idle connection
    max_per_peer: int = 256
    unix_reserve: int = 16
    max_pending: int = 256
    # logging
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console | journald
    warn_interval: float = 10.0  # repeated warnings: one line per interval, with a count
    log_timestamps: str = "iso"  # iso | epoch
    # metrics (Prometheus); None = off
    metrics: str | None = None
    metrics_refresh: float = 10.0  # seconds between profile-size samples
    metrics_top_n: int = 10  # per with-value profile: the N biggest values get a series
    metrics_near_limit: float = 0.8  # values at >= this share of their limit get a series
    metrics_max_values: int = 1000  # at most this many per-value series per profile
    # call records (see policy/records.py); both sinks off by default
    records_file: str | None = None
    records_rotate_bytes: int = 0  # 0: no size rotation
    records_rotate_seconds: float = 0.0  # 0: no time rotation
    records_webhook: str | None = None
    records_headers: dict[str, str] = field(default_factory=dict)
    records_batch: int = 100
    records_queue_max: int = 100_000
    records_retry_max: float = 30.0  # the longest wait between two tries of a batch
    records_timeout: float = 5.0  # one POST, connect to status line
    records_spool: str = "run/records-spool.jsonl"
    records_stop_timeout: float = 5.0  # at SIGTERM: time to deliver the queue before spooling it
    records_type_profile: str = "type"  # the profile whose value is the record's `type`
    # evapi: Kamailio nodes to connect to ("host:port"), the shared secret, reconciliation
    evapi_nodes: list[str] = field(default_factory=list)
    evapi_reconnect_max: float = 5.0
    evapi_token: str | None = None
    evapi_token_file: str | None = None
    evapi_reconcile_interval: float = 60.0
    evapi_reconcile_grace: float = 10.0
    evapi_max_message: int = 64 * 1024 * 1024  # after authentication (dialog lists)
    # RADIUS
    radius_auth: str | None = None
    radius_acct: str | None = None
    radius_clients: list[RadiusClient] = field(default_factory=list)
    radius_dictionary: str | None = None
    radius_mapping: dict[str, str] = field(default_factory=dict)
    radius_replay_window: float = 300.0  # seconds: Event-Timestamp skew allowed; records kept 2x as long
    radius_replay_entries: int = 1_000_000  # most records the replay filter remembers
    # where the file was
    base_dir: Path = field(default_factory=Path.cwd)
    source: str = "<defaults>"
    file_warnings: list[str] = field(default_factory=list)  # logged at start (loose file modes)

    def evapi_secret(self) -> str:
        """The evapi shared secret: `evapi.token`, or what `evapi.token_file` holds (white space stripped)."""
        if self.evapi_token_file:
            path = self.path(self.evapi_token_file)
            assert path is not None
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(self.source, "evapi.token_file", f"cannot read {path}: {exc}") from None
            if not secret:
                raise SettingsError(self.source, "evapi.token_file", f"{path} is empty")
            return secret
        if not self.evapi_token:
            raise SettingsError(self.source, "evapi.token", "is required when evapi.nodes is set "
                                "(the secret Kamailio's EVAPI_TOKEN holds; or evapi.token_file)")
        return self.evapi_token

    def path(self, p: str | None) -> Path | None:
        """A settings path resolved against the settings file's directory."""
        if p is None:
            return None
        q = Path(p)
        return q if q.is_absolute() else self.base_dir / q

    @property
    def dialog_max_timeout(self) -> float:
        """The cap on client-supplied timeouts."""
        return self.max_timeout if self.max_timeout is not None else self.default_timeout


_SCHEMA: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    "listen": {
        "tcp": ("tcp", (str, bool)),
        "udp": ("udp", (str, bool)),
        "unix": ("unix", (str, bool)),
        "reuse_port": ("reuse_port", bool),
        "insecure": ("insecure", bool),
        "udp_allow": ("udp_allow", list),
        "unix_mode": ("unix_mode", (int, str)),
        "unix_group": ("unix_group", (str, int)),
    },
    "auth": {
        "tokens": ("tokens", list),
        "tokens_file": ("tokens_file", str),
        "unix_admin_uids": ("unix_admin_uids", list),
        "unix_proxy_uids": ("unix_proxy_uids", list),
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
        "fsync_interval": ("fsync_interval", (int, float)),
        "url": ("redis_url", str),
        "prefix": ("redis_prefix", str),
        "timeout": ("store_timeout", (int, float)),
        "connect_timeout": ("store_connect_timeout", (int, float)),
        "sweep_interval": ("sweep_interval", (int, float)),
        "sentinels": ("redis_sentinels", list),
        "sentinel_service": ("redis_service", str),
        "cluster": ("redis_cluster", list),
    },
    "dialogs": {
        "early_timeout": ("early_timeout", (int, float)),
        "default_timeout": ("default_timeout", (int, float)),
        "max_timeout": ("max_timeout", (int, float)),
    },
    "protocol": {
        "max_message": ("max_message", int),
        "partial_timeout": ("partial_timeout", (int, float)),
        "max_connections": ("max_connections", int),
        "max_field": ("max_field", int),
        "max_vars": ("max_vars", int),
        "idle_timeout": ("idle_timeout", (int, float)),
        "max_per_peer": ("max_per_peer", int),
        "unix_reserve": ("unix_reserve", int),
        "max_pending": ("max_pending", int),
    },
    "log": {"level": ("log_level", str), "format": ("log_format", str), "timestamps": ("log_timestamps", str),
            "warn_interval": ("warn_interval", (int, float))},
    "metrics": {
        "listen": ("metrics", (str, bool)),
        "refresh": ("metrics_refresh", (int, float)),
        "top_n": ("metrics_top_n", int),
        "near_limit": ("metrics_near_limit", (int, float)),
        "max_values": ("metrics_max_values", int),
    },
    "records": {
        "file": ("records_file", (str, bool)),
        "rotate_bytes": ("records_rotate_bytes", int),
        "rotate_seconds": ("records_rotate_seconds", (int, float)),
        "webhook": ("records_webhook", (str, bool)),
        "headers": ("records_headers", dict),
        "batch": ("records_batch", int),
        "queue_max": ("records_queue_max", int),
        "retry_max": ("records_retry_max", (int, float)),
        "timeout": ("records_timeout", (int, float)),
        "spool": ("records_spool", str),
        "stop_timeout": ("records_stop_timeout", (int, float)),
        "type_profile": ("records_type_profile", str),
    },
    "evapi": {
        "nodes": ("evapi_nodes", list),
        "reconnect_max": ("evapi_reconnect_max", (int, float)),
        "token": ("evapi_token", str),
        "token_file": ("evapi_token_file", str),
        "reconcile_interval": ("evapi_reconcile_interval", (int, float)),
        "reconcile_grace": ("evapi_reconcile_grace", (int, float)),
        "max_message": ("evapi_max_message", int),
    },
    "radius": {
        "auth": ("radius_auth", (str, bool)),
        "acct": ("radius_acct", (str, bool)),
        "dictionary": ("radius_dictionary", str),
        "clients": ("radius_clients", list),
        "mapping": ("radius_mapping", dict),
        "replay_window": ("radius_replay_window", (int, float)),
        "replay_entries": ("radius_replay_entries", int),
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
            if attr in _BOOLS:
                pass
            elif value is False:
                value = None  # `tcp = false` switches a listener off
            elif value is True:
                raise SettingsError(str(p), name, "true is not a value here (give an address or false)")
            if attr == "radius_clients":
                value = [_radius_client(str(p), i, c) for i, c in enumerate(value)]
            elif attr == "tokens":
                value = parse_tokens(str(p), "auth.tokens", value)
                if value and _loose_mode(p):
                    s.file_warnings.append(f"{p} holds [auth] tokens and is readable by group or others "
                                           f"(mode {_mode(p):04o}): chmod 600 it, or move them to tokens_file")
            elif attr == "unix_mode":
                value = _file_mode(str(p), name, value)
            elif attr in ("unix_admin_uids", "unix_proxy_uids"):
                for v in value:
                    if not isinstance(v, (int, str)) or isinstance(v, bool):
                        raise SettingsError(str(p), name, "must list uids (integers) or user names")
            setattr(s, attr, value)
    validate(s)
    return s


_BOOLS = frozenset({"reuse_port", "watch", "insecure"})


def _file_mode(file: str, key: str, value: Any) -> int:
    if value is None or isinstance(value, bool):
        raise SettingsError(file, key, "must be an octal mode like 0o660")
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise SettingsError(file, key, f"must be an octal mode like 0o660 or \"0660\", not {value!r}") from None
    if not 0 <= value <= 0o777:
        raise SettingsError(file, key, "must be a file mode between 0 and 0o777")
    if value & 0o007:
        raise SettingsError(file, key, f"{value:04o} lets every local user connect: use 0600 or 0660 "
                                       "(and unix_group)")
    return int(value)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _loose_mode(p: Path) -> bool:
    try:
        return bool(_mode(p) & 0o077)
    except OSError:
        return False


def parse_tokens(file: str, key: str, raw: Any) -> list[Token]:
    """`[{ name, role, secret }, ...]` as Tokens; raises SettingsError naming the bad entry (never
    showing a secret)."""
    if not isinstance(raw, list):
        raise SettingsError(file, key, "must be a list of { name, role, secret } tables")
    out: list[Token] = []
    for i, t in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise SettingsError(file, where, "must be a table { name, role, secret }")
        unknown = set(t) - {"name", "role", "secret"}
        if unknown:
            raise SettingsError(file, f"{where}.{sorted(unknown)[0]}", "unknown key (expected name, role, secret)")
        for req in ("name", "role", "secret"):
            if not isinstance(t.get(req), str) or not t[req]:
                raise SettingsError(file, f"{where}.{req}", "is required (a string)")
        if t["role"] not in ROLES:
            raise SettingsError(file, f"{where}.role", f"must be one of {', '.join(ROLES)}, not {t['role']!r}")
        if len(t["secret"]) < MIN_SECRET:
            raise SettingsError(file, f"{where}.secret", f"is shorter than {MIN_SECRET} characters "
                                                         "(use e.g. `openssl rand -hex 24`)")
        out.append(Token(t["name"], t["secret"], t["role"]))
    return out


def load_tokens(s: Settings) -> tuple[Tokens, list[str]]:
    """Every configured token ([auth] tokens, then tokens_file) and warnings about loose file modes.

    Raises SettingsError naming the file and key. The secrets are never part of a message.
    """
    tokens = list(s.tokens)
    warnings = list(s.file_warnings)
    path = s.path(s.tokens_file)
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(s.source, "auth.tokens_file", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(str(path), None, f"invalid TOML: {exc}") from None
        unknown = set(doc) - {"tokens"}
        if unknown:
            raise SettingsError(str(path), sorted(unknown)[0], "unknown key (expected tokens = [...])")
        tokens += parse_tokens(str(path), "tokens", doc.get("tokens", []))
        if _loose_mode(path):
            warnings.append(f"{path} is readable by group or others (mode {_mode(path):04o}): chmod 600 it")
    names: set[str] = set()
    secrets: set[str] = set()
    for t in tokens:
        if t.name in names:
            raise SettingsError(s.source, "auth.tokens", f"two tokens are named {t.name!r}")
        if t.secret in secrets:
            raise SettingsError(s.source, "auth.tokens", f"token {t.name!r} has the same secret as another token")
        names.add(t.name)
        secrets.add(t.secret)
    return Tokens(tokens), warnings


def resolve_uids(values: list[int | str], key: str, source: str) -> list[int]:
    """uids from uids or user names."""
    import pwd

    out = []
    for v in values:
        if isinstance(v, int):
            out.append(v)
            continue
        try:
            out.append(pwd.getpwnam(v).pw_uid)
        except KeyError:
            raise SettingsError(source, key, f"no such user {v!r}") from None
    return out


def unix_uids(s: Settings) -> tuple[list[int], list[int]]:
    """(admin uids, proxy uids) for Unix socket peers; admins default to this process's uid and root."""
    admin = [os.getuid(), 0] if s.unix_admin_uids is None else resolve_uids(s.unix_admin_uids,
                                                                              "auth.unix_admin_uids", s.source)
    return admin, resolve_uids(s.unix_proxy_uids, "auth.unix_proxy_uids", s.source)


def _radius_client(file: str, i: int, raw: Any) -> RadiusClient:
    key = f"radius.clients[{i}]"
    if not isinstance(raw, dict):
        raise SettingsError(file, key, "must be a table")
    unknown = set(raw) - {"address", "secret", "style", "name", "require_message_authenticator"}
    if unknown:
        raise SettingsError(file, f"{key}.{sorted(unknown)[0]}", "unknown key")
    for req in ("address", "secret"):
        if not isinstance(raw.get(req), str) or not raw[req]:
            raise SettingsError(file, f"{key}.{req}", "is required (a string)")
    style = raw.get("style", "reject")
    if style not in ("reject", "avp"):
        raise SettingsError(file, f"{key}.style", "must be 'reject' or 'avp'")
    require = raw.get("require_message_authenticator", True)
    if not isinstance(require, bool):
        raise SettingsError(file, f"{key}.require_message_authenticator", "must be true or false")
    return RadiusClient(raw["address"], raw["secret"], style, str(raw.get("name", "")), require)


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
                 "sweep_interval", "warn_interval", "partial_timeout", "fsync_interval"):
        if getattr(s, attr) <= 0:
            raise SettingsError(src, attr, "must be > 0")
    if s.max_timeout is not None and s.max_timeout <= 0:
        raise SettingsError(src, "dialogs.max_timeout", "must be > 0")
    if s.radius_replay_window <= 0:
        raise SettingsError(src, "radius.replay_window", "must be > 0")
    if s.radius_replay_entries < 1000:
        raise SettingsError(src, "radius.replay_entries", "must be >= 1000")
    for attr, key in (("evapi_reconcile_interval", "evapi.reconcile_interval"),
                      ("evapi_reconcile_grace", "evapi.reconcile_grace")):
        if getattr(s, attr) <= 0:
            raise SettingsError(src, key, "must be > 0")
    if s.evapi_max_message < s.max_message:
        raise SettingsError(src, "evapi.max_message", "must be >= protocol.max_message")
    if s.max_message < 64:
        raise SettingsError(src, "protocol.max_message", "must be >= 64")
    for key, attr, low in (("max_field", "max_field", 16), ("max_vars", "max_vars", 0),
                           ("max_connections", "max_connections", 1), ("max_per_peer", "max_per_peer", 1),
                           ("unix_reserve", "unix_reserve", 0), ("max_pending", "max_pending", 1)):
        if getattr(s, attr) < low:
            raise SettingsError(src, f"protocol.{key}", f"must be >= {low}")
    if s.idle_timeout < 0:
        raise SettingsError(src, "protocol.idle_timeout", "must be >= 0 (0: no idle timeout)")
    for i, net in enumerate(s.udp_allow):
        try:
            if not isinstance(net, str):
                raise TypeError
            ipaddress.ip_network(net, strict=False)
        except (ValueError, TypeError):
            raise SettingsError(src, f"listen.udp_allow[{i}]", f"not an address or network: {net!r}") from None
    if s.log_format not in ("auto", "json", "console", "journald"):
        raise SettingsError(src, "log.format", "must be auto, json, console or journald")
    if s.log_timestamps not in ("iso", "epoch"):
        raise SettingsError(src, "log.timestamps", "must be iso or epoch")
    _validate_metrics(s)
    _validate_records(s)
    if not (s.store == "embedded" or s.store == "redis" or s.store.startswith(("redis://", "rediss://",
                                                                              "unix://", "redis+sentinel://",
                                                                              "redis+cluster://"))):
        raise SettingsError(src, "store.backend", f"must be 'embedded', 'redis' or a redis URL, not {s.store!r}")
    for i, node in enumerate(s.redis_cluster):
        host, sep, port = node.rpartition(":") if isinstance(node, str) else ("", "", "")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise SettingsError(src, f"store.cluster[{i}]", f"not a host:port address: {node!r}")
    if s.redis_cluster and s.redis_sentinels:
        raise SettingsError(src, "store.cluster", "a store is either a cluster or behind sentinels, not both")
    if (s.redis_cluster or s.store.startswith("redis+cluster://")) and (
            "{" in s.redis_prefix or "}" in s.redis_prefix or not s.redis_prefix):
        raise SettingsError(src, "store.prefix", "a cluster prefix must be non-empty, without '{' or '}' "
                                                 "(the store chooses the hash tags)")


def _validate_metrics(s: Settings) -> None:
    src = s.source
    if s.metrics_refresh <= 0:
        raise SettingsError(src, "metrics.refresh", "must be > 0")
    if s.metrics_top_n < 0:
        raise SettingsError(src, "metrics.top_n", "must be >= 0")
    if not 0 < s.metrics_near_limit <= 1:
        raise SettingsError(src, "metrics.near_limit", "must be > 0 and <= 1 (a share of the limit)")
    if s.metrics_max_values < 0:
        raise SettingsError(src, "metrics.max_values", "must be >= 0")


def _validate_records(s: Settings) -> None:
    src = s.source
    if s.records_webhook is not None:
        from urllib.parse import urlsplit

        u = urlsplit(s.records_webhook)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SettingsError(src, "records.webhook",
                                f"must be an http:// or https:// URL, not {s.records_webhook!r}")
    for name, value in s.records_headers.items():
        if not isinstance(value, str) or any(c in name + value for c in "\r\n") or ":" in name:
            raise SettingsError(src, f"records.headers.{name}", "must be a one-line string header")
    for attr, key in (("records_rotate_bytes", "rotate_bytes"), ("records_rotate_seconds", "rotate_seconds")):
        if getattr(s, attr) < 0:
            raise SettingsError(src, f"records.{key}", "must be >= 0 (0 switches it off)")
    if s.records_batch < 1:
        raise SettingsError(src, "records.batch", "must be >= 1")
    if s.records_queue_max < s.records_batch:
        raise SettingsError(src, "records.queue_max", "must be >= records.batch")
    for attr, key in (("records_retry_max", "retry_max"), ("records_timeout", "timeout"),
                      ("records_stop_timeout", "stop_timeout")):
        if getattr(s, attr) <= 0:
            raise SettingsError(src, f"records.{key}", "must be > 0")


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
