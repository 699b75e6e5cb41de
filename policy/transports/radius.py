"""RADIUS front end: Access-Request -> `check`, Accounting-Request -> `answer`/`refresh`/`end`.

Two asyncio UDP listeners (auth, default port 1812; acct, default 1813). pyrad is the codec:
its `Dictionary` gives every mapped attribute's code and type, and its packets encode the
attributes of each distinct reply (cached, see `ReplyEncoder`); everything about sockets,
clients and retransmissions is here. The per-packet work is kept off pyrad's generic paths for
speed: the datagram is split into attributes once by `parse_packet` (which has to walk them
anyway to reject bad lengths), and a reply only gets its identifier, Message-Authenticator and
Response Authenticator computed over the cached attribute block.

What is dropped, logged (structlog warning, rate limited) and never answered:

- a packet from a source address that matches no `[[radius.clients]]` entry;
- a packet shorter than its header, whose Length field is below 20, above 4096 or beyond the
  datagram, or whose attributes overrun the Length field (RFC 2865 section 3 and 5);
- a packet code the port does not serve (Access-Request on auth, Accounting-Request on acct,
  Status-Server on both);
- an Accounting-Request whose Request Authenticator does not verify (wrong secret);
- any packet whose Message-Authenticator (RFC 2869 section 5.14) is present and wrong, and a
  Status-Server without one.

An Access-Request without Message-Authenticator cannot prove its secret (its authenticator is
random): it is answered, and a NAS with a wrong secret discards the answer because the Response
Authenticator does not verify for it.

Retransmissions: a packet with the same source (address and port), identifier and Request
Authenticator as one seen within `CACHE_TTL` seconds is answered again with the cached reply
bytes and not applied again; one that arrives while the first is still being processed is
ignored (the first one's answer is on its way).

Access-Request replies depend on the client's `style`:

- `reject`: Access-Accept to allow; Access-Reject with `Reply-Message = <reason>` to deny.
- `avp` (Kamailio misc_radius, which cannot tell a reject from a timeout): always
  Access-Accept; the decision is in `SIP-AVP` values, which misc_radius turns into AVPs:
  `policy:allow` | `policy:deny` | `policy:error`, and on deny/error `policy_code#<int>`,
  `policy_reason:<text>` and (deny) `policy_rule:<rule>`.

Accounting-Request: Start -> `answer` with `create: true` (counts a call no check saw),
Interim-Update -> `refresh`, Stop -> `end` (bye), Failed -> `end` (cancel when
Sip-Response-Code is 487, else failed); Accounting-On/Off and other types are answered and
otherwise ignored. The Accounting-Response is sent once the operation is done; when the
counter store cannot be reached nothing is sent, so the NAS retransmits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import structlog
from pyrad import packet as rp
from pyrad.dictionary import Dictionary

from policy.errors import SettingsError
from policy.radius import DICTIONARY
from policy.settings import RadiusClient, split_hostport

log = structlog.get_logger("policy.transports.radius")

AUTH_PORT = 1812
ACCT_PORT = 1813
MAX_PACKET = 4096  # RFC 2865 section 3
CACHE_TTL = 30.0  # seconds a reply is kept for retransmissions
CACHE_SIZE = 65536
LOG_BURST = 20  # drop warnings per second, the rest are only counted

ACCESS_REQUEST = 1
ACCOUNTING_REQUEST = 4
STATUS_SERVER = 12

ATTR_REPLY_MESSAGE = 18
ATTR_PROXY_STATE = 33
ATTR_ACCT_STATUS_TYPE = 40
ATTR_MESSAGE_AUTHENTICATOR = 80
ATTR_SIP_RESPONSE_CODE = 102

STATUS_START = 1
STATUS_STOP = 2
STATUS_INTERIM = 3
STATUS_ON = 7
STATUS_OFF = 8
STATUS_FAILED = 15

# attribute -> request field; `[radius] mapping` overrides (see docs/radius.md)
DEFAULT_MAPPING: dict[str, str] = {
    "Acct-Session-Id": "call_id",
    "User-Name": "account",
    "Calling-Station-Id": "from",
    "Called-Station-Id": "to",
    "NAS-IP-Address": "src_ip",
    "Sip-Translated-Request-URI": "ruri",
}
FIELDS = frozenset({"call_id", "from", "to", "ruri", "account", "src_ip", "from_user", "from_domain",
                    "to_user", "to_domain", "ruri_user", "ruri_domain"})


class _Service(Protocol):
    info_providers: dict[str, Callable[[], Any]]

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]: ...


class _Settings(Protocol):
    radius_auth: str | None
    radius_acct: str | None
    radius_clients: list[RadiusClient]
    radius_dictionary: str | None
    radius_mapping: dict[str, str]
    source: str

    def path(self, p: str | None) -> Path | None: ...


@dataclass(frozen=True)
class Client:
    """A configured NAS: where it may send from, its secret and reply style."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    secret: bytes
    style: str
    name: str


