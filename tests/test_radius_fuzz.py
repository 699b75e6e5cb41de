"""Fuzzing the pure RADIUS layers with Hypothesis: the codec (any bytes -> a packet or a
RadiusError, never anything else; what it builds it parses back and verifies) and the adapter
(random attribute sets in signed packets -> a verified reply or a clean drop, never an
internal error), the adapter driving a real service on the embedded store."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrad.dictionary import Dictionary

from policy.clock import ManualClock
from policy.radius import DICTIONARY
from policy.radius import packet as pk
from policy.radius.adapter import Mapping, RadiusAdapter
from policy.radius.clients import ClientTable
from policy.service import PolicyService
from policy.settings import RadiusClient
from policy.store.embedded import EmbeddedStore
from tests.helpers import RULES

SECRET = b"fuzz-secret"
ALL_CODES = frozenset({pk.ACCESS_REQUEST, pk.ACCOUNTING_REQUEST, pk.STATUS_SERVER})


# -- the codec -------------------------------------------------------------------------------------


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=4200))
def test_any_bytes_parse_or_radius_error(data: bytes) -> None:
    try:
        p = pk.parse(data)
    except pk.RadiusError as exc:
        assert exc.reason in {"truncated", "bad_length", "bad_attribute_length"}
        return
    assert 20 <= len(p.data) <= 4096 and p.data == data[: len(p.data)]
    # whatever parsed can be checked and answered without raising anything but RadiusError
    pk.acct_authenticator_ok(p, SECRET)
    pk.message_authenticator_ok(p, SECRET)
    try:
        out = pk.reply(p, SECRET, pk.ACCESS_ACCEPT, b"", with_ma=False)
    except pk.RadiusError as exc:
        assert exc.reason == "reply_too_long"
    else:
        assert pk.reply_ok(p.authenticator, out, SECRET)


raw_attr = st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=260))


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.lists(raw_attr, max_size=30), st.integers(-3, 3))
def test_attribute_streams_with_lying_lengths(code: int, ident: int, attrs: list[tuple[int, int, bytes]],
                                              skew: int) -> None:
    """A header whose Length is near the truth, attributes whose length octets may lie."""
    body = b"".join(bytes((c, n)) + v for c, n, v in attrs)
    length = max(0, min(65535, 20 + len(body) + skew))
    data = struct.pack("!BBH", code, ident, length) + b"\x01" * 16 + body
    try:
        p = pk.parse(data)
    except pk.RadiusError:
        return
    assert sum(len(v) + 2 for vs in p.attrs.values() for v in vs) == len(p.data) - 20


attr_value = st.binary(max_size=253)
attr = st.tuples(st.integers(0, 255).filter(lambda c: c != pk.ATTR_MESSAGE_AUTHENTICATOR), attr_value)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([pk.ACCESS_REQUEST, pk.ACCOUNTING_REQUEST, pk.STATUS_SERVER]), st.integers(0, 255),
       st.lists(attr, max_size=12), st.booleans(), st.binary(min_size=1, max_size=40))
def test_what_the_codec_builds_it_parses_and_verifies(code: int, ident: int, attrs: list[tuple[int, bytes]],
                                                       ma: bool, secret: bytes) -> None:
    data = pk.request(code, ident, attrs, secret, message_authenticator=ma)
    p = pk.parse(data)
    assert (p.code, p.ident) == (code, ident)
    got = [(c, v) for c, vs in p.attrs.items() for v in vs if c != pk.ATTR_MESSAGE_AUTHENTICATOR]
    assert sorted(got) == sorted(attrs)
    assert pk.message_authenticator_ok(p, secret) == ma
    if ma:
        assert not pk.message_authenticator_ok(p, secret + b"x")
    if code == pk.ACCOUNTING_REQUEST:
        assert pk.acct_authenticator_ok(p, secret) and not pk.acct_authenticator_ok(p, secret + b"x")


# -- the adapter -----------------------------------------------------------------------------------


class _World:
    """One service + adapter shared by every example (state carries over, as in production)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock()
        self.store = EmbeddedStore(clock=self.clock.now)
        self.service = PolicyService(RULES, self.store, clock=self.clock, default_timeout=600.0)
        d = Dictionary(str(DICTIONARY))
        clients = ClientTable([RadiusClient("127.0.0.1", SECRET.decode(), "reject", "strict"),
                               RadiusClient("127.0.0.2", SECRET.decode(), "avp", "lax", False),
                               RadiusClient("10.0.0.0/8", SECRET.decode(), "avp", "farm")])
        self.adapter = RadiusAdapter(self.service, clients, Mapping(d, {"Sip-URI-User": "attrs.uri_user"}),
                                     pk.ReplyAttributes(d), replay_window=60.0, replay_entries=5000)

    def run(self, out: Any) -> bytes | None:
        if out is None or isinstance(out, bytes):
            return out
        result: bytes | None = self.loop.run_until_complete(out)
        return result


