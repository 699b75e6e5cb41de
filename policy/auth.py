"""Who may ask: the peer behind each request, client tokens and their roles, source allowlists. Pure.

Every transport describes the other end of a request as a `Peer`: how it came (tcp, unix,
udp, evapi, radius), from where, under which name, and the role it holds. A peer with no
role must first present a token (`{"op":"auth","token":...}`); a token has a name and a
role (`proxy`: the ops a SIP proxy sends for its calls; `admin`: every op). Tokens are
compared in constant time and never logged.

Which role a new connection starts with is decided here too, from the configuration:
`stream_role` (TCP: admin when no token is configured, which is only allowed on loopback;
otherwise none until `auth`), `UnixAccess` (Unix socket peers by their SO_PEERCRED uid),
`Allowlist` (UDP sources), and `check_listeners` refuses to expose an unauthenticated
listener beyond loopback. See docs/security.md.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

#: The roles a token may have (the same as `policy.protocol.ROLES`).
ROLES = ("proxy", "admin")
#: Secrets shorter than this are refused: a token is a password nobody types.
MIN_SECRET = 16


@dataclass(slots=True)
class Peer:
    """The other end of a connection (or of one datagram)."""

    transport: str  # "tcp", "unix", "udp", "evapi", "radius", "local"
    address: str = ""  # host:port, a socket path, a node name
    role: str | None = None  # None until authenticated; "proxy" or "admin"
    name: str = ""  # the token's (or the node's) name, for logs and call records
    node: str = ""  # the proxy node calls from this peer belong to (reconciliation scope)

    def may(self, role: str) -> bool:
        """Whether this peer may send an op that needs `role`."""
        if self.role == "admin":
            return True
        return self.role is not None and role == self.role


#: The peer of requests made inside the process (tests, the reconciler): may do everything.
LOCAL = Peer("local", role="admin", name="local")


@dataclass(frozen=True, slots=True)
class Token:
    """A client credential: its name (in logs) and role."""

    name: str
    secret: str
    role: str

    def __repr__(self) -> str:  # never show the secret, even in a traceback
        return f"Token(name={self.name!r}, role={self.role!r})"


class Tokens:
    """The configured tokens; `check` finds the one a client presented."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = list(tokens)

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def check(self, presented: str) -> Token | None:
        """The token whose secret equals `presented` (constant time per token), or None."""
        found = None
        raw = presented.encode()
        for tok in self.tokens:
            if hmac.compare_digest(raw, tok.secret.encode()):
                found = tok
        return found

    def first(self, role: str) -> Token | None:
        """The first token with `role` (the CLI presents the first admin token it can read)."""
        return next((t for t in self.tokens if t.role == role), None)

    def describe(self) -> str:
        """Names and roles for the start-up log line (never a secret)."""
        return ", ".join(f"{t.name} ({t.role})" for t in self.tokens)


def stream_role(tokens: Tokens) -> str | None:
    """The role a new TCP connection starts with: none (must `auth`) once tokens exist; without
    tokens every connection is admin, which `check_listeners` only allows on loopback."""
    return None if tokens else "admin"


class UnixAccess:
    """Unix socket peers by the uid the kernel reports (SO_PEERCRED): admin, proxy, or none
    (then they must present a token like a TCP client)."""

    def __init__(self, admin_uids: Iterable[int], proxy_uids: Iterable[int] = ()) -> None:
        self.admin = frozenset(admin_uids)
        self.proxy = frozenset(proxy_uids) - self.admin

    def role_for(self, uid: int | None) -> str | None:
        """The role of a peer with this uid (None when the uid is unknown or not listed)."""
        if uid is None:
            return None
        if uid in self.admin:
            return "admin"
        if uid in self.proxy:
            return "proxy"
        return None

    def describe(self) -> str:
        """For the start-up log line."""
        out = f"uid {sorted(self.admin)} admin"
        if self.proxy:
            out += f", uid {sorted(self.proxy)} proxy"
        return out


class Allowlist:
    """Source networks a datagram may come from (UDP cannot authenticate its source)."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[str, bool] = {}

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.networks)

    def allows(self, host: str) -> bool:
        """Whether a datagram from `host` (an IP address string) is accepted."""
        hit = self._cache.get(host)
        if hit is not None:
            return hit
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            ok = False
        else:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            ok = any(ip.version == n.version and ip in n for n in self.networks)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[host] = ok
        return ok

    def any_source(self) -> bool:
        """Whether the list lets every address in (0.0.0.0/0 or ::/0)."""
        return any(n.prefixlen == 0 for n in self.networks)

    def loopback_only(self) -> bool:
        """Whether only loopback sources are allowed."""
        return all(n.is_loopback for n in self.networks)


def is_loopback(host: str) -> bool:
    """Whether binding `host` exposes the socket to this machine only (names are resolved)."""
    h = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        try:
            infos = socket.getaddrinfo(h, None)
        except OSError:
            return False
        addrs = {i[4][0] for i in infos}
        return bool(addrs) and all(is_loopback(str(a)) for a in addrs)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class ListenerRefused(Exception):
    """A listener would be reachable beyond this machine without authentication."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(message)


def check_listeners(tcp_host: str | None, udp_host: str | None, tokens: Tokens, udp_allow: Allowlist,
                    insecure: bool) -> list[str]:
    """Refuse (ListenerRefused) an unauthenticated listener beyond loopback; return the warnings
    to log when `insecure` overrides the refusal.

    TCP on a non-loopback address needs tokens. UDP cannot authenticate at all: on a non-loopback
    address it needs a `udp_allow` that names the proxies' networks (not every source, and not
    only loopback, which would drop every datagram it is there to receive).
    """
    warnings: list[str] = []
    if tcp_host is not None and not tokens and not is_loopback(tcp_host):
        msg = (f"TCP on {tcp_host} would let anyone who reaches it run every op: configure [auth] tokens "
               "(or tokens_file), or bind a loopback address")
        if not insecure:
            raise ListenerRefused("listen.tcp", msg + " (or set [listen] insecure = true)")
        warnings.append(f"insecure: {msg}")
    if udp_host is not None and not is_loopback(udp_host):
        if udp_allow.any_source():
            msg = (f"UDP on {udp_host} with udp_allow = [{udp_allow}] takes proxy ops from any (spoofable) "
                   "source: list your proxies' networks in [listen] udp_allow")
            if not insecure:
                raise ListenerRefused("listen.udp_allow", msg + " (or set [listen] insecure = true)")
            warnings.append(f"insecure: {msg}")
        elif udp_allow.loopback_only():
            raise ListenerRefused("listen.udp_allow", f"UDP on {udp_host} would drop every datagram: udp_allow "
                                  f"= [{udp_allow}] admits loopback only; list your proxies' networks in "
                                  "[listen] udp_allow (or bind UDP to loopback)")
    return warnings


def auth_summary(tokens: Tokens, tcp_host: str | None, insecure: bool) -> str:
    """How TCP clients are authenticated, for the `listening` log line."""
    if tokens:
        return f"tokens: {tokens.describe()}"
    if tcp_host is not None and not is_loopback(tcp_host) and insecure:
        return "none (insecure: every client is admin)"
    return "none (loopback only)"