class ClientTable:
    """Source address -> client; the most specific network wins."""

    def __init__(self, clients: list[RadiusClient], source: str = "<settings>") -> None:
        self.clients: list[Client] = []
        for i, c in enumerate(clients):
            try:
                net = ipaddress.ip_network(c.address, strict=False)
            except ValueError as exc:
                raise SettingsError(source, f"radius.clients[{i}].address", str(exc)) from None
            self.clients.append(Client(net, c.secret.encode(), c.style, c.name or c.address))
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
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[host] = found
        return found


class Mapping:
    """Which attribute fills which request field, with the decoder for its type."""

    def __init__(self, dictionary: Dictionary, overrides: dict[str, str], source: str = "<settings>") -> None:
        order: dict[str, str] = {}
        for attr, field in overrides.items():  # overrides first: they win when both are present
            order[attr] = field
        for attr, field in DEFAULT_MAPPING.items():
            order.setdefault(attr, field)
        self.entries: list[tuple[int, str, str, str]] = []  # (code, name, type, field)
        for attr, field in order.items():
            if not isinstance(field, str):
                raise SettingsError(source, f"radius.mapping.{attr}", "must be a string (a field name)")
            if field in ("", "none"):
                continue
            if field not in FIELDS and not (field.startswith("attrs.") and len(field) > 6):
                raise SettingsError(source, f"radius.mapping.{attr}",
                                    f"unknown field {field!r} (expected one of {', '.join(sorted(FIELDS))} "
                                    "or attrs.NAME)")
            if attr not in dictionary.attributes:
                if attr in DEFAULT_MAPPING:
                    continue  # a replacement dictionary without it: nothing to map
                raise SettingsError(source, f"radius.mapping.{attr}",
                                    "attribute not in the RADIUS dictionary")
            a = dictionary.attributes[attr]
            if a.vendor or a.is_sub_attribute:
                raise SettingsError(source, f"radius.mapping.{attr}",
                                    "only standard attributes can be mapped")
            self.entries.append((int(a.code), attr, str(a.type), field))

    def fields(self, attrs: dict[int, list[bytes]]) -> dict[str, Any]:
        """The request fields of a packet's attributes (`attrs.X` ones collected under `attrs`)."""
        out: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for code, _name, kind, field in self.entries:
            raw = attrs.get(code)
            if not raw:
                continue
            value = decode_value(kind, raw[0])
            if field.startswith("attrs."):
                extra.setdefault(field[6:], value)
            else:
                out.setdefault(field, value)
        if extra:
            out["attrs"] = extra
        return out


def decode_value(kind: str, raw: bytes) -> str:
    """An attribute value as the string a rule sees."""
    if kind == "string":
        return raw.decode("utf-8", "replace")
    if kind == "ipaddr" and len(raw) == 4:
        return socket.inet_ntoa(raw)
    if kind in ("integer", "date") and len(raw) == 4:
        return str(int.from_bytes(raw, "big"))
    return raw.hex()


class Parsed:
    """A well-formed packet's header fields and attributes (code -> raw values, in order)."""

    __slots__ = ("attrs", "authenticator", "code", "data", "ident", "ma_offset")

    def __init__(self, data: bytes, attrs: dict[int, list[bytes]], ma_offset: int) -> None:
        self.data = data  # without padding
        self.code = data[0]
        self.ident = data[1]
        self.authenticator = data[4:20]
        self.attrs = attrs
        self.ma_offset = ma_offset  # where the Message-Authenticator value starts, 0 = none