_world: _World | None = None


def world() -> _World:
    global _world
    if _world is None:
        _world = _World()
    return _world


def _u32(v: int) -> bytes:
    return struct.pack("!I", v)


# interesting attributes with values of the right shape, or not
interesting = st.one_of(
    st.tuples(st.just(40), st.sampled_from([1, 2, 3, 7, 8, 15, 0, 99]).map(_u32)),   # Acct-Status-Type
    st.tuples(st.just(40), st.binary(max_size=6)),
    st.tuples(st.just(44), st.sampled_from([b"c1", b"c2", b"c3", b"", b"\xff\xfe", b"x" * 253])),  # Acct-Session-Id
    st.tuples(st.just(105), st.sampled_from([b"t1", b"t2", b"", b"\x00"])),         # Sip-From-Tag
    st.tuples(st.just(1), st.sampled_from([b"acme", b"bob", b"\xc3\x28", b"a" * 253])),  # User-Name
    st.tuples(st.sampled_from([30, 31, 107]), st.sampled_from([b"sip:a@b", b"sip:", b"tel:+1", b"\x80"])),
    st.tuples(st.just(4), st.binary(min_size=3, max_size=5)),                       # NAS-IP-Address
    st.tuples(st.just(-55), st.integers(-100, 100).map(lambda v: struct.pack("!i", v))),  # Event-Timestamp - now
    st.tuples(st.just(41), st.integers(0, 500).map(_u32)),                           # Acct-Delay-Time
    st.tuples(st.just(102), st.sampled_from([200, 487, 486]).map(_u32)),             # Sip-Response-Code
    st.tuples(st.just(33), st.binary(max_size=253)),                                 # Proxy-State
    st.tuples(st.just(46), st.integers(0, 10).map(_u32)),                            # Acct-Session-Time
    attr,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([pk.ACCESS_REQUEST, pk.ACCOUNTING_REQUEST, pk.STATUS_SERVER]),
       st.lists(interesting, max_size=14), st.sampled_from([True, True, False]),
       st.sampled_from(["127.0.0.1", "127.0.0.1", "127.0.0.2", "10.1.2.3", "192.0.2.1"]), st.integers(1, 3),
       st.sampled_from([SECRET, SECRET, SECRET, b"wrong"]), st.integers(0, 40), st.booleans())
def test_adapter_random_attribute_sets(code: int, attrs: list[tuple[int, bytes]], ma: bool, host: str, port: int,
                                       secret: bytes, advance: int, twice: bool) -> None:
    w = world()
    w.clock.advance(advance)
    now = int(w.clock.now())
    attrs = [(55, _u32(now + struct.unpack("!i", v)[0])) if c == -55 else (c, v) for c, v in attrs]
    try:
        data = pk.request(code, port, attrs, secret, message_authenticator=ma)
    except pk.RadiusError:
        return  # over 4096 octets: not a packet a NAS can send
    errors = w.adapter.stats.c["errors"]
    for _ in range(2 if twice else 1):
        out = w.run(w.adapter.receive(data, host, port, ALL_CODES))
        assert w.adapter.stats.c["errors"] == errors, "an internal error in the adapter"
        if out is None:
            continue
        # an answer only ever goes to a known client with the right secret, and verifies
        lax = code == pk.ACCESS_REQUEST and host == "127.0.0.2" and not ma  # opted out: not proven
        assert (host != "192.0.2.1" and secret == SECRET) or lax
        assert out[1] == data[1]
        assert pk.reply_ok(data[4:20], out, secret) == (secret == SECRET)
        if code == pk.ACCESS_REQUEST:
            assert out[0] in (pk.ACCESS_ACCEPT, pk.ACCESS_REJECT)
        elif code == pk.ACCOUNTING_REQUEST:
            assert out[0] == pk.ACCOUNTING_RESPONSE
    if code == pk.ACCESS_REQUEST and not ma and host == "127.0.0.1":
        assert out is None
    dialogs = w.loop.run_until_complete(w.store.stats(w.clock.now()))
    assert dialogs.active_dialogs >= 0 and dialogs.early_dialogs >= 0


