"""The RADIUS client table: source address (or network) -> secret, reply style, policy. Pure.

Every datagram's source address is matched against the configured clients (`[radius]
clients`); the most specific network wins and IPv4-mapped IPv6 sources match IPv4 entries.
Each client is a `Peer` of the service with the proxy role: the calls it admits carry its
node, `radius:<name>` (a single-address entry) or `radius:<name>@<source address>` (a
network entry, so that one NAS's Accounting-On/Off releases its own calls, not those of
every NAS in the network).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from policy.auth import Peer
from policy.errors import SettingsError
from policy.settings import RadiusClient

_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Client:
    """A configured NAS (or network of them): where it may send from, its secret and policy."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    secret: bytes
    style: str  # "reject" or "avp" (see docs/radius.md)
    name: str
    require_message_authenticator: bool = True
    _peers: dict[str, Peer] = field(default_factory=dict, compare=False, repr=False)

    @property
    def single(self) -> bool:
        """Whether the entry is one address (not a network)."""
        return self.network.num_addresses == 1

    def node(self, host: str) -> str:
        """The node the calls admitted from `host` through this client belong to."""
        return f"radius:{self.name}" if self.single else f"radius:{self.name}@{host}"

    def peer(self, host: str) -> Peer:
        """The service peer for datagrams from `host` (one per node, reused)."""
        key = "" if self.single else host
        got = self._peers.get(key)
        if got is None:
            if len(self._peers) >= _CACHE_SIZE:
                self._peers.clear()
            got = self._peers[key] = Peer("radius", host, role="proxy", name=self.name, node=self.node(host))
        return got


class ClientTable:
    """Source address -> client; the most specific network wins."""

    def __init__(self, clients: list[RadiusClient], source: str = "<settings>") -> None:
        self.clients: list[Client] = []
        for i, c in enumerate(clients):
            try:
                net = ipaddress.ip_network(c.address, strict=False)
            except ValueError as exc:
                raise SettingsError(source, f"radius.clients[{i}].address", str(exc)) from None
            self.clients.append(Client(net, c.secret.encode(), c.style, c.name or c.address,
                                       c.require_message_authenticator))
        self.clients.sort(key=lambda c: c.network.prefixlen, reverse=True)
        self._cache: dict[str, Client | None] = {}

    def match(self, host: str) -> Client | None:
        """The client for a source address, or None."""
        try:
            return self._cache[host]
        except KeyError:
            pass
        found: Client | None = None
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            addr = None
        if addr is not None:
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            for c in self.clients:
                if addr.version == c.network.version and addr in c.network:
                    found = c
                    break
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[host] = found
        return found