def parse_packet(data: bytes) -> Parsed | str:
    """Split a datagram into header and attributes; a string says why it is not a RADIUS packet.

    RFC 2865 section 3: shorter than 20 octets, or a Length field outside 20..4096 or beyond
    the datagram = silently discarded; octets after Length are padding. Section 5: an attribute
    whose length is below 2 or runs past the end makes the packet invalid too.
    """
    if len(data) < 20:
        return "truncated"
    length = (data[2] << 8) | data[3]
    if length < 20 or length > MAX_PACKET:
        return "bad_length"
    if length > len(data):
        return "truncated"
    if length < len(data):
        data = data[:length]
    attrs: dict[int, list[bytes]] = {}
    ma = 0
    pos = 20
    while pos < length:
        if pos + 2 > length:
            return "bad_attribute_length"
        code = data[pos]
        alen = data[pos + 1]
        if alen < 2 or pos + alen > length:
            return "bad_attribute_length"
        if code == ATTR_MESSAGE_AUTHENTICATOR:
            if alen != 18 or ma:
                return "bad_attribute_length"
            ma = pos + 2
        value = data[pos + 2 : pos + alen]
        got = attrs.get(code)
        if got is None:
            attrs[code] = [value]
        else:
            got.append(value)
        pos += alen
    return Parsed(data, attrs, ma)


def check_packet(data: bytes) -> str | None:
    """Why a datagram is not a well-formed RADIUS packet, or None if it is."""
    res = parse_packet(data)
    return res if isinstance(res, str) else None


def _int_attr(attrs: dict[int, list[bytes]], code: int) -> int | None:
    raw = attrs.get(code)
    if not raw or len(raw[0]) != 4:
        return None
    return int.from_bytes(raw[0], "big")


_ZERO16 = b"\x00" * 16


def message_authenticator_ok(p: Parsed, secret: bytes) -> bool:
    """RFC 2869 section 5.14 (RFC 5176 section 3.3 for Accounting-Request: zero authenticator)."""
    d = p.data
    o = p.ma_offset
    body = d[:o] + _ZERO16 + d[o + 16 :]
    if p.code == ACCOUNTING_REQUEST:
        body = body[:4] + _ZERO16 + body[20:]
    mac = hmac.digest(secret, body, "md5")
    return hmac.compare_digest(mac, d[o : o + 16])


def acct_authenticator_ok(p: Parsed, secret: bytes) -> bool:
    """RFC 2866 section 3: MD5(Code + Identifier + Length + 16 zero octets + attributes + secret)."""
    d = p.data
    digest = hashlib.md5(d[0:4] + _ZERO16 + d[20:] + secret).digest()
    return hmac.compare_digest(digest, p.authenticator)


class ReplyEncoder:
    """Reply packets: pyrad encodes the attributes of each distinct reply once; each answer then
    only gets its identifier, Message-Authenticator and Response Authenticator computed."""

    def __init__(self, dictionary: Dictionary, size: int = 1024) -> None:
        self.dict = dictionary
        self.size = size
        self.templates: dict[tuple[Any, ...], bytes] = {}

    def template(self, code: int, avps: tuple[tuple[str, Any], ...], with_ma: bool) -> bytes:
        """The encoded attributes (a zeroed Message-Authenticator first when with_ma)."""
        key = (code, avps, with_ma)
        got = self.templates.get(key)
        if got is not None:
            return got
        pkt = rp.Packet(code=code, id=0, secret=b"-", authenticator=_ZERO16, dict=self.dict)
        for name, value in avps:
            pkt.AddAttribute(name, value)
        attrs = bytes(pkt.ReplyPacket()[20:])
        if with_ma:
            attrs = bytes((ATTR_MESSAGE_AUTHENTICATOR, 18)) + _ZERO16 + attrs
        if len(self.templates) >= self.size:
            self.templates.clear()
        self.templates[key] = attrs
        return attrs

    def encode(self, request: Parsed, secret: bytes, code: int, avps: tuple[tuple[str, Any], ...],
               with_ma: bool) -> bytes:
        """The reply to `request`, signed; Proxy-State attributes copied (RFC 2865 section 5.33)."""
        attrs = self.template(code, avps, with_ma)
        for state in request.attrs.get(ATTR_PROXY_STATE, ()):
            attrs += bytes((ATTR_PROXY_STATE, len(state) + 2)) + state
        length = 20 + len(attrs)
        if length > MAX_PACKET:
            raise ValueError("reply too long")
        head = bytes((code, request.ident, length >> 8, length & 0xFF))
        if with_ma:
            mac = hmac.digest(secret, head + request.authenticator + attrs, "md5")
            attrs = attrs[:2] + mac + attrs[18:]
        auth = hashlib.md5(head + request.authenticator + attrs + secret).digest()
        return head + auth + attrs