# -- the adapter against a model ---------------------------------------------------------------------

SESSIONS = (b"m1", b"m2", b"m3")
TAGS = (b"ta", b"tb", None)
step = st.one_of(
    st.tuples(st.sampled_from(["access", "start", "interim", "stop", "failed"]), st.sampled_from(SESSIONS),
              st.sampled_from(TAGS)),
    st.tuples(st.sampled_from(["on", "off"]), st.just(b""), st.just(None)),
    st.tuples(st.just("replay"), st.integers(0, 1000), st.just(None)),
)
STATUS = {"start": 1, "stop": 2, "interim": 3, "on": 7, "off": 8, "failed": 15}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=40), st.booleans())
def test_adapter_matches_the_model(steps: list[tuple[str, Any, bytes | None]], avp: bool) -> None:
    """Any sequence of checks, Starts, Interims, Stops, Faileds, Accounting-On/Offs and replays
    (the exact bytes of an earlier packet, from another port) leaves exactly the calls the model
    says held: a Start creates a call unless its Stop/Failed was seen, Stop/Failed end it,
    Accounting-On/Off end them all, a replay changes nothing."""
    clock = ManualClock()
    store = EmbeddedStore(clock=clock.now)
    service = PolicyService(RULES, store, clock=clock, default_timeout=600.0)
    d = Dictionary(str(DICTIONARY))
    adapter = RadiusAdapter(service, ClientTable([RadiusClient("127.0.0.1", SECRET.decode(),
                                                               "avp" if avp else "reject", "nas")]),
                            Mapping(d, {}), pk.ReplyAttributes(d), replay_window=300.0, replay_entries=5000)
    loop = asyncio.new_event_loop()
    held: set[str] = set()
    ended: set[str] = set()
    sent: list[bytes] = []
    try:
        for port, (kind, arg, tag) in enumerate(steps, start=1000):
            clock.advance(1)
            if kind == "replay":
                if not sent:
                    continue
                data = sent[arg % len(sent)]
            else:
                uid = arg.decode() + (" " + tag.decode() if tag else "")
                attrs = [(44, arg)] if arg else []
                attrs += [(105, tag)] if tag else []
                attrs += [(1, b"fz"), (31, b"sip:" + uid.replace(" ", "-").encode() + b"@fz")]
                if kind == "access":
                    data = pk.request(pk.ACCESS_REQUEST, port % 256, attrs, SECRET, message_authenticator=True)
                    held.add(uid)
                else:
                    attrs += [(40, _u32(STATUS[kind])), (55, _u32(int(clock.now())))]
                    data = pk.request(pk.ACCOUNTING_REQUEST, port % 256, attrs, SECRET)
                    if kind == "start" and uid not in ended:
                        held.add(uid)
                    elif kind in ("stop", "failed"):
                        held.discard(uid)
                        ended.add(uid)
                    elif kind in ("on", "off"):
                        held.clear()
                sent.append(data)
            out = adapter.receive(data, "127.0.0.1", port, ALL_CODES)
            reply = out if out is None or isinstance(out, bytes) else loop.run_until_complete(out)
            if kind != "replay" or data[0] == pk.ACCOUNTING_REQUEST:
                assert reply is not None and pk.reply_ok(data[4:20], reply, SECRET)
            else:
                assert reply is None  # a replayed Access-Request is dropped
            page = loop.run_until_complete(store.node_calls("radius:nas", clock.now()))
            assert {r.uid for r in page.items} == held, (kind, arg, tag)
        assert adapter.stats.c["errors"] == 0
    finally:
        loop.close()
