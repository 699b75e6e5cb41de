"""The RADIUS codec: bytes <-> packets, authenticators, Message-Authenticator. Pure.

`parse(data)` splits a datagram into a `Packet` (header fields and attributes) or raises
`RadiusError` whose `reason` says why it is not a well-formed RADIUS packet; it never
raises anything else, whatever the bytes (tests/test_radius_fuzz.py). The checks are those
of RFC 2865 section 3 and 5: shorter than 20 octets, a Length field outside 20..4096 or
beyond the datagram, an attribute shorter than 2 octets or running past Length. Octets
after Length are padding and ignored. A Message-Authenticator that is not 18 octets or
appears twice makes the packet invalid too (RFC 3579 section 3.2).

Authenticators: `acct_authenticator_ok` (RFC 2866 section 3), `message_authenticator_ok`
(RFC 2869 section 5.14; RFC 5176 section 3.3 for the zeroed Request Authenticator of an
Accounting-Request). `reply` signs a reply (Response Authenticator, and a
Message-Authenticator first when asked) and copies the request's Proxy-State attributes;
`request` builds a signed request (tests, benchmarks, tools).

pyrad is the dictionary: `ReplyAttributes` encodes the attributes of each distinct reply
once with it (typed values, vendor attributes); the per-packet work (parse, HMAC, MD5) is
here, off pyrad's generic paths, for speed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from pyrad import packet as rp
from pyrad.dictionary import Dictionary

from policy.errors import PolicyError

MAX_PACKET = 4096  # RFC 2865 section 3
HEADER = 20

# codes
ACCESS_REQUEST = 1
ACCESS_ACCEPT = 2
ACCESS_REJECT = 3
ACCOUNTING_REQUEST = 4
ACCOUNTING_RESPONSE = 5
STATUS_SERVER = 12

# attributes the codec and the adapter read themselves
ATTR_USER_NAME = 1
ATTR_REPLY_MESSAGE = 18
ATTR_PROXY_STATE = 33
ATTR_ACCT_STATUS_TYPE = 40
ATTR_ACCT_DELAY_TIME = 41
ATTR_ACCT_SESSION_ID = 44
ATTR_EVENT_TIMESTAMP = 55
ATTR_MESSAGE_AUTHENTICATOR = 80
ATTR_SIP_RESPONSE_CODE = 102

_ZERO16 = b"\x00" * 16


class RadiusError(PolicyError):
    """Bytes that are not a well-formed RADIUS packet (or a reply that cannot be built)."""

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}" if message else reason)


class Packet:
    """A well-formed packet: header fields and attributes (code -> raw values, in order)."""

    __slots__ = ("attrs", "authenticator", "code", "data", "ident", "ma_offset")

    def __init__(self, data: bytes, attrs: dict[int, list[bytes]], ma_offset: int) -> None:
        self.data = data  # exactly Length octets (padding cut off)
        self.code = data[0]
        self.ident = data[1]
        self.authenticator = data[4:20]
        self.attrs = attrs
        self.ma_offset = ma_offset  # where the Message-Authenticator value starts, 0 = none

    def first(self, code: int) -> bytes | None:
        """The first value of an attribute, or None."""
        got = self.attrs.get(code)
        return got[0] if got else None

    def integer(self, code: int) -> int | None:
        """The first value of a 4-octet integer attribute, or None (absent or not 4 octets)."""
        got = self.attrs.get(code)
        if not got or len(got[0]) != 4:
            return None
        return int.from_bytes(got[0], "big")


def parse(data: bytes) -> Packet:
    """Split a datagram into header and attributes; raises RadiusError (never anything else)."""
    n = len(data)
    if n < HEADER:
        raise RadiusError("truncated", f"{n} octets")
    length = (data[2] << 8) | data[3]
    if length < HEADER or length > MAX_PACKET:
        raise RadiusError("bad_length", f"Length field {length}")
    if length > n:
        raise RadiusError("truncated", f"Length field {length}, datagram {n}")
    if length < n:
        data = data[:length]
    attrs: dict[int, list[bytes]] = {}
    ma = 0
    pos = HEADER
    while pos < length:
        if pos + 2 > length:
            raise RadiusError("bad_attribute_length", f"half an attribute header at {pos}")
        code = data[pos]
        alen = data[pos + 1]
        if alen < 2 or pos + alen > length:
            raise RadiusError("bad_attribute_length", f"attribute {code} at {pos}: length {alen}")
        if code == ATTR_MESSAGE_AUTHENTICATOR:
            if alen != 18 or ma:
                raise RadiusError("bad_attribute_length", "Message-Authenticator not 18 octets or repeated")
            ma = pos + 2
        value = data[pos + 2 : pos + alen]
        got = attrs.get(code)
        if got is None:
            attrs[code] = [value]
        else:
            got.append(value)
        pos += alen
    return Packet(data, attrs, ma)


def check(data: bytes) -> str | None:
    """Why a datagram is not a well-formed RADIUS packet, or None if it is."""
    try:
        parse(data)
    except RadiusError as exc:
        return exc.reason
    return None


def message_authenticator_ok(p: Packet, secret: bytes) -> bool:
    """RFC 2869 section 5.14 (RFC 5176 section 3.3 for an Accounting-Request); False if absent."""
    o = p.ma_offset
    if not o:
        return False
    d = p.data
    body = d[:o] + _ZERO16 + d[o + 16 :]
    if p.code == ACCOUNTING_REQUEST:
        body = body[:4] + _ZERO16 + body[20:]
    mac = hmac.digest(secret, body, "md5")
    return hmac.compare_digest(mac, d[o : o + 16])


def acct_authenticator_ok(p: Packet, secret: bytes) -> bool:
    """RFC 2866 section 3: MD5(Code + Identifier + Length + 16 zero octets + attributes + secret)."""
    d = p.data
    digest = hashlib.md5(d[0:4] + _ZERO16 + d[20:] + secret).digest()
    return hmac.compare_digest(digest, p.authenticator)


def attribute(code: int, value: bytes) -> bytes:
    """One encoded attribute (value at most 253 octets)."""
    if not 0 <= code <= 255 or len(value) > 253:
        raise RadiusError("bad_attribute", f"attribute {code} with {len(value)} octets")
    return bytes((code, len(value) + 2)) + value


def reply(request: Packet, secret: bytes, code: int, attrs: bytes, with_ma: bool) -> bytes:
    """The signed reply to `request` with the encoded `attrs` (from `ReplyAttributes`, a zeroed
    Message-Authenticator first when `with_ma`), Proxy-State copied (RFC 2865 section 5.33)."""
    for state in request.attrs.get(ATTR_PROXY_STATE, ()):
        attrs += bytes((ATTR_PROXY_STATE, len(state) + 2)) + state
    length = HEADER + len(attrs)
    if length > MAX_PACKET:
        raise RadiusError("reply_too_long", f"{length} octets")
    head = bytes((code, request.ident, length >> 8, length & 0xFF))
    if with_ma:
        mac = hmac.digest(secret, head + request.authenticator + attrs, "md5")
        attrs = attrs[:2] + mac + attrs[18:]
    auth = hashlib.md5(head + request.authenticator + attrs + secret).digest()
    return head + auth + attrs


def reply_ok(request_authenticator: bytes, data: bytes, secret: bytes) -> bool:
    """Whether a reply's Response Authenticator (and Message-Authenticator, if any) verify."""
    try:
        p = parse(data)
    except RadiusError:
        return False
    d = p.data
    if not hmac.compare_digest(hashlib.md5(d[:4] + request_authenticator + d[20:] + secret).digest(),
                               p.authenticator):
        return False
    if p.ma_offset:
        o = p.ma_offset
        body = d[:4] + request_authenticator + d[20:o] + _ZERO16 + d[o + 16 :]
        return hmac.compare_digest(hmac.digest(secret, body, "md5"), d[o : o + 16])
    return True