class ReplyCache:
    """Replies by (source, identifier, authenticator), for retransmissions; None = in progress."""

    def __init__(self, ttl: float = CACHE_TTL, size: int = CACHE_SIZE) -> None:
        self.ttl = ttl
        self.size = size
        self.entries: OrderedDict[tuple[Any, ...], tuple[float, bytes | None]] = OrderedDict()

    def _expire(self, now: float) -> None:
        entries = self.entries
        while entries:
            key, (t, _) = next(iter(entries.items()))
            if now - t < self.ttl and len(entries) <= self.size:
                break
            del entries[key]

    def lookup(self, key: tuple[Any, ...], now: float) -> tuple[bool, bytes | None]:
        """(seen, reply bytes or None while in progress)."""
        self._expire(now)
        hit = self.entries.get(key)
        if hit is None:
            return False, None
        return True, hit[1]

    def begin(self, key: tuple[Any, ...], now: float) -> None:
        """Mark a packet as being processed."""
        self.entries[key] = (now, None)

    def done(self, key: tuple[Any, ...], reply: bytes | None) -> None:
        """Store the reply (None forgets the packet: its retransmission is processed again)."""
        if reply is None:
            self.entries.pop(key, None)
        elif key in self.entries:
            self.entries[key] = (self.entries[key][0], reply)


