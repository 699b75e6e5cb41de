"""The pure wire codec: bytes in, messages out. No sockets, no asyncio (like h11).

A stream carries JSON objects, each framed either as a netstring `<len>:<json>,` (the
framing of Kamailio's evapi module) or as one line ending in `\\n`. The framing is chosen
per message by its first byte: a digit starts a netstring, anything else a line. White
space between messages is skipped. Replies go back in the framing of their request.

`StreamDecoder.receive_data(data)` buffers bytes; `next_event()` returns the next
`Message` (the payload bytes of one framed message, for `policy.protocol.decode`), or None
when it needs more bytes. A stream that cannot be resynchronised (a bad netstring length, a
message over the size limit) raises `ProtocolError`, and so does every later call: answer
it and close. Nothing else is ever raised. `decode_datagram` never raises: a datagram too
big to be a message is a `BadMessage` (answered, like any other bad request).
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import orjson

from policy.errors import ProtocolError

DEFAULT_MAX_MESSAGE = 64 * 1024
_WS = b" \t\r\n"
_DIGITS = b"0123456789"


class Framing(enum.Enum):
    """How a message was framed; its reply uses the same."""

    NETSTRING = "netstring"
    LINE = "line"
    DATAGRAM = "datagram"


class Message(NamedTuple):
    """The payload of one framed message (JSON, decoded by `policy.protocol`)."""

    payload: bytes
    framing: Framing


class BadMessage(NamedTuple):
    """A datagram that cannot be a message (too big); it is answered."""

    code: str
    message: str
    framing: Framing


Event = Message


class StreamDecoder:
    """Incremental decoder for one stream connection."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._max_digits = len(str(max_message))
        self._buf = bytearray()
        self._pos = 0  # where the next message starts in _buf
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the peer."""
        if self._error is None and data:
            self._buf += data

    def next_event(self) -> Event | None:
        """The next complete event, or None when more bytes are needed; raises ProtocolError."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            self._pos = 0
            raise

    def next_events(self, limit: int) -> list[Event]:
        """Up to `limit` complete events (fewer when more bytes are needed; empty: none).

        Raises ProtocolError like `next_event` when the first event cannot be decoded; when
        events came before the error, they are returned and the error is raised by the next
        call (their replies go out before it). A run of line-framed objects is split in one
        step, not one search and copy per message.
        """
        if self._error is not None:
            raise self._error
        events: list[Event] = []
        try:
            while len(events) < limit:
                buf = self._buf
                pos = self._pos
                if pos < len(buf) and buf[pos] == 0x7B:  # '{': line-framed JSON, the common case
                    end = buf.rfind(b"\n", pos)
                    if end > pos:
                        line = Framing.LINE
                        max_message = self.max_message
                        for payload in bytes(buf[pos:end]).split(b"\n"):
                            if payload[:1] != b"{" or len(payload) > max_message or len(events) >= limit:
                                break  # anything else takes the general path (which bounds and errs)
                            events.append(Message(payload, line))
                            pos += len(payload) + 1
                        self._pos = pos
                        if pos > end:  # every complete line taken
                            if pos >= len(buf):
                                buf.clear()
                                self._pos = 0
                            continue
                        if len(events) >= limit:
                            break
                event = self._next()
                if event is None:
                    break
                events.append(event)
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            self._pos = 0
            if not events:
                raise
        return events

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes and return every event they complete (raises ProtocolError like next_event)."""
        self.receive_data(data)
        events: list[Event] = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    def _next(self) -> Event | None:
        # Messages are read at an offset into the buffer, which is compacted only when it runs
        # dry: a pipelined chunk of many messages costs one memmove, not one per message.
        buf = self._buf
        pos = self._pos
        n = len(buf)
        while pos < n and buf[pos] in _WS:  # white space between messages
            pos += 1
        if pos >= n:
            buf.clear()
            self._pos = 0
            return None
        self._pos = pos
        event = self._netstring(pos) if buf[pos] in _DIGITS else self._line(pos)
        if event is None and self._pos:
            del buf[: self._pos]
            self._pos = 0
        return event

    def _netstring(self, pos: int) -> Event | None:
        buf = self._buf
        colon = buf.find(b":", pos, pos + self._max_digits + 1)
        if colon < 0:
            head = bytes(buf[pos : pos + self._max_digits + 1])
            if not head.isdigit():
                raise ProtocolError("bad_netstring", "netstring length must be digits followed by ':'")
            if len(head) > self._max_digits:
                raise ProtocolError(
                    "too_long", f"netstring length has too many digits (limit {self.max_message} bytes)"
                )
            return None
        digits = bytes(buf[pos:colon])
        if not digits.isdigit():
            raise ProtocolError("bad_netstring", "netstring length must be digits followed by ':'")
        length = int(digits)
        if length > self.max_message:
            raise ProtocolError(
                "too_long", f"netstring of {length} bytes is over the limit of {self.max_message}"
            )
        end = colon + 1 + length
        if len(buf) <= end:
            return None
        if buf[end] != 0x2C:  # ','
            raise ProtocolError("bad_netstring", "netstring does not end with ','")
        payload = bytes(buf[colon + 1 : end])
        self._pos = end + 1
        return Message(payload, Framing.NETSTRING)

    def _line(self, pos: int) -> Event | None:
        buf = self._buf
        nl = buf.find(b"\n", pos, pos + self.max_message + 1)
        if nl < 0:
            if len(buf) - pos > self.max_message:
                raise ProtocolError("too_long", f"line is over the limit of {self.max_message} bytes")
            return None
        payload = bytes(buf[pos:nl])
        self._pos = nl + 1
        return Message(payload, Framing.LINE)


def encode(data: dict[str, Any], framing: Framing) -> bytes:
    """Serialise a reply in the given framing."""
    if framing is Framing.LINE:
        return orjson.dumps(data, option=orjson.OPT_APPEND_NEWLINE)
    body = orjson.dumps(data)
    if framing is Framing.NETSTRING:
        return b"%d:%s," % (len(body), body)
    return body


def decode_datagram(data: bytes, max_message: int = DEFAULT_MAX_MESSAGE) -> Message | BadMessage:
    """One UDP datagram: a bare JSON object (a netstring frame is accepted too). Never raises."""
    if len(data) > max_message:
        return BadMessage("too_long", f"datagram of {len(data)} bytes is over the limit", Framing.DATAGRAM)
    stripped = data.strip(_WS)
    if stripped[:1].isdigit():
        colon = stripped.find(b":", 0, len(str(max_message)) + 1)  # bounded: no int() of a huge number
        if colon > 0 and stripped[:colon].isdigit() and stripped.endswith(b","):
            body = stripped[colon + 1 : -1]
            if len(body) == int(stripped[:colon]):
                return Message(body, Framing.NETSTRING)
    return Message(stripped, Framing.DATAGRAM)