def request(code: int, ident: int, attrs: Sequence[tuple[int, bytes]], secret: bytes, *,
            message_authenticator: bool = False, authenticator: bytes | None = None) -> bytes:
    """A signed request: an Accounting-Request gets its Request Authenticator (RFC 2866), any
    other a random one (or `authenticator`); `message_authenticator` adds a signed one first."""
    body = b"".join(attribute(c, v) for c, v in attrs)
    if message_authenticator:
        body = attribute(ATTR_MESSAGE_AUTHENTICATOR, _ZERO16) + body
    length = HEADER + len(body)
    if length > MAX_PACKET:
        raise RadiusError("request_too_long", f"{length} octets")
    head = struct.pack("!BBH", code, ident & 0xFF, length)
    auth = authenticator if authenticator is not None else os.urandom(16)
    if code == ACCOUNTING_REQUEST:
        auth = _ZERO16  # RFC 5176 section 3.3: the Message-Authenticator is computed over zeros
    if message_authenticator:
        body = body[:2] + hmac.digest(secret, head + auth + body, "md5") + body[18:]
    if code == ACCOUNTING_REQUEST:
        auth = hashlib.md5(head + _ZERO16 + body + secret).digest()
    return head + auth + body


def decode_value(kind: str, raw: bytes) -> str:
    """An attribute value as the string a rule sees: text as UTF-8, `ipaddr` dotted,
    `integer`/`date` in decimal, anything else (or a wrong size) in hex."""
    if kind == "string":
        return raw.decode("utf-8", "replace")
    if kind == "ipaddr" and len(raw) == 4:
        return socket.inet_ntoa(raw)
    if kind in ("integer", "date") and len(raw) == 4:
        return str(int.from_bytes(raw, "big"))
    return raw.hex()


class ReplyAttributes:
    """The encoded attributes of each distinct reply, made once with pyrad's dictionary."""

    def __init__(self, dictionary: Dictionary, size: int = 1024) -> None:
        self.dict = dictionary
        self.size = size
        self.templates: dict[tuple[Any, ...], bytes] = {}

    def encode(self, code: int, avps: tuple[tuple[str, Any], ...], with_ma: bool) -> bytes:
        """The attributes (a zeroed Message-Authenticator first when with_ma), for `reply`."""
        key = (code, avps, with_ma)
        got = self.templates.get(key)
        if got is not None:
            return got
        pkt = rp.Packet(code=code, id=0, secret=b"-", authenticator=_ZERO16, dict=self.dict)
        for name, value in avps:
            pkt.AddAttribute(name, value)
        attrs = bytes(pkt.ReplyPacket()[20:])
        if with_ma:
            attrs = attribute(ATTR_MESSAGE_AUTHENTICATOR, _ZERO16) + attrs
        if len(self.templates) >= self.size:
            self.templates.clear()
        self.templates[key] = attrs
        return attrs


def clip(text: str, prefix: str = "") -> str:
    """`prefix + text` fitted into one attribute (253 octets) without splitting a UTF-8 character."""
    room = 253 - len(prefix.encode())
    raw = text.encode("utf-8")
    if len(raw) <= room:
        return prefix + text
    return prefix + raw[:room].decode("utf-8", "ignore")