class RadiusStats:
    """Counters for `stats`."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()

    def to_json(self) -> dict[str, Any]:
        """The counters as `stats` shows them."""
        main = ("received", "answered", "dropped", "duplicates")
        body: dict[str, Any] = {k: self.c.get(k, 0) for k in main}
        body.update(sorted((k, v) for k, v in self.c.items() if k not in body))
        body["drop_reasons"] = dict(sorted(self.drops.items()))
        return body


class RadiusProtocol(asyncio.DatagramProtocol):
    """One UDP socket: the auth port, the acct port, or both when they are the same address."""

    def __init__(self, kinds: frozenset[str], service: _Service, clients: ClientTable, dictionary: Dictionary,
                 mapping: Mapping, stats: RadiusStats, cache: ReplyCache, encoder: ReplyEncoder) -> None:
        self.kinds = kinds
        self.codes = {STATUS_SERVER} | ({ACCESS_REQUEST} if "auth" in kinds else set()) | (
            {ACCOUNTING_REQUEST} if "acct" in kinds else set())
        self.service = service
        self.clients = clients
        self.dict = dictionary
        self.mapping = mapping
        self.stats = stats
        self.cache = cache
        self.encoder = encoder
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._log_second = 0
        self._log_count = 0

    # -- plumbing --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        log.warning("radius_socket_error", error=str(exc))

    def _send(self, data: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)
            self.stats.c["answered"] += 1

    def _drop(self, reason: str, addr: Any, **kw: Any) -> None:
        self.stats.c["dropped"] += 1
        self.stats.drops[reason] += 1
        now = int(time.monotonic())
        if now != self._log_second:
            self._log_second, self._log_count = now, 0
        self._log_count += 1
        if self._log_count <= LOG_BURST:
            log.warning("radius_dropped", reason=reason, peer=f"{addr[0]}:{addr[1]}", **kw)

    # -- receive ---------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stats.c["received"] += 1
        try:
            self._receive(data, addr)
        except Exception as exc:  # a bug or an undecodable corner: never let it reach the loop
            log.exception("radius_internal_error", peer=str(addr))
            self._drop("internal_error", addr, error=type(exc).__name__)

    def _receive(self, data: bytes, addr: Any) -> None:
        client = self.clients.match(addr[0])
        if client is None:
            self._drop("unknown_client", addr)
            return
        p = parse_packet(data)
        if isinstance(p, str):
            self._drop(p, addr, client=client.name, size=len(data))
            return
        code = p.code
        if code not in self.codes:
            self._drop("unexpected_code", addr, client=client.name, code=code)
            return
        key = (addr[0], addr[1], p.ident, p.authenticator)
        now = time.monotonic()
        seen, cached = self.cache.lookup(key, now)
        if seen:
            self.stats.c["duplicates"] += 1
            if cached is not None:
                self._send(cached, addr)
            return
        if code == ACCOUNTING_REQUEST and not acct_authenticator_ok(p, client.secret):
            self._drop("bad_authenticator", addr, client=client.name)
            return
        if p.ma_offset:
            if not message_authenticator_ok(p, client.secret):
                self._drop("bad_message_authenticator", addr, client=client.name)
                return
        elif code == STATUS_SERVER:
            self._drop("status_server_without_message_authenticator", addr, client=client.name)
            return
        self.cache.begin(key, now)
        if code == STATUS_SERVER:
            self._status_server(p, client, key, addr)
            return
        task = self.loop.create_task(self._process(p, client, key, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _process(self, p: Parsed, client: Client, key: tuple[Any, ...], addr: Any) -> None:
        reply: bytes | None = None
        try:
            if p.code == ACCESS_REQUEST:
                reply = await self._access(p, client)
            else:
                reply = await self._accounting(p, client)
        except Exception:
            log.exception("radius_internal_error", peer=str(addr))
            self.stats.c["errors"] += 1
        self.cache.done(key, reply)
        if reply is not None:
            self._send(reply, addr)

    def _status_server(self, p: Parsed, client: Client, key: tuple[Any, ...], addr: Any) -> None:
        # RFC 5997: Access-Accept on the auth port, Accounting-Response on the acct port
        code = rp.AccessAccept if "auth" in self.kinds else rp.AccountingResponse
        data = self.encoder.encode(p, client.secret, code, (), with_ma=True)
        self.stats.c["status_server"] += 1
        self.cache.done(key, data)
        self._send(data, addr)

    # -- Access-Request -> check ---------------------------------------------------------------

    async def _access(self, p: Parsed, client: Client) -> bytes:
        msg = self.mapping.fields(p.attrs)
        msg["op"] = "check"
        res = await self.service.handle(msg)
        code = rp.AccessAccept
        avps: tuple[tuple[str, Any], ...]
        if not res.get("ok"):
            err = res.get("error") or {}
            reason = f"{err.get('code', 'error')}: {err.get('message', '')}"
            self.stats.c["check_errors"] += 1
            log.warning("radius_check_error", client=client.name, call_id=msg.get("call_id"), error=reason)
            if client.style == "avp":
                avps = (("SIP-AVP", "policy:error"), ("SIP-AVP", "policy_code#500"),
                        ("SIP-AVP", _avp_text("policy_reason:", reason)))
            else:
                code = rp.AccessReject
                avps = (("Reply-Message", _clip(reason)),)
        elif res.get("decision") == "allow":
            self.stats.c["access_accept"] += 1
            avps = (("SIP-AVP", "policy:allow"),) if client.style == "avp" else ()
        else:
            deny_code = int(res.get("code") or 486)
            reason = str(res.get("reason") or "Call limit reached")
            rule = str(res.get("rule") or "")
            if client.style == "avp":
                self.stats.c["access_accept_deny"] += 1
                avps = (("SIP-AVP", "policy:deny"), ("SIP-AVP", f"policy_code#{deny_code}"),
                        ("SIP-AVP", _avp_text("policy_reason:", reason)))
                if rule:
                    avps += (("SIP-AVP", _avp_text("policy_rule:", rule)),)
            else:
                self.stats.c["access_reject"] += 1
                code = rp.AccessReject
                avps = (("Reply-Message", _clip(reason)),)
        # replies to Access-Request always carry a Message-Authenticator (BlastRADIUS, RFC 9765 draft)
        return self.encoder.encode(p, client.secret, code, avps, with_ma=True)

    # -- Accounting-Request -> answer / refresh / end ------------------------------------------

    async def _accounting(self, p: Parsed, client: Client) -> bytes | None:
        status = _int_attr(p.attrs, ATTR_ACCT_STATUS_TYPE)
        fields = self.mapping.fields(p.attrs)
        msg: dict[str, Any] | None
        if status == STATUS_START:
            msg = {**fields, "op": "answer", "create": True}
            name = "acct_start"
        elif status == STATUS_INTERIM:
            msg = {"op": "refresh", "call_id": fields.get("call_id")}
            name = "acct_interim"
        elif status == STATUS_STOP:
            msg = {"op": "end", "call_id": fields.get("call_id"), "reason": "bye"}
            name = "acct_stop"
        elif status == STATUS_FAILED:
            sip_code = _int_attr(p.attrs, ATTR_SIP_RESPONSE_CODE)
            msg = {"op": "end", "call_id": fields.get("call_id"),
                   "reason": "cancel" if sip_code == 487 else "failed"}
            name = "acct_failed"
        else:
            msg = None
            name = "acct_on_off" if status in (STATUS_ON, STATUS_OFF) else "acct_other"
        self.stats.c[name] += 1
        if msg is not None:
            res = await self.service.handle(msg)
            if not res.get("ok"):
                err = res.get("error") or {}
                if err.get("code") == "store_error":
                    # not recorded: no answer, the NAS retransmits and we try again
                    self.stats.c["acct_unanswered_store_error"] += 1
                    log.warning("radius_acct_store_error", client=client.name, call_id=msg.get("call_id"),
                                error=err.get("message"))
                    return None
                self.stats.c["acct_errors"] += 1
                log.warning("radius_acct_error", client=client.name, status=status,
                            call_id=msg.get("call_id"), error=err.get("message"))
        return self.encoder.encode(p, client.secret, rp.AccountingResponse, (), with_ma=False)


def _clip(text: str, prefix: bytes = b"") -> str:
    """Fit a value into one attribute (253 octets) without splitting a UTF-8 character."""
    room = 253 - len(prefix)
    raw = text.encode("utf-8")
    if len(raw) <= room:
        return text
    return raw[:room].decode("utf-8", "ignore")


def _avp_text(prefix: str, text: str) -> str:
    return prefix + _clip(text, prefix.encode())


def load_dictionary(settings: _Settings) -> Dictionary:
    """The configured dictionary, or the shipped one."""
    path = settings.path(settings.radius_dictionary) if settings.radius_dictionary else DICTIONARY
    try:
        return Dictionary(str(path))
    except Exception as exc:
        raise SettingsError(settings.source, "radius.dictionary", f"cannot load {path}: {exc}") from None


async def start_radius(service: _Service, settings: _Settings) -> tuple[Callable[[], Any], dict[str, str]]:
    """Open the RADIUS listeners; returns (closer, {"radius_auth": "host:port", ...})."""
    dictionary = load_dictionary(settings)
    for needed in ("SIP-AVP", "Reply-Message"):
        if needed not in dictionary.attributes:
            raise SettingsError(settings.source, "radius.dictionary", f"does not define {needed}")
    mapping = Mapping(dictionary, dict(settings.radius_mapping), settings.source)
    clients = ClientTable(list(settings.radius_clients), settings.source)
    if not clients.clients:
        log.warning("radius_no_clients", note="every RADIUS packet will be dropped")
    stats = RadiusStats()
    cache = ReplyCache()
    encoder = ReplyEncoder(dictionary)
    loop = asyncio.get_running_loop()
    wanted: dict[tuple[str, int], set[str]] = {}
    for kind, value, default in (("auth", settings.radius_auth, AUTH_PORT),
                                 ("acct", settings.radius_acct, ACCT_PORT)):
        if value:
            wanted.setdefault(split_hostport(value, default), set()).add(kind)
    transports: list[asyncio.DatagramTransport] = []
    protocols: list[RadiusProtocol] = []
    where: dict[str, str] = {}
    try:
        for (host, port), kinds in wanted.items():
            proto_kinds = frozenset(kinds)
            transport, proto = await loop.create_datagram_endpoint(
                functools.partial(RadiusProtocol, proto_kinds, service, clients, dictionary, mapping, stats,
                                  cache, encoder),
                local_addr=(host, port))
            transports.append(transport)
            protocols.append(proto)
            sock = transport.get_extra_info("sockname")
            for kind in sorted(kinds):
                where[f"radius_{kind}"] = f"{sock[0]}:{sock[1]}"
    except BaseException:
        for t in transports:
            t.close()
        raise
    service.info_providers["radius"] = stats.to_json
    log.info("radius_listening", **where, clients=[c.name for c in clients.clients])

    async def close() -> None:
        for t in transports:
            t.close()
        pending = [task for p in protocols for task in p.tasks]
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    return close, where
