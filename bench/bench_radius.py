"""RADIUS front end benchmark: calls per second through RADIUS, every reply verified.

`make bench-radius` (this script) runs the RADIUS part of `bench/bench.py` (and the baseline
figure it is compared with): a `callpolicy serve` on default settings plus a `[radius]` table
(client 127.0.0.1, style `avp` as Kamailio's misc_radius uses), a background of held calls,
then a closed loop from one process, median of the runs. Options are bench.py's (`--quick`,
`--runs`, `--seconds`, `--held`, ...).

The packet generator (`radius_closed`, run as `loadgen.py radius` in its own process) keeps
`window` calls outstanding. Each call is an Access-Request (the check) and, once it is
allowed, an Accounting-Request Stop (the end: it releases the call, as a NAS does after the
BYE; without it every request would stay held for early_timeout and the store would grow by
the whole run). The figure is those calls per second, i.e. Access-Requests/s with their
Stops; `loadgen.py radius` without `--acct` sends Access-Requests alone. Requests are encoded
with struct (each a new call: its own Acct-Session-Id = Call-ID, User-Name = account and
Calling-Station-Id, so no cap is reached), and every reply is checked:

- Access-Accept: the identifier matches an outstanding request; the Response Authenticator
  (MD5(Code+Id+Length+Request Authenticator+Attributes+secret)) and the Message-Authenticator
  (HMAC-MD5 with the secret) verify; its SIP-AVP says `policy:allow`. `policy:deny`,
  `policy:error`, Access-Reject, no or a bad authenticator, garbage: errors by kind;
- Accounting-Response: identifier and Response Authenticator verify;
- a request unanswered after `lost_after` is lost (the call is given up); identifiers are
  reused oldest first, and a reply that verifies against a lost request's authenticator is
  counted as late, never taken for a newer request's.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import select
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from loadgen import CpuWindow, Hist, call_id  # noqa: E402

ACCESS_REQUEST = 1
ACCESS_ACCEPT = 2
ACCESS_REJECT = 3
ACCOUNTING_REQUEST = 4
ACCOUNTING_RESPONSE = 5
SIP_AVP = 225
MESSAGE_AUTHENTICATOR = 80


def attr(code: int, value: bytes) -> bytes:
    """One encoded attribute."""
    return bytes((code, len(value) + 2)) + value


def access_request(ident: int, auth: bytes, tag: bytes, n: int, secret: bytes | None = None) -> bytes:
    """An Access-Request for call n of the run `tag`: User-Name (the account), Acct-Session-Id
    (the Call-ID, as loadgen names calls), Calling/Called-Station-Id, NAS-IP-Address; with
    `secret`, signed with a Message-Authenticator (RFC 3579: HMAC-MD5 of the packet with the
    attribute zeroed), which the service requires of every client by default."""
    attrs = (attr(1, b"%bra%d" % (tag, n)) + attr(44, call_id(tag, n))
             + attr(31, b"sip:%bru%d@bench.example" % (tag, n)) + attr(30, b"sip:6002@bench.example")
             + attr(4, b"\x7f\x00\x00\x01"))
    if secret is None:
        return struct.pack("!BBH", ACCESS_REQUEST, ident, 20 + len(attrs)) + auth + attrs
    attrs += attr(MESSAGE_AUTHENTICATOR, b"\x00" * 16)
    pkt = struct.pack("!BBH", ACCESS_REQUEST, ident, 20 + len(attrs)) + auth + attrs
    return pkt[:-16] + hmac.new(secret, pkt, "md5").digest()


def attributes(data: bytes) -> list[tuple[int, bytes, int]] | None:
    """(type, value, offset of the value) of each attribute; None if they do not parse."""
    out = []
    i = 20
    end = len(data)
    while i < end:
        if i + 2 > end:
            return None
        t, ln = data[i], data[i + 1]
        if ln < 2 or i + ln > end:
            return None
        out.append((t, data[i + 2:i + ln], i + 2))
        i += ln
    return out


def reply_kind(data: bytes, request_auth: bytes, secret: bytes) -> str:
    """"ok" for a verified Access-Accept saying policy:allow, else the kind of failure."""
    if len(data) < 20 or struct.unpack("!H", data[2:4])[0] != len(data):
        return "garbage"
    expect = hashlib.md5(data[:4] + request_auth + data[20:] + secret).digest()
    if not hmac.compare_digest(expect, data[4:20]):
        return "bad_response_authenticator"
    attrs = attributes(data)
    if attrs is None:
        return "garbage"
    ma = [a for a in attrs if a[0] == MESSAGE_AUTHENTICATOR]
    if len(ma) != 1 or len(ma[0][1]) != 16:
        return "no_message_authenticator"
    off = ma[0][2]
    zeroed = data[:4] + request_auth + data[20:off] + b"\x00" * 16 + data[off + 16:]
    if not hmac.compare_digest(hmac.new(secret, zeroed, "md5").digest(), ma[0][1]):
        return "bad_message_authenticator"
    if data[0] == ACCESS_REJECT:
        return "access_reject"
    if data[0] != ACCESS_ACCEPT:
        return f"code_{data[0]}"
    avps = [v for t, v, _ in attrs if t == SIP_AVP]
    if b"policy:allow" in avps:
        return "ok"
    if b"policy:deny" in avps:
        return "deny"
    if b"policy:error" in avps:
        return "error"
    return "accept_without_policy"


def acct_stop(ident: int, tag: bytes, n: int, secret: bytes) -> bytes:
    """An Accounting-Request Stop for call n (its Request Authenticator computed, RFC 2866)."""
    attrs = (attr(40, struct.pack("!I", 2)) + attr(1, b"%bra%d" % (tag, n)) + attr(44, call_id(tag, n))
             + attr(31, b"sip:%bru%d@bench.example" % (tag, n)))
    head = struct.pack("!BBH", ACCOUNTING_REQUEST, ident, 20 + len(attrs))
    return head + hashlib.md5(head + b"\x00" * 16 + attrs + secret).digest() + attrs


def acct_reply_kind(data: bytes, request_auth: bytes, secret: bytes) -> str:
    """"ok" for a verified Accounting-Response, else the kind of failure."""
    if len(data) < 20 or struct.unpack("!H", data[2:4])[0] != len(data):
        return "garbage"
    expect = hashlib.md5(data[:4] + request_auth + data[20:] + secret).digest()
    if not hmac.compare_digest(expect, data[4:20]):
        return "bad_response_authenticator"
    if data[0] != ACCOUNTING_RESPONSE:
        return f"code_{data[0]}"
    return "ok"


class Side:
    """One UDP socket (auth or acct port): its 256 identifiers, reused oldest first, the requests
    waiting for a reply, and the authenticators of requests declared lost (so their late replies
    are recognised as late, not taken for a newer request's)."""

    def __init__(self, addr: tuple[str, int], name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.connect(addr)
        self.sock.setblocking(False)
        self.free: collections.deque[int] = collections.deque(range(256))
        self.pending: dict[int, tuple[float, bytes, int]] = {}  # id -> (sent at, request authenticator, call)
        self.lost: dict[int, list[tuple[float, bytes]]] = {}  # id -> [(forget at, request authenticator)]

    def late(self, ident: int, data: bytes, secret: bytes, now: float) -> bool:
        """Is `data` the reply to an earlier, lost request with this identifier?"""
        keep = [(t, a) for t, a in self.lost.get(ident, ()) if t > now]
        if keep:
            self.lost[ident] = keep
        else:
            self.lost.pop(ident, None)
        return any(hmac.compare_digest(hashlib.md5(data[:4] + a + data[20:] + secret).digest(), data[4:20])
                   for _, a in keep)


def radius_closed(addr: tuple[str, int], secret: bytes, seconds: float, window: int, warmup: float, tag: str,
                  *, acct: tuple[str, int] | None = None, lost_after: float = 1.0,
                  pids: Sequence[int] = ()) -> dict[str, Any]:
    """Keep `window` calls outstanding for warmup+seconds. Each call is an Access-Request and,
    with `acct`, once it is allowed, an Accounting-Request Stop (that releases it, as a NAS
    does): calls completed per second, every reply verified (see the module text)."""
    assert 1 <= window <= 128
    btag = tag.encode()
    auth = Side(addr, "auth")
    sides = [auth]
    stop = Side(acct, "acct") if acct else None
    if stop is not None:
        sides.append(stop)
    errors: Counter[str] = Counter()
    hists = {"access": Hist(), "accounting": Hist()}
    n = 0
    completed = 0
    lost = late = 0
    cpu = CpuWindow(pids)
    measuring = False
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds

    def send(side: Side, call: int) -> None:
        if not side.free:
            errors[f"{side.name}:no_free_identifier"] += 1
            return
        ident = side.free.popleft()
        if side is auth:
            req_auth = os.urandom(16)
            data = access_request(ident, req_auth, btag, call, secret)
        else:
            data = acct_stop(ident, btag, call, secret)
            req_auth = data[4:20]
        side.pending[ident] = (time.perf_counter(), req_auth, call)
        try:
            side.sock.send(data)
        except OSError as exc:
            errors[f"{side.name}:send_error:{type(exc).__name__}"] += 1

    def new_call() -> None:
        nonlocal n
        send(auth, n)
        n += 1

    for _ in range(window):
        new_call()
    next_sweep = time.perf_counter() + 0.1
    socks = {s.sock: s for s in sides}
    while True:
        now = time.perf_counter()
        if not measuring and now >= t_start:
            measuring = True
            cpu.start()
        if now >= t_end:
            break
        if now >= next_sweep:  # requests unanswered for lost_after: lost; the call is given up
            next_sweep = now + 0.1
            for side in sides:
                for ident in [i for i, v in side.pending.items() if now - v[0] > lost_after]:
                    _sent, req_auth, _call = side.pending.pop(ident)
                    side.lost.setdefault(ident, []).append((now + 30.0, req_auth))
                    side.free.append(ident)
                    lost += 1
                    if measuring:
                        hists["access" if side is auth else "accounting"].lost += 1
                    new_call()
        r, _, _ = select.select(list(socks), [], [], min(0.1, t_end - now))
        for sock in r:
            side = socks[sock]
            while True:
                try:
                    data = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    errors[f"{side.name}:recv_error:{type(exc).__name__}"] += 1
                    break
                t = time.perf_counter()
                if len(data) < 20:
                    errors[f"{side.name}:garbage"] += 1
                    continue
                ident = data[1]
                entry = side.pending.get(ident)
                kind = "unexpected_reply"
                if entry is not None:
                    sent, req_auth, call = entry
                    kind = (reply_kind if side is auth else acct_reply_kind)(data, req_auth, secret)
                if kind in ("unexpected_reply", "bad_response_authenticator") and side.late(ident, data, secret, t):
                    late += 1  # the reply of a request already counted lost
                    continue
                if kind in ("unexpected_reply", "bad_response_authenticator"):
                    errors[f"{side.name}:{kind}"] += 1  # the request stays pending: answered or lost
                    continue
                del side.pending[ident]
                side.free.append(ident)
                if measuring:
                    hists["access" if side is auth else "accounting"].add(t - sent)
                if kind != "ok":
                    errors[f"{side.name}:{kind}"] += 1
                    new_call()
                elif side is auth and stop is not None:
                    send(stop, call)
                else:
                    if measuring:
                        completed += 1
                    new_call()
    cpu.stop()
    outstanding = sum(len(s.pending) for s in sides)
    for s in sides:
        s.sock.close()
    return {"mode": "radius", "transport": "radius", "window": window, "window_s": seconds, "sent": n,
            "with_accounting": stop is not None, "completed": completed,
            "rate": round(completed / seconds, 1) if seconds else 0.0,
            "errors": dict(errors.most_common()), "error_count": sum(errors.values()), "lost": lost, "late": late,
            "latency": {"check": hists["access"].summary(), "end": hists["accounting"].summary()},
            "cpu": cpu.result, "tag": tag, "outstanding_at_end": outstanding}


def main(argv: list[str] | None = None) -> int:
    """`make bench-radius`: bench.py's RADIUS section."""
    import bench  # type: ignore[import-not-found]

    return int(bench.main(["--only", "radius", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
