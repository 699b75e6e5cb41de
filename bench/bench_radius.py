"""RADIUS front end benchmark: Access-Requests per second, every reply verified.

`make bench-radius` (this script) runs the RADIUS part of `bench/bench.py` (and the baseline
figure it is compared with): a `callpolicy serve` on default settings plus a `[radius]` table
(client 127.0.0.1, style `avp` as Kamailio's misc_radius uses), a background of held calls,
then a closed loop from one process over one UDP socket with `window` requests outstanding,
median of the runs. Options are bench.py's (`--quick`, `--runs`, `--seconds`, `--held`, ...).

The packet generator (`radius_closed`, run as `loadgen.py radius` in its own process) encodes
requests with struct (each a new call: its own Acct-Session-Id, User-Name = account and
Calling-Station-Id, so no cap is reached) and checks every reply:

- the identifier matches an outstanding request; the Response Authenticator
  (MD5(Code+Id+Length+Request Authenticator+Attributes+secret)) and the reply's
  Message-Authenticator (HMAC-MD5 with the secret) verify;
- it is an Access-Accept whose SIP-AVP says `policy:allow`: that, and only that, counts.
  `policy:deny`, `policy:error`, an Access-Reject, a bad authenticator, an unknown identifier
  or garbage are tallied as errors by kind; a request unanswered after `lost_after` is lost
  (its identifier is not reused for as long again, so a late reply cannot be taken for
  another request's).
"""

from __future__ import annotations

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
SIP_AVP = 225
MESSAGE_AUTHENTICATOR = 80


def attr(code: int, value: bytes) -> bytes:
    """One encoded attribute."""
    return bytes((code, len(value) + 2)) + value


def access_request(ident: int, auth: bytes, tag: bytes, n: int) -> bytes:
    """An Access-Request for call n of the run `tag`: User-Name (the account), Acct-Session-Id
    (the Call-ID, as loadgen names calls), Calling/Called-Station-Id, NAS-IP-Address."""
    attrs = (attr(1, b"%bra%d" % (tag, n)) + attr(44, call_id(tag, n))
             + attr(31, b"sip:%bru%d@bench.example" % (tag, n)) + attr(30, b"sip:6002@bench.example")
             + attr(4, b"\x7f\x00\x00\x01"))
    return struct.pack("!BBH", ACCESS_REQUEST, ident, 20 + len(attrs)) + auth + attrs


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


def radius_closed(addr: tuple[str, int], secret: bytes, seconds: float, window: int, warmup: float, tag: str,
                  *, lost_after: float = 1.0, pids: Sequence[int] = ()) -> dict[str, Any]:
    """Keep `window` Access-Requests outstanding for warmup+seconds; verified allows per second."""
    assert 1 <= window <= 128
    btag = tag.encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect(addr)
    sock.setblocking(False)
    pending: dict[int, tuple[float, bytes, int]] = {}  # identifier -> (sent at, request authenticator, call)
    free_ids = list(range(256))
    quarantine: list[tuple[float, int]] = []  # identifiers of lost requests, free again after lost_after
    errors: Counter[str] = Counter()
    hist = Hist()
    n = 0
    completed = 0
    lost = 0
    cpu = CpuWindow(pids)
    measuring = False
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds

    def send_new() -> None:
        nonlocal n
        if not free_ids:
            return
        ident = free_ids.pop()
        auth = os.urandom(16)
        pending[ident] = (time.perf_counter(), auth, n)
        try:
            sock.send(access_request(ident, auth, btag, n))
        except OSError as exc:
            errors[f"send_error:{type(exc).__name__}"] += 1
        n += 1

    for _ in range(window):
        send_new()
    next_sweep = time.perf_counter() + 0.1
    while True:
        now = time.perf_counter()
        if not measuring and now >= t_start:
            measuring = True
            cpu.start()
        if now >= t_end:
            break
        if now >= next_sweep:
            next_sweep = now + 0.1
            for ident in [i for i, v in pending.items() if now - v[0] > lost_after]:
                del pending[ident]
                lost += 1
                if measuring:
                    hist.lost += 1
                quarantine.append((now + lost_after, ident))
                send_new()
            while quarantine and quarantine[0][0] <= now:
                free_ids.append(quarantine.pop(0)[1])
            while len(pending) < window and free_ids:
                send_new()
        r, _, _ = select.select([sock], [], [], min(0.1, t_end - now))
        if not r:
            continue
        while True:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                errors[f"recv_error:{type(exc).__name__}"] += 1
                break
            t = time.perf_counter()
            entry = pending.pop(data[1], None) if len(data) >= 2 else None
            if entry is None:
                errors["unexpected_reply"] += 1
                continue
            sent, auth, _call = entry
            free_ids.append(data[1])
            kind = reply_kind(data, auth, secret)
            if kind != "ok":
                errors[kind] += 1
            elif measuring:
                completed += 1
            if measuring:
                hist.add(t - sent)
            send_new()
    cpu.stop()
    sock.close()
    return {"mode": "radius", "transport": "radius", "window": window, "window_s": seconds, "sent": n,
            "completed": completed, "rate": round(completed / seconds, 1) if seconds else 0.0,
            "errors": dict(errors.most_common()), "error_count": sum(errors.values()), "lost": lost,
            "latency": {"check": hist.summary()}, "cpu": cpu.result, "tag": tag,
            "window_outstanding_at_end": len(pending)}


def main(argv: list[str] | None = None) -> int:
    """`make bench-radius`: bench.py's RADIUS section."""
    import bench  # type: ignore[import-not-found]

    return int(bench.main(["--only", "radius", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
