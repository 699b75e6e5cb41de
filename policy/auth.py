"""Who may ask: the peer behind each request, client tokens and their roles. Pure.

Every transport describes the other end of a request as a `Peer`: how it came (tcp, unix,
udp, evapi, radius), from where, under which name, and the role it holds. A peer with no
role must first present a token (`{"op":"auth","token":...}`); a token has a name and a
role (`proxy`: the ops a SIP proxy sends for its calls; `admin`: every op). Tokens are
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass


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
