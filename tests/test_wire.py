"""The pure wire codec: framing, errors, and a fuzz rule (events or ProtocolError, nothing else)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.errors import ProtocolError
from policy.wire import BadMessage, Framing, Message, StreamDecoder, decode_datagram, encode


def ns(obj: object) -> bytes:
    """A netstring of a JSON value."""
    body = orjson.dumps(obj)
    return b"%d:%s," % (len(body), body)


def test_netstring_and_line_messages_in_one_stream() -> None:
    """Both framings mix freely, whitespace between them is skipped, each keeps its framing."""
    data = ns({"op": "ping", "id": 1}) + b"\r\n  " + b'{"op":"stats"}\n' + ns({"op": "ping", "id": 2})
    events = StreamDecoder().feed(data)
    assert events == [Message(b'{"op":"ping","id":1}', Framing.NETSTRING),
                      Message(b'{"op":"stats"}', Framing.LINE),
                      Message(b'{"op":"ping","id":2}', Framing.NETSTRING)]


def test_partial_input_waits_for_more() -> None:
    """A message split anywhere comes out once, when complete."""
    data = ns({"op": "check", "call_id": "x"}) + b'{"op":"ping"}\n'
    for cut in range(len(data) + 1):
        dec = StreamDecoder()
        events = dec.feed(data[:cut]) + dec.feed(data[cut:])
        assert [orjson.loads(e.payload)["op"] for e in events] == ["check", "ping"], cut


def test_bad_json_is_framed_and_the_stream_goes_on() -> None:
    """Framing does not look inside a message: invalid JSON is one message (answered by the
    protocol layer with an error), and the stream goes on."""
    dec = StreamDecoder()
    events = dec.feed(b'{"op":\n[1,2]\n\xff\xfe\n3:abc,{"op":"ping"}\n')
    assert [e.payload for e in events] == [b'{"op":', b"[1,2]", b"\xff\xfe", b"abc", b'{"op":"ping"}']
    assert events[1].framing is Framing.LINE and events[3].framing is Framing.NETSTRING


@pytest.mark.parametrize(("data", "code"), [
    (b"12x:{}", "bad_netstring"),
    (b"2:{}x", "bad_netstring"),
    (b"9999999:", "too_long"),
    (b"70000:", "too_long"),
    (b"1234567", "too_long"),
])
def test_unrecoverable_streams(data: bytes, code: str) -> None:
    """A bad netstring length or an oversize message raises ProtocolError, then again on every call."""
    dec = StreamDecoder()
    with pytest.raises(ProtocolError) as info:
        dec.feed(data)
    assert info.value.code == code
    with pytest.raises(ProtocolError):
        dec.feed(b'{"op":"ping"}\n')


def test_line_over_the_limit() -> None:
    """A line longer than the limit without a newline is refused."""
    dec = StreamDecoder(max_message=100)
    with pytest.raises(ProtocolError, match="too_long"):
        dec.feed(b"{" + b"a" * 200)


def test_complete_messages_before_an_error_are_delivered() -> None:
    """Events before the error come out first; the error comes with the next call."""
    dec = StreamDecoder()
    dec.receive_data(b'{"op":"ping"}\n5:abc')
    assert isinstance(dec.next_event(), Message)
    assert dec.next_event() is None
    dec.receive_data(b"!!x")
    with pytest.raises(ProtocolError):
        dec.next_event()


def test_encode_round_trips() -> None:
    """Replies are framed like their requests."""
    obj = {"ok": True, "id": 3}
    body = orjson.dumps(obj)
    assert StreamDecoder().feed(encode(obj, Framing.NETSTRING)) == [Message(body, Framing.NETSTRING)]
    assert StreamDecoder().feed(encode(obj, Framing.LINE)) == [Message(body, Framing.LINE)]
    assert encode(obj, Framing.DATAGRAM) == orjson.dumps(obj)


def test_datagrams() -> None:
    """A datagram is one JSON object (a netstring frame is accepted too)."""
    ping = b'{"op":"ping"}'
    assert decode_datagram(ping) == Message(ping, Framing.DATAGRAM)
    assert decode_datagram(ping + b"\n") == Message(ping, Framing.DATAGRAM)
    assert decode_datagram(ns({"op": "ping"})) == Message(ping, Framing.NETSTRING)
    assert decode_datagram(b"garbage") == Message(b"garbage", Framing.DATAGRAM)
    assert isinstance(decode_datagram(b"x" * 70000), BadMessage)


def test_datagram_with_a_huge_length_prefix() -> None:
    """A netstring-looking datagram with thousands of length digits is just a (bad) message,
    never an exception (int() of a 4,300-digit number raises ValueError)."""
    data = b"9" * 5000 + b":{},"
    assert decode_datagram(data) == Message(data, Framing.DATAGRAM)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_datagrams(data: bytes) -> None:
    """Any datagram gives a Message or a BadMessage, nothing else."""
    assert isinstance(decode_datagram(data, max_message=256), Message | BadMessage)


def _run(chunks: list[bytes]) -> None:
    dec = StreamDecoder(max_message=256)
    for chunk in chunks:
        try:
            events = dec.feed(chunk)
        except ProtocolError:
            with pytest.raises(ProtocolError):
                dec.feed(b"")
            return
        for e in events:
            assert isinstance(e, Message) and isinstance(e.payload, bytes)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.lists(st.sampled_from(
    [b"1", b"0", b"9", b":", b",", b"{", b"}", b'"', b"\n", b" ", b"op", b"\xff", b"[]"]), max_size=60).map(b"".join))
def test_fuzz_any_bytes_whole_and_split_everywhere(data: bytes) -> None:
    """Any bytes, whole or split at every position, give messages or a ProtocolError, nothing else."""
    _run([data])
    for cut in range(len(data) + 1):
        _run([data[:cut], data[cut:]])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.dictionaries(st.text(max_size=5), st.integers(-(2**53), 2**53) | st.text(max_size=10), max_size=4).map(ns),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**53), 2**53), max_size=3).map(
        lambda d: orjson.dumps(d) + b"\n"),
    st.sampled_from([b" ", b"\n", b"\r\n\t"]),
), max_size=8), st.integers(min_value=1, max_value=7))
def test_fuzz_valid_streams_decode_exactly(parts: list[bytes], step: int) -> None:
    """Valid messages fed in arbitrary chunk sizes decode to exactly the messages sent."""
    stream = b"".join(parts)
    expected = StreamDecoder().feed(stream)
    dec = StreamDecoder()
    got = []
    for i in range(0, len(stream), step):
        got += dec.feed(stream[i : i + step])
    assert got == expected
    assert sum(1 for p in parts if p.strip()) == len(got)


def _one_by_one(chunks: list[bytes], max_message: int) -> list[Any]:
    """Events (and a final error code) decoded with next_event, after each chunk."""
    dec = StreamDecoder(max_message)
    out: list[Any] = []
    for chunk in chunks:
        dec.receive_data(chunk)
        try:
            while (e := dec.next_event()) is not None:
                out.append(e)
        except ProtocolError as exc:
            return [*out, exc.code]
    return out


def _batched(chunks: list[bytes], max_message: int, limit: int) -> list[Any]:
    """The same with next_events(limit), which must never return more than `limit`."""
    dec = StreamDecoder(max_message)
    out: list[Any] = []
    for chunk in chunks:
        dec.receive_data(chunk)
        try:
            while events := dec.next_events(limit):
                assert len(events) <= limit
                out += events
        except ProtocolError as exc:
            return [*out, exc.code]
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.dictionaries(st.text(max_size=5), st.integers(0, 99) | st.text(max_size=30), max_size=3).map(
        lambda d: orjson.dumps(d) + b"\n"),
    st.dictionaries(st.text(max_size=5), st.integers(0, 99), max_size=3).map(ns),
    st.sampled_from([b" ", b"\n", b"\r\n", b'{"a":1}\r\n', b"[1]\n", b"{" + b"x" * 70 + b"}\n", b"12x:{}",
                     b"\xff\n", b"{", b"}\n"]),
), max_size=12), st.integers(min_value=1, max_value=9), st.integers(min_value=1, max_value=5))
def test_next_events_is_next_event_in_batches(parts: list[bytes], step: int, limit: int) -> None:
    """The batched decoder (a run of lines split at once) gives exactly the events, framings and
    errors of the one-at-a-time decoder, for any chunking and any batch limit; a line over the
    limit is refused the same way."""
    stream = b"".join(parts)
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)] or [b""]
    for max_message in (64, 65536):
        assert _batched(chunks, max_message, limit) == _one_by_one(chunks, max_message)
        assert _batched([stream], max_message, limit) == _one_by_one([stream], max_message)
