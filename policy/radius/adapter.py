"""RADIUS packets <-> the service's operations. Pure apart from calling the service.

`RadiusAdapter.receive(data, host, port, codes)` takes one datagram and its source and
returns what to do: `None` (drop, or wait: an earlier copy is being answered), the bytes of
a reply to send now, or a coroutine that calls the service and returns the reply bytes (or
None: send nothing, the NAS retransmits). The socket side is `policy.transports.radius`.

Checked in this order, each failure dropped (never answered) and counted under
`drop_reasons` in `stats`:

1. the source matches a client (`unknown_client`), the bytes are a packet (`packet.parse`:
   `truncated`, `bad_length`, `bad_attribute_length`) of a code the port serves
   (`unexpected_code`);
2. a retransmission (same source address and port, identifier and Request Authenticator
   within `CACHE_TTL`) gets the cached reply again and is not applied again (`duplicates`);
3. an Accounting-Request's Request Authenticator verifies (`bad_authenticator`); a
   Message-Authenticator, when present, verifies (`bad_message_authenticator`); a
   Status-Server has one (RFC 5997); an Access-Request has one unless its client opts out
   with `require_message_authenticator = false` (`no_message_authenticator`, also counted as
   `dropped_no_message_authenticator`): without it an Access-Request proves nothing (its
   authenticator is random), so a wrong secret would be answered and could reserve slots;
4. replays (see `ReplayFilter`): an Access-Request whose Request Authenticator was seen
   within the replay memory (`replayed_access_request`), an Accounting-Request whose
   Event-Timestamp (+ Acct-Delay-Time) is more than `replay_window` away from the service
   clock (`stale_event_timestamp`); an accounting record already applied is answered
   (so the NAS stops) but not applied again (`replays`).

Accounting-Request: Start -> `answer` with `create` (the call is counted even if no check
saw it), except for a call whose Stop/Failed was applied within the replay memory: then it
only answers a held call (a new admission of the same identity, e.g. after a 407), and
never re-creates one (`acct_start_after_end`); Interim-Update -> `refresh`; Stop -> `end`
(bye); Failed -> `end` (cancel for Sip-Response-Code 487, else failed); Accounting-On/Off
-> every call admitted through that NAS (`node`) is released (reason `reconciled`). RADIUS
accounting has nowhere to carry the admission token: these go by call identity
(Acct-Session-Id + Sip-From-Tag) alone, with the replay filter in front.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from pyrad.dictionary import Dictionary

from policy import protocol as P
from policy.auth import Peer
from policy.clock import Clock
from policy.errors import SettingsError, StoreError
from policy.radius import packet as pk
from policy.radius.clients import Client, ClientTable
from policy.store.base import MAX_PAGE, CallRecord, CounterStore, call_uid

CACHE_TTL = 30.0  # seconds a reply is kept for retransmissions
CACHE_SIZE = 65536

STATUS_START = 1
STATUS_STOP = 2
STATUS_INTERIM = 3
STATUS_ON = 7
STATUS_OFF = 8
STATUS_FAILED = 15

#: attribute -> request field; `[radius] mapping` overrides it (docs/radius.md)
DEFAULT_MAPPING: dict[str, str] = {
    "Acct-Session-Id": "call_id",
    "Sip-From-Tag": "from_tag",
    "User-Name": "account",
    "Calling-Station-Id": "from",
    "Called-Station-Id": "to",
    "NAS-IP-Address": "src_ip",
    "Sip-Translated-Request-URI": "ruri",
}
# The request fields an attribute may fill: the call fields of the protocol (one list,
# policy.protocol.CallFields), minus the envelope and the maps (`attrs.NAME` fills attrs).
_ENVELOPE = frozenset({"id", "tindex", "tlabel", "attrs", "vars"})
_STRUCT_NAME = {enc: name for enc, name in zip(P.CallFields.__struct_encode_fields__,
                                               P.CallFields.__struct_fields__, strict=True)
                if enc not in _ENVELOPE}
FIELDS = frozenset(_STRUCT_NAME)
# attributes left out of an accounting record's identity: they change on retransmission
# (Acct-Delay-Time, RFC 2866 section 5.2), or are per hop / per packet
_NOT_RECORD = frozenset({pk.ATTR_ACCT_DELAY_TIME, pk.ATTR_MESSAGE_AUTHENTICATOR, pk.ATTR_PROXY_STATE})


class ServiceLike(Protocol):
    """What the adapter needs of `policy.service.PolicyService`."""

    store: CounterStore
    clock: Clock
    info_providers: dict[str, Callable[[], Any]]

    async def handle(self, req: P.Request | dict[str, Any], peer: Peer = ...) -> dict[str, Any]: ...

    def ended(self, rec: CallRecord, reason: str, now: float) -> None: ...


class EventLog(Protocol):
    """Where the adapter reports (a structlog logger fits; the transport rate-limits it)."""

    def info(self, event: str, **kw: Any) -> Any: ...

    def warning(self, event: str, **kw: Any) -> Any: ...


class _Quiet:
    def info(self, event: str, **kw: Any) -> None:
        return None

    def warning(self, event: str, **kw: Any) -> None:
        return None


class Mapping:
    """Which attribute fills which request field, with the decoder for its type."""

    def __init__(self, dictionary: Dictionary, overrides: dict[str, str], source: str = "<settings>") -> None:
        order: dict[str, str] = {}
        for attr, field in overrides.items():  # overrides first: they win when both are present
            order[attr] = field
        for attr, field in DEFAULT_MAPPING.items():
            order.setdefault(attr, field)
        self.entries: list[tuple[int, str, str, str]] = []  # (code, name, type, struct field or attrs.X)
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
                raise SettingsError(source, f"radius.mapping.{attr}", "attribute not in the RADIUS dictionary")
            a = dictionary.attributes[attr]
            if a.vendor or a.is_sub_attribute:
                raise SettingsError(source, f"radius.mapping.{attr}", "only standard attributes can be mapped")
            self.entries.append((int(a.code), attr, str(a.type), _STRUCT_NAME.get(field, field)))

    def fields(self, attrs: dict[int, list[bytes]]) -> dict[str, Any]:
        """A packet's request fields as keyword arguments of the protocol's structs (`from_`
        for `from`; `attrs.X` ones collected under `attrs`). The first instance of each wins."""
        out: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for code, _name, kind, field in self.entries:
            raw = attrs.get(code)
            if not raw:
                continue
            value = pk.decode_value(kind, raw[0])
            if field.startswith("attrs."):
                extra.setdefault(field[6:], value)
            else:
                out.setdefault(field, value)
        if extra:
            out["attrs"] = extra
        return out


class RadiusStats:
    """Counters for `stats`."""

    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.info: dict[str, Callable[[], Any]] = {}

    def to_json(self) -> dict[str, Any]:
        """The counters as `stats` shows them."""
        main = ("received", "answered", "dropped", "duplicates", "replays", "dropped_no_message_authenticator")
        body: dict[str, Any] = {k: self.c.get(k, 0) for k in main}
        body.update(sorted((k, v) for k, v in self.c.items() if k not in body))
        body["drop_reasons"] = dict(sorted(self.drops.items()))
        for name, provider in self.info.items():
            body[name] = provider()
        return body


class ReplyCache:
    """Replies by (source address, port, identifier, authenticator), for retransmissions;
    None while the first copy is being processed."""

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


class SeenSet:
    """Keys (ints) remembered for at least `ttl` seconds, in time buckets: an expired bucket
    goes as a whole, and when more than `capacity` keys are held the oldest bucket goes early
    (counted in `evicted`), so memory stays bounded whatever the rate."""

    def __init__(self, ttl: float, capacity: int, buckets: int = 8) -> None:
        self.ttl = ttl
        self.width = ttl / buckets
        self.capacity = capacity
        self.buckets: deque[tuple[float, set[int]]] = deque()
        self.size = 0
        self.evicted = 0

    def _expire(self, now: float) -> None:
        b = self.buckets
        while b and b[0][0] + self.width + self.ttl <= now:
            self.size -= len(b.popleft()[1])

    def __contains__(self, key: int) -> bool:
        return any(key in s for _, s in self.buckets)

    def seen(self, key: int, now: float) -> bool:
        """Whether `key` was added within the last `ttl` seconds (at most `ttl` + one bucket)."""
        self._expire(now)
        return key in self

    def add(self, key: int, now: float) -> None:
        """Remember `key` from `now` on."""
        self._expire(now)
        b = self.buckets
        if not b or now >= b[-1][0] + self.width:
            b.append((now, set()))
        current = b[-1][1]
        if key not in current:
            current.add(key)
            self.size += 1
        while self.size > self.capacity and b:
            gone = b.popleft()[1]
            self.size -= len(gone)
            self.evicted += len(gone)

    def discard(self, key: int) -> None:
        """Forget `key`."""
        for _, s in self.buckets:
            if key in s:
                s.discard(key)
                self.size -= 1


class ReplayFilter:
    """What stops a captured packet from being applied again (docs/radius.md, "Replays").

    - Accounting record identity: the client and every attribute but Acct-Delay-Time,
      Message-Authenticator and Proxy-State (RFC 2866: a retransmission only updates
      Acct-Delay-Time). A record applied within 2 x `window` is not applied again.
    - Freshness: an accounting request with Event-Timestamp must satisfy
      |now - (Event-Timestamp + Acct-Delay-Time)| <= `window`, so a capture goes stale
      `window` seconds after it was sent, and the memory above (2 x `window`) outlives it.
    - Ended calls: a call whose Stop/Failed was applied within 2 x `window` is not created
      again by a Start.
    - Access-Request: its Request Authenticator is random and never reused by a NAS
      (retransmissions come from the same port and are the reply cache's): one seen from
      the same client within 2 x `window` is a replay.

    Keys are Python hashes (64 bits, salted per process) of tuples: a false match needs a
    64-bit collision. Memory: about 60-70 bytes a key, at most `capacity` keys.
    """

    def __init__(self, window: float, capacity: int) -> None:
        self.window = window
        self.memory = SeenSet(2 * window, capacity)
        self.pending: set[int] = set()  # accounting records being applied now

    def skew(self, p: pk.Packet, now: float) -> float | None:
        """How far an accounting request's Event-Timestamp (+ Acct-Delay-Time) is from `now`
        when outside the window; None when it is fresh or carries no Event-Timestamp."""
        ts = p.integer(pk.ATTR_EVENT_TIMESTAMP)
        if ts is None:
            return None
        sent = ts + (p.integer(pk.ATTR_ACCT_DELAY_TIME) or 0)
        skew = now - sent
        return skew if abs(skew) > self.window else None

    @staticmethod
    def record_key(client: Client, p: pk.Packet) -> int:
        """The identity of an accounting record (see the class docstring)."""
        return hash(("acct", client.name, tuple((c, *v) for c, v in p.attrs.items() if c not in _NOT_RECORD)))

    @staticmethod
    def access_key(client: Client, p: pk.Packet) -> int:
        """The identity of an Access-Request: its client and Request Authenticator."""
        return hash(("auth", client.name, p.authenticator))

    @staticmethod
    def ended_key(uid: str) -> int:
        """The key under which a call's end is remembered."""
        return hash(("ended", uid))

    def info(self) -> dict[str, Any]:
        """Size and pressure, for `stats`."""
        return {"window": self.window, "entries": self.memory.size, "capacity": self.memory.capacity,
                "evicted": self.memory.evicted}


Outcome = bytes | Coroutine[Any, Any, bytes | None] | None


class RadiusAdapter:
    """Datagrams -> the service's operations -> signed replies (see the module docstring)."""

    def __init__(self, service: ServiceLike, clients: ClientTable, mapping: Mapping,
                 encoder: pk.ReplyAttributes, *, replay_window: float = 300.0,
                 replay_entries: int = 1_000_000, events: EventLog | None = None,
                 stats: RadiusStats | None = None) -> None:
        self.service = service
        self.clients = clients
        self.mapping = mapping
        self.encoder = encoder
        self.clock = service.clock
        self.events: EventLog = events or _Quiet()
        self.stats = stats or RadiusStats()
        self.cache = ReplyCache()
        self.replay = ReplayFilter(replay_window, replay_entries)
        self.stats.info["replay_filter"] = self.replay.info

    # -- the entry point -------------------------------------------------------------------

    def receive(self, data: bytes, host: str, port: int, codes: frozenset[int]) -> Outcome:
        """One datagram from (host, port) on a socket serving `codes`; see the module docstring."""
        c = self.stats.c
        c["received"] += 1
        client = self.clients.match(host)
        if client is None:
            return self._drop("unknown_client", host, port)
        try:
            p = pk.parse(data)
        except pk.RadiusError as exc:
            return self._drop(exc.reason, host, port, client=client.name, size=len(data))
        code = p.code
        if code not in codes:
            return self._drop("unexpected_code", host, port, client=client.name, code=code)
        now = self.clock.now()
        key = (host, port, p.ident, p.authenticator)
        seen, cached = self.cache.lookup(key, now)
        if seen:
            c["duplicates"] += 1
            return cached
        secret = client.secret
        if code == pk.ACCOUNTING_REQUEST and not pk.acct_authenticator_ok(p, secret):
            return self._drop("bad_authenticator", host, port, client=client.name)
        if p.ma_offset:
            if not pk.message_authenticator_ok(p, secret):
                return self._drop("bad_message_authenticator", host, port, client=client.name)
        elif code == pk.STATUS_SERVER:
            return self._drop("status_server_without_message_authenticator", host, port, client=client.name)
        elif code == pk.ACCESS_REQUEST and client.require_message_authenticator:
            c["dropped_no_message_authenticator"] += 1
            return self._drop("no_message_authenticator", host, port, client=client.name)
        if code == pk.STATUS_SERVER:
            # RFC 5997: Access-Accept on the auth port, Accounting-Response on the acct port
            c["status_server"] += 1
            answer = pk.ACCESS_ACCEPT if pk.ACCESS_REQUEST in codes else pk.ACCOUNTING_RESPONSE
            out = self._reply(p, client, answer, (), with_ma=True)
            self.cache.begin(key, now)
            self.cache.done(key, out)
            return out
        replay = self.replay
        if code == pk.ACCESS_REQUEST:
            rkey = replay.access_key(client, p)
            if replay.memory.seen(rkey, now):
                return self._drop("replayed_access_request", host, port, client=client.name)
            replay.memory.add(rkey, now)
            self.cache.begin(key, now)
            return self._access(p, client, host, key, rkey)
        skew = replay.skew(p, now)
        if skew is not None:
            return self._drop("stale_event_timestamp", host, port, client=client.name, skew=round(skew),
                              window=replay.window)
        rkey = replay.record_key(client, p)
        if rkey in replay.pending:
            c["duplicates"] += 1  # the same record from another port, still being applied
            return None
        if replay.memory.seen(rkey, now):
            c["replays"] += 1
            self.events.warning("radius_replay", reason="accounting record already applied", client=client.name,
                                peer=f"{host}:{port}", status=p.integer(pk.ATTR_ACCT_STATUS_TYPE))
            out = self._reply(p, client, pk.ACCOUNTING_RESPONSE, (), with_ma=False)
            self.cache.begin(key, now)
            self.cache.done(key, out)
            return out
        replay.pending.add(rkey)
        self.cache.begin(key, now)
        return self._accounting(p, client, host, key, rkey)

    # -- plumbing ----------------------------------------------------------------------------

    def _drop(self, reason: str, host: str, port: int, **kw: Any) -> bytes | None:
        """Count and report a dropped datagram; nothing is sent (returns None)."""
        self.stats.c["dropped"] += 1
        self.stats.drops[reason] += 1
        self.events.warning("radius_dropped", reason=reason, peer=f"{host}:{port}", **kw)
        return None

    def _reply(self, p: pk.Packet, client: Client, code: int, avps: tuple[tuple[str, Any], ...],
               with_ma: bool) -> bytes | None:
        try:
            return pk.reply(p, client.secret, code, self.encoder.encode(code, avps, with_ma), with_ma)
        except pk.RadiusError as exc:  # Proxy-State copies made it too long
            self.stats.c["dropped"] += 1
            self.stats.drops[exc.reason] += 1
            self.events.warning("radius_dropped", reason=exc.reason, client=client.name)
            return None

    # -- Access-Request -> check -------------------------------------------------------------

    async def _access(self, p: pk.Packet, client: Client, host: str, key: tuple[Any, ...],
                      rkey: int) -> bytes | None:
        out: bytes | None = None
        try:
            fields = self.mapping.fields(p.attrs)
            if not fields.get("call_id"):
                res = P.error("missing_field", "'call_id' is required (Acct-Session-Id)")
            else:
                res = await self.service.handle(P.Check(**fields), client.peer(host))
            out = self._access_reply(p, client, res, fields.get("call_id"))
        except Exception as exc:  # a bug: never let it reach the loop
            self.stats.c["errors"] += 1
            self.events.warning("radius_internal_error", client=client.name, error=repr(exc))
        if out is None:
            self.replay.memory.discard(rkey)  # its retransmission is processed again
        self.cache.done(key, out)
        return out

    def _access_reply(self, p: pk.Packet, client: Client, res: dict[str, Any], call_id: str | None) -> bytes | None:
        c = self.stats.c
        code = pk.ACCESS_ACCEPT
        avps: tuple[tuple[str, Any], ...]
        avp_style = client.style == "avp"
        if not res.get("ok"):
            err = res.get("error") or {}
            reason = f"{err.get('code', 'error')}: {err.get('message', '')}"
            c["check_errors"] += 1
            self.events.warning("radius_check_error", client=client.name, call_id=call_id, error=reason)
            if avp_style:
                avps = (("SIP-AVP", "policy:error"), ("SIP-AVP", "policy_code#500"),
                        ("SIP-AVP", pk.clip(reason, "policy_reason:")))
            else:
                code = pk.ACCESS_REJECT
                avps = (("Reply-Message", pk.clip(reason)),)
        elif res.get("decision") == "allow":
            c["access_accept"] += 1
            avps = (("SIP-AVP", "policy:allow"),) if avp_style else ()
        else:
            deny_code = int(res.get("code") or 486)
            reason = str(res.get("reason") or "Call limit reached")
            rule = str(res.get("rule") or "")
            if avp_style:
                c["access_accept_deny"] += 1
                avps = (("SIP-AVP", "policy:deny"), ("SIP-AVP", f"policy_code#{deny_code}"),
                        ("SIP-AVP", pk.clip(reason, "policy_reason:")))
                if rule:
                    avps += (("SIP-AVP", pk.clip(rule, "policy_rule:")),)
            else:
                c["access_reject"] += 1
                code = pk.ACCESS_REJECT
                avps = (("Reply-Message", pk.clip(reason)),)
        # replies to Access-Request always carry a Message-Authenticator (BlastRADIUS, CVE-2024-3596)
        return self._reply(p, client, code, avps, with_ma=True)

    # -- Accounting-Request -> answer / refresh / end / release --------------------------------

    async def _accounting(self, p: pk.Packet, client: Client, host: str, key: tuple[Any, ...],
                          rkey: int) -> bytes | None:
        out: bytes | None = None
        applied = False
        try:
            applied = await self._apply(p, client, host)
            if applied:
                out = self._reply(p, client, pk.ACCOUNTING_RESPONSE, (), with_ma=False)
        except Exception as exc:  # a bug: never let it reach the loop
            self.stats.c["errors"] += 1
            self.events.warning("radius_internal_error", client=client.name, error=repr(exc))
        finally:
            self.replay.pending.discard(rkey)
        if applied:
            self.replay.memory.add(rkey, self.clock.now())
        self.cache.done(key, out)
        return out

    async def _apply(self, p: pk.Packet, client: Client, host: str) -> bool:
        """Apply one accounting request; False when it could not be recorded (no answer: the NAS
        retransmits), True when it is done with (applied, ignored or refused for good)."""
        c = self.stats.c
        status = p.integer(pk.ATTR_ACCT_STATUS_TYPE)
        if status in (STATUS_ON, STATUS_OFF):
            c["acct_on_off"] += 1
            return await self._release_node(client, host, "on" if status == STATUS_ON else "off")
        name = {STATUS_START: "acct_start", STATUS_INTERIM: "acct_interim", STATUS_STOP: "acct_stop",
                STATUS_FAILED: "acct_failed"}.get(status or 0)
        if name is None:
            c["acct_other"] += 1
            return True
        c[name] += 1
        fields = self.mapping.fields(p.attrs)
        call_id = fields.get("call_id")
        if not call_id:
            c["acct_errors"] += 1
            self.events.warning("radius_acct_error", client=client.name, status=status,
                                error="no call_id (Acct-Session-Id)")
            return True
        from_tag = fields.get("from_tag", "")
        ended = ReplayFilter.ended_key(call_uid(call_id, from_tag))
        req: P.Request
        if status == STATUS_START:
            after_end = self.replay.memory.seen(ended, self.clock.now())
            if after_end:
                # its Stop/Failed was applied: answer a held call (a new admission of the same
                # identity), never create it again
                c["acct_start_after_end"] += 1
                self.events.warning("radius_start_after_end", client=client.name, call_id=call_id,
                                    from_tag=from_tag or None)
            req = P.Answer(create=not after_end, **fields)
        elif status == STATUS_INTERIM:
            req = P.Refresh(call_id=call_id, from_tag=from_tag)
        elif status == STATUS_STOP:
            req = P.End(call_id=call_id, from_tag=from_tag, reason="bye")
        else:
            sip_code = p.integer(pk.ATTR_SIP_RESPONSE_CODE)
            req = P.End(call_id=call_id, from_tag=from_tag, reason="cancel" if sip_code == 487 else "failed")
        res = await self.service.handle(req, client.peer(host))
        if not res.get("ok"):
            err = res.get("error") or {}
            if err.get("code") == "store_error":
                # not recorded: no answer, the NAS retransmits and we try again
                c["acct_unanswered_store_error"] += 1
                self.events.warning("radius_acct_store_error", client=client.name, call_id=call_id,
                                    error=err.get("message"))
                return False
            c["acct_errors"] += 1
            self.events.warning("radius_acct_error", client=client.name, status=status, call_id=call_id,
                                error=err.get("message"))
        if status in (STATUS_STOP, STATUS_FAILED):
            self.replay.memory.add(ended, self.clock.now())
        return True

    async def _release_node(self, client: Client, host: str, which: str) -> bool:
        """Accounting-On/Off: the NAS (re)started or stops, so none of its calls is up any more."""
        node = client.node(host)
        store = self.service.store
        released = 0
        try:
            while True:  # always from the first page: released calls leave the listing
                now = self.clock.now()
                page = await store.node_calls(node, now, "", MAX_PAGE)
                progressed = False
                for rec in page.items:
                    gone = await store.end(rec.uid, now, "reconciled")
                    if gone is not None:
                        released += 1
                        progressed = True
                        self.service.ended(gone, "reconciled", now)
                if not progressed:
                    break
        except StoreError as exc:
            self.stats.c["acct_unanswered_store_error"] += 1
            self.events.warning("radius_acct_store_error", client=client.name, node=node, error=str(exc),
                                released=released)
            return False
        self.stats.c["released_on_off"] += released
        self.events.info("radius_nas_accounting_" + which, client=client.name, node=node, released=released)
        return True
