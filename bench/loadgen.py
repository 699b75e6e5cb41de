"""The load generator every bench script uses: closed and open loops over the socket protocol.

`bench.py` runs it as a separate process (`python bench/loadgen.py MODE ... `), reads the JSON
it prints on stdout, and never shares a process or an event loop with it. It can also drive
any running service by hand:

    .venv/bin/python bench/loadgen.py closed --tcp 127.0.0.1:5099 --seconds 10
    .venv/bin/python bench/loadgen.py open --tcp 127.0.0.1:5099 --rate 2000 --seconds 12

What it does, and what it counts:

- Every call is a sequence of operations on one connection (`check`, then `end` of the same
  call; or `check`, `answer` for the background of held calls). The next operation of a call
  is sent only once the previous one succeeded, as a proxy does: the `end` of a call goes out
  after its check's reply said allow (and echoes the check's `token` if the reply has one).
- Every reply is parsed (orjson, in bulk) and checked: a check succeeded only when it is
  `ok: true, decision: "allow"` with no `store_error` and no `duplicate`; an end only when it
  is `ok: true, released: true`; an answer only when `found: true`; every reply must echo the
  request's `id`. Anything else is tallied by kind (`check:deny:486:user-cap`,
  `check:store_error`, `end:not_released`, `check:error:bad_field`, `invalid_reply`, ...). A
  call counts (one "pair") only when all its operations succeeded.
- closed loop: `conns` connections, each keeping `depth` requests outstanding (pipelined);
  calls completed inside the measured window (after `warmup`) per second. At the end of the
  window nothing new is sent; replies still missing after `lost_after` are lost.
- open loop: one new call every 1/rate seconds (round robin over the connections), each with
  a scheduled send time; latency = reply time - scheduled time (so a stall in the service or
  in this generator delays every call scheduled behind it: no coordinated omission); the call's
  end is due `hold` seconds after its scheduled check (or when the allowed reply comes, if
  later) and timed from that moment. Replies that never come count as lost and as infinitely
  slow in the percentiles. The generator's own lateness (actual - scheduled send) is reported.
- UDP: the same, one request per datagram, replies matched by `id`; a request unanswered
  after `lost_after` is lost and its window slot reused.

It keeps its own cost low (requests are bytes templates, replies parsed one `orjson.loads` per
read) and reports it: its CPU time over the window next to the service's (from /proc/PID/stat
for every `--pid`) and the whole machine's busy share (/proc/stat), so a reader can see
whether the generator, the service or the machine was the limit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import heapq
import math
import os
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

# -- what the bench sends: the one place to change a request --------------------------------
#
# Measured calls: a user per call number (from a pool of USERS) and an account per call number
# (from a pool of ACCOUNTS), so no cap of the shipped rules (user 4, account 10, acme 3) is
# reached: calls held at once by the bench are consecutive numbers, and USERS and ACCOUNTS are
# far larger than the number of calls in flight. The callee is a local number (not emergency,
# not international). Held calls (the background) have no account and a user each.
# A new request field is one edit here (e.g. `"from_tag":"%b"`), a new reply field the
# checkers below.
USERS = 1_000_000
ACCOUNTS = 10_000
# Positional arguments: request id, then the run's tag and call number (the Call-ID is CALL_ID),
# then for a measured check the tag and user number, the tag and account number.
CALL_ID = b"%b-%d"
CHECK = (b'{"op":"check","id":%d,"call_id":"%b-%d","from":"sip:%bu%d@bench.example",'
         b'"to":"sip:6002@bench.example","account":"%ba%d"}')
HELD_CHECK = b'{"op":"check","id":%d,"call_id":"%b-%d","from":"sip:%bh%d@held.example","to":"sip:6002@held.example"}'
END = b'{"op":"end","id":%d,"call_id":"%b-%d"}'
ANSWER = b'{"op":"answer","id":%d,"call_id":"%b-%d"}'
OPS = ("check", "end", "answer")


def call_id(tag: bytes, n: int) -> bytes:
    """The Call-ID of call number n of a run (RADIUS uses the same for its Acct-Session-Id)."""
    return CALL_ID % (tag, n)


def request(op: str, rid: int, tag: bytes, n: int, template: str = "bench", token: Any = None) -> bytes:
    """One request (without framing) for call n of the run `tag`."""
    if op == "check":
        if template == "held":
            return HELD_CHECK % (rid, tag, n, tag, n)
        return CHECK % (rid, tag, n, tag, n % USERS, tag, n % ACCOUNTS)
    if token is not None:  # the check's reply carried a token: echo it
        return orjson.dumps({"op": op, "id": rid, "call_id": call_id(tag, n).decode(), "token": token})
    return (END if op == "end" else ANSWER) % (rid, tag, n)


def auth_request(token: str) -> bytes:
    """The optional first message of each connection (off unless --auth-token is given)."""
    return orjson.dumps({"op": "auth", "token": token})


# -- reply checking --------------------------------------------------------------------------

OK = "ok"
SLOW_KEPT = 1000  # slow replies listed one by one (the count goes on)


def reply_kind(op: str, reply: Any, rid: int | None = None) -> str:
    """"ok" when `reply` is a success for `op`, else the kind of failure (tallied as `op:kind`)."""
    if not isinstance(reply, dict):
        return "invalid_reply"
    if rid is not None and reply.get("id") != rid:
        return "wrong_id"
    if reply.get("ok") is not True:
        err = reply.get("error")
        code = err.get("code") if isinstance(err, dict) else None
        return f"error:{code}"
    if op == "check":
        if "store_error" in reply:
            return "store_error"
        decision = reply.get("decision")
        if decision == "allow":
            return "duplicate" if reply.get("duplicate") else OK
        if decision == "deny":
            return f"deny:{reply.get('code')}:{reply.get('rule')}"
        return "invalid_reply"
    if op == "end":
        return OK if reply.get("released") is True else "not_released"
    if op == "answer":
        return OK if reply.get("found") is True else "not_found"
    if op == "auth":
        return OK
    return "invalid_reply"


def parse_lines(chunk: bytes) -> list[Any]:
    """Complete reply lines (`a\\nb`, no trailing newline) -> parsed objects, one orjson call for
    all of them; a line that is not JSON becomes None (and fails its check)."""
    try:
        parsed: list[Any] = orjson.loads(b"[" + chunk.replace(b"\n", b",") + b"]")
        return parsed
    except orjson.JSONDecodeError:
        out: list[Any] = []
        for line in chunk.split(b"\n"):
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                out.append(None)
        return out


# -- latency histogram -----------------------------------------------------------------------

_SUB = 128  # buckets per doubling above 255 us: < 0.8 % error
_HIST_SIZE = 40 * _SUB


def bucket_of(us: int) -> int:
    """The bucket of a latency in whole microseconds: exact below 256, log-linear above."""
    if us < 2 * _SUB:
        return max(us, 0)
    e = us.bit_length() - 8
    return min((e << 7) + (us >> e), _HIST_SIZE - 1)


def bucket_high(i: int) -> int:
    """The largest microsecond value that falls in bucket i."""
    if i < 2 * _SUB:
        return i
    e = (i >> 7) - 1
    m = i - (e << 7)
    return ((m + 1) << e) - 1


class Hist:
    """Latencies (seconds) in log-linear microsecond buckets, plus the exact max; lost requests
    count as infinitely slow in the percentiles."""

    __slots__ = ("counts", "lost", "max", "n", "total")

    def __init__(self) -> None:
        self.counts = [0] * _HIST_SIZE
        self.n = 0
        self.lost = 0
        self.max = 0.0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        """Record one latency."""
        us = int(seconds * 1e6)
        if us < 256:
            self.counts[us if us > 0 else 0] += 1
        else:
            e = us.bit_length() - 8
            self.counts[min((e << 7) + (us >> e), _HIST_SIZE - 1)] += 1
        self.n += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def percentile(self, p: float) -> float:
        """The p-th percentile in ms (nearest rank over answered + lost; inf if it is a lost one)."""
        total = self.n + self.lost
        if total == 0:
            return math.nan
        rank = max(1, math.ceil(total * p / 100.0))
        if rank > self.n:
            return math.inf
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(bucket_high(i) / 1000.0, self.max * 1000.0)
        return self.max * 1000.0  # pragma: no cover - rank <= n

    def summary(self) -> dict[str, Any]:
        """p50/p99/p99.9 and max in ms, counts; inf written as None (JSON)."""
        def ms(v: float) -> float | None:
            return None if math.isinf(v) or math.isnan(v) else round(v, 3)

        return {"n": self.n, "lost": self.lost, "p50": ms(self.percentile(50)), "p99": ms(self.percentile(99)),
                "p999": ms(self.percentile(99.9)),
                "max": None if self.lost else ms(self.max * 1000.0),
                "mean": ms(self.total / self.n * 1000.0) if self.n else None}


# -- CPU accounting --------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """User+system CPU seconds a process used so far (Linux /proc; 0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return float(total - idle), float(total)


class CpuWindow:
    """CPU used by this process, the given pids and the machine between start() and stop()."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.t0 = self.c0 = 0.0
        self.p0: dict[int, float] = {}
        self.m0 = (0.0, 0.0)
        self.result: dict[str, Any] = {}

    def start(self) -> None:
        """Open the window."""
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.p0 = {p: proc_cpu(p) for p in self.pids}
        self.m0 = machine_cpu()

    def stop(self) -> dict[str, Any]:
        """Close it: shares of one core (generator, each pid) and of the whole machine."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        gen = time.process_time() - self.c0
        m1 = machine_cpu()
        busy = (m1[0] - self.m0[0]) / (m1[1] - self.m0[1]) if m1[1] > self.m0[1] else math.nan
        services = {str(p): round((proc_cpu(p) - self.p0[p]) / wall, 3) for p in self.pids}
        cores = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
        self.result = {
            "wall_s": round(wall, 3),
            "generator_core": round(gen / wall, 3),
            "service_core": services,
            "machine_busy": round(busy, 3),
            # CPU (in cores) that neither this generator nor the given pids used: other load on the machine
            "other_cores": round(max(0.0, busy * cores - gen / wall - sum(services.values())), 3),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        }
        return self.result


def precise_timers() -> None:
    """Ask Linux for 1 ns timer slack (default 50 us) so select() wakes on time (best effort)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK


# -- stream connections (TCP, Unix) ----------------------------------------------------------

class Target:
    """Where to connect: ("tcp", (host, port)) / ("unix", path) / ("udp", (host, port))."""

    def __init__(self, kind: str, addr: Any) -> None:
        self.kind = kind
        self.addr = addr

    @classmethod
    def parse(cls, tcp: str | None, unix: str | None, udp: str | None) -> Target:
        """From the command-line options (exactly one given)."""
        if sum(x is not None for x in (tcp, unix, udp)) != 1:
            raise SystemExit("give exactly one of --tcp, --unix, --udp")
        if unix:
            return cls("unix", unix)
        hostport = tcp or udp
        assert hostport is not None
        host, port = hostport.rsplit(":", 1)
        return cls("tcp" if tcp else "udp", (host, int(port)))

    def connect(self) -> socket.socket:
        """A connected non-blocking socket."""
        if self.kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.addr)
        elif self.kind == "tcp":
            s = socket.create_connection(self.addr, timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.connect(self.addr)
        s.setblocking(False)
        return s


class Conn:
    """One stream connection: what to write, what came in, and the requests awaiting replies
    in order: (request id, op index, call number, time it counts from)."""

    __slots__ = ("buf", "closed", "inflight", "out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.buf = b""
        self.inflight: collections.deque[tuple[int, int, int, float]] = collections.deque()
        self.closed = False

    def flush(self) -> None:
        """Write as much as the socket takes."""
        if self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                return
            del self.out[:sent]

    def read(self) -> list[Any] | None:
        """Parsed complete replies now readable ([] if none; None when the peer closed)."""
        try:
            data = self.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return None
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n")
        if end < 0:
            self.buf = buf
            return []
        self.buf = buf[end + 1:]
        return parse_lines(buf[:end])


class Run:
    """The state every loop shares: ids, call numbers, tallies, histograms, window."""

    def __init__(self, ops: Sequence[str], tag: str, template: str, token_key: str = "token",
                 sample: int = 1) -> None:
        self.ops = list(ops)
        self.tag = tag.encode()
        self.template = template
        self.rid = 0
        self.next_call = 0
        self.sent = [0] * len(self.ops)
        self.sample = sample  # record the latency of one reply in `sample` (closed loops: 8)
        self.errors = Counter[str]()
        self.completed = 0  # calls whose every operation succeeded, inside the window
        self.completed_all = 0
        self.lost = 0
        self.late = 0  # replies to requests already counted lost
        self.hists = {op: Hist() for op in self.ops}
        self.tokens: dict[int, Any] = {}
        self.token_key = token_key
        self.measuring = False
        self.kind = OK  # the kind of the last reply checked
        self.bound: float | None = None  # seconds: replies slower than this are counted (`slow`)
        self.slow = Counter[str]()
        self.slow_at: list[tuple[str, int, float]] = []  # (op, call, latency) of the first slow replies

    def new_call(self) -> int:
        """The next call number."""
        n = self.next_call
        self.next_call += 1
        return n

    def encode(self, k: int, n: int) -> tuple[int, bytes]:
        """Request id and bytes of operation k of call n."""
        self.rid += 1
        rid = self.rid
        self.sent[k] += 1
        token = self.tokens.pop(n, None) if k and self.tokens else None
        return rid, request(self.ops[k], rid, self.tag, n, self.template, token)

    def on_reply(self, rid: int, k: int, n: int, reply: Any, latency: float) -> bool:
        """Check one reply; True when the call goes on (or completed). Tallies everything."""
        op = self.ops[k]
        kind = self.kind = reply_kind(op, reply, rid)
        if self.measuring:
            if rid % self.sample == 0:
                self.hists[op].add(latency)
            if self.bound is not None and latency > self.bound:
                self.slow[op] += 1
                if len(self.slow_at) < SLOW_KEPT:
                    self.slow_at.append((op, n, latency))
        if kind != OK:
            self.errors[f"{op}:{kind}"] += 1
            if self.tokens:
                self.tokens.pop(n, None)
            return False
        if k == 0 and len(self.ops) > 1:
            token = reply.get(self.token_key)
            if token is not None:
                self.tokens[n] = token
        if k == len(self.ops) - 1:
            self.completed_all += 1
            if self.measuring:
                self.completed += 1
        return True

    def result(self, **extra: Any) -> dict[str, Any]:
        """The JSON result common to every mode."""
        errors = sum(self.errors.values())
        if self.bound is not None:
            extra["slow"] = {"bound_ms": self.bound * 1000.0, **{op: self.slow[op] for op in self.ops}}
        return {"ops": self.ops, "tag": self.tag.decode(), "sent": dict(zip(self.ops, self.sent, strict=True)),
                "latency_sampled_1_in": self.sample,
                "completed": self.completed, "completed_all": self.completed_all,
                "errors": dict(self.errors.most_common()), "error_count": errors, "lost": self.lost,
                "late": self.late,
                "latency": {op: h.summary() for op, h in self.hists.items()}, **extra}


def _select(rl: list[Any], wl: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
    try:
        r, w, _ = select.select(rl, wl, [], max(timeout, 0.0))
    except InterruptedError:  # pragma: no cover
        return [], []
    return r, w


def stream_closed(target: Target, conns: int, depth: int, ops: Sequence[str], tag: str, *,
                  seconds: float | None = None, calls: int | None = None, warmup: float = 0.0,
                  lost_after: float = 2.0, template: str = "bench", pids: Sequence[int] = (),
                  auth_token: str | None = None) -> dict[str, Any]:
    """Closed loop over TCP/Unix: `depth` requests outstanding per connection, each call's next
    operation sent when its previous one succeeded. Either for `seconds` after `warmup` (calls
    completed in that window per second) or until `calls` calls are done (calls per second)."""
    run = Run(ops, tag, template, sample=8)
    cpu = CpuWindow(pids)
    cs = [Conn(target.connect()) for _ in range(conns)]
    by_sock = {c.sock: c for c in cs}
    last = len(ops) - 1
    issued = 0

    def start_call(c: Conn, now: float) -> None:
        nonlocal issued
        if calls is not None and issued >= calls:
            return
        issued += 1
        n = run.new_call()
        rid, msg = run.encode(0, n)
        c.out += msg + b"\n"
        c.inflight.append((rid, 0, n, now))

    now = time.perf_counter()
    for c in cs:
        if auth_token:
            c.out += auth_request(auth_token) + b"\n"
            c.inflight.append((0, -1, -1, now))
        for _ in range(depth):
            start_call(c, now)
        c.flush()
    t_start = now + warmup
    t_end = t_start + seconds if seconds is not None else math.inf
    if warmup <= 0:
        run.measuring = True
        cpu.start()
    stopping = False
    deadline = math.inf
    while True:
        now = time.perf_counter()
        if not run.measuring and now >= t_start and not stopping:
            run.measuring = True
            cpu.start()
        if not stopping and (now >= t_end or (calls is not None and issued >= calls)):
            stopping = True
            deadline = now + lost_after
            if seconds is not None:
                cpu.stop()
                run.measuring = False
        if stopping and (all(not c.inflight for c in cs) or now >= deadline):
            break
        rl = [c.sock for c in cs if not c.closed and c.inflight]
        if not rl:
            break
        wl = [c.sock for c in cs if c.out and not c.closed]
        wake = deadline if stopping else (t_end if run.measuring else t_start)
        r, w = _select(rl, wl, min(wake - now, 0.5))
        for s in w:
            by_sock[s].flush()
        for s in r:
            c = by_sock[s]
            replies = c.read()
            if replies is None:
                continue
            now = time.perf_counter()
            if stopping:  # lost means no reply for lost_after, not a slow drain
                deadline = now + lost_after
            inflight = c.inflight
            for reply in replies:
                if not inflight:
                    run.errors["unexpected_reply"] += 1
                    continue
                rid, k, n, t0 = inflight.popleft()
                if k < 0:  # the auth message
                    kind = reply_kind("auth", reply, None)
                    if kind != OK:
                        run.errors[f"auth:{kind}"] += 1
                    continue
                if run.on_reply(rid, k, n, reply, now - t0) and k < last:
                    rid2, msg = run.encode(k + 1, n)
                    c.out += msg + b"\n"
                    inflight.append((rid2, k + 1, n, now))
                elif not stopping:
                    start_call(c, now)
            c.flush()
    if seconds is None:
        cpu.stop()
    window = seconds if seconds is not None else cpu.result.get("wall_s", 0.0)
    for c in cs:
        run.lost += len(c.inflight)
        for _, k, _, _ in c.inflight:
            if k >= 0:
                run.hists[run.ops[k]].lost += 1
        if c.closed:
            run.errors["connection_closed"] += 1
        c.sock.close()
    done = run.completed if seconds is not None else run.completed_all
    return run.result(mode="closed", transport=target.kind, conns=conns, depth=depth, window_s=window,
                      rate=round(done / window, 1) if window else 0.0, cpu=cpu.result)


def udp_closed(target: Target, socks: int, window: int, ops: Sequence[str], tag: str, *,
               seconds: float | None = None, calls: int | None = None, warmup: float = 0.0,
               lost_after: float = 1.0, template: str = "bench", pids: Sequence[int] = ()) -> dict[str, Any]:
    """Closed loop over UDP: `window` requests outstanding per socket, replies matched by id; a
    request unanswered after `lost_after` is lost (and its slot reused for a new call)."""
    run = Run(ops, tag, template, sample=8)
    cpu = CpuWindow(pids)
    ss = [target.connect() for _ in range(socks)]
    pending: dict[int, tuple[int, int, float, int]] = {}  # rid -> (op index, call, sent at, socket index)
    outstanding = [0] * socks
    lost_ids: set[int] = set()
    last = len(ops) - 1
    issued = 0
    stopping = False

    def send(i: int, k: int, n: int, now: float) -> None:
        rid, msg = run.encode(k, n)
        pending[rid] = (k, n, now, i)
        outstanding[i] += 1
        try:
            ss[i].send(msg)
        except OSError as exc:  # the request is lost: its slot frees after lost_after
            run.errors[f"send_error:{type(exc).__name__}"] += 1

    def start_call(i: int, now: float) -> None:
        nonlocal issued
        if stopping or (calls is not None and issued >= calls):
            return
        issued += 1
        send(i, 0, run.new_call(), now)

    now = time.perf_counter()
    for i in range(socks):
        for _ in range(window):
            start_call(i, now)
    t_start = now + warmup
    t_end = t_start + seconds if seconds is not None else math.inf
    if warmup <= 0:
        run.measuring = True
        cpu.start()
    deadline = math.inf
    next_sweep = now + 0.1
    index = {s: i for i, s in enumerate(ss)}
    while True:
        now = time.perf_counter()
        if not run.measuring and now >= t_start and not stopping:
            run.measuring = True
            cpu.start()
        if not stopping and (now >= t_end or (calls is not None and issued >= calls)):
            stopping = True
            deadline = now + lost_after
            if seconds is not None:
                cpu.stop()
                run.measuring = False
        if stopping and (not pending or now >= deadline):
            break
        if now >= next_sweep:  # requests unanswered for lost_after: lost, slot reused
            next_sweep = now + 0.1
            old = [rid for rid, v in pending.items() if now - v[2] > lost_after]
            for rid in old:
                k, _n, _t, i = pending.pop(rid)
                lost_ids.add(rid)
                outstanding[i] -= 1
                run.lost += 1
                if run.measuring:
                    run.hists[run.ops[k]].lost += 1
                start_call(i, now)
        r, _ = _select(ss, [], 0.1)
        for s in r:
            i = index[s]
            while True:
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    run.errors["recv_error"] += 1
                    break
                now = time.perf_counter()
                try:
                    reply = orjson.loads(data)
                except orjson.JSONDecodeError:
                    reply = None
                rid = reply.get("id") if isinstance(reply, dict) else None
                entry = pending.pop(rid, None) if isinstance(rid, int) else None
                if entry is None:
                    if rid in lost_ids:  # ids are never reused: the reply of a request counted lost
                        run.late += 1
                    else:
                        run.errors["unexpected_reply"] += 1
                    continue
                k, n, t0, _ = entry
                outstanding[i] -= 1
                if run.on_reply(rid, k, n, reply, now - t0) and k < last:  # type: ignore[arg-type]
                    send(i, k + 1, n, now)
                else:
                    start_call(i, now)
    if seconds is None:
        cpu.stop()
    win = seconds if seconds is not None else cpu.result.get("wall_s", 0.0)
    for k, _n, _t, _i in pending.values():
        run.lost += 1
        run.hists[run.ops[k]].lost += 1
    for s in ss:
        s.close()
    done = run.completed if seconds is not None else run.completed_all
    return run.result(mode="closed", transport="udp", conns=socks, depth=window, window_s=win,
                      rate=round(done / win, 1) if win else 0.0, cpu=cpu.result)


def stream_open(target: Target, conns: int, rate: float, seconds: float, tag: str, *, hold: float = 1.0,
                warmup: float = 1.0, lost_after: float = 2.0, pids: Sequence[int] = (),
                auth_token: str | None = None, ops: Sequence[str] = ("check", "end"),
                start_at: float | None = None, bound: float | None = None) -> dict[str, Any]:
    """Open loop over TCP/Unix: check+end calls at `rate` per second for warmup+seconds, each
    timed from its scheduled send (see the module text). `ops=("check",)`: checks only (the
    admitted calls stay held). `start_at`: the first check is due at this wall-clock time
    (`time.time()`), so a caller can line events up with the schedule. `bound` (seconds):
    replies slower than this are counted (`slow`). The result's `outcomes` give, per reply
    kind, how many and the first and last scheduled time (seconds after `start_wall`)."""
    precise_timers()
    if tuple(ops) not in (("check", "end"), ("check",)):
        raise ValueError("open loop: ops are check,end or check")
    run = Run(ops, tag, "bench")
    run.bound = bound
    outcomes: dict[str, list[float]] = {}  # kind -> [count, first, last scheduled offset]
    cpu = CpuWindow(pids)
    cs = [Conn(target.connect()) for _ in range(conns)]
    by_sock = {c.sock: c for c in cs}
    conn_index = {c.sock: i for i, c in enumerate(cs)}
    interval = 1.0 / rate
    total = int(rate * (warmup + seconds))
    first_measured = int(rate * warmup)
    lag = Hist()  # how late this generator sent each check
    ends: list[tuple[float, int, int]] = []  # heap of (due, call, connection index)
    t0 = time.perf_counter() + 0.05
    if start_at is not None:
        t0 = time.perf_counter() + max(start_at - time.time(), 0.0)
    start_wall = time.time() + (t0 - time.perf_counter())
    if auth_token:
        for c in cs:
            c.out += auth_request(auth_token) + b"\n"
            c.inflight.append((0, -1, -1, t0))
            c.flush()
    i = 0
    measuring_from = t0 + first_measured * interval
    t_sched_end = t0 + total * interval
    tail = (hold if len(run.ops) > 1 else 0.0) + lost_after  # after the last check: its end, then lost
    started = False
    while True:
        now = time.perf_counter()
        if not started and now >= measuring_from:
            started = True
            cpu.start()
        while i < total:
            due = t0 + i * interval
            if due > now:
                break
            c = cs[i % conns]
            rid, msg = run.encode(0, i)
            c.out += msg + b"\n"
            c.inflight.append((rid, 0, i, due))
            if i >= first_measured:
                lag.add(now - due)
            i += 1
        while ends and ends[0][0] <= now:
            due, n, ci = heapq.heappop(ends)
            c = cs[ci]
            rid, msg = run.encode(1, n)
            c.out += msg + b"\n"
            c.inflight.append((rid, 1, n, due))
        for c in cs:
            c.flush()
        pending = any(c.inflight for c in cs)
        if i >= total and not ends and (not pending or now >= t_sched_end + tail):
            break
        next_due = t0 + i * interval if i < total else math.inf
        if ends:
            next_due = min(next_due, ends[0][0])
        if next_due == math.inf:
            next_due = t_sched_end + tail
        rl = [c.sock for c in cs if not c.closed]
        wl = [c.sock for c in cs if c.out and not c.closed]
        if not rl:
            break
        r, w = _select(rl, wl, min(next_due - time.perf_counter(), 0.5))
        for s in w:
            by_sock[s].flush()
        for s in r:
            c = by_sock[s]
            replies = c.read()
            if replies is None:
                continue
            now = time.perf_counter()
            for reply in replies:
                if not c.inflight:
                    run.errors["unexpected_reply"] += 1
                    continue
                rid, k, n, due = c.inflight.popleft()
                if k < 0:
                    if reply_kind("auth", reply, None) != OK:
                        run.errors["auth:" + reply_kind("auth", reply, None)] += 1
                    continue
                run.measuring = n >= first_measured
                goes_on = run.on_reply(rid, k, n, reply, now - due)
                key = f"{run.ops[k]}:{run.kind}"
                if run.kind == "store_error":  # and the decision the rules gave without the store
                    key += f":{reply.get('decision')}"
                seen = outcomes.get(key)
                if seen is None:
                    outcomes[key] = [1, due - t0, due - t0]
                else:
                    seen[0] += 1
                    seen[1] = min(seen[1], due - t0)
                    seen[2] = max(seen[2], due - t0)
                if goes_on and k == 0 and len(run.ops) > 1:
                    # the end is due `hold` after the scheduled check, never before its answer
                    heapq.heappush(ends, (max(due + hold, now), n, conn_index[s]))
    cpu.stop()
    run.measuring = True
    for c in cs:
        for _, k, n, _ in c.inflight:
            if k >= 0:
                run.lost += 1
                if n >= first_measured:
                    run.hists[run.ops[k]].lost += 1
        if c.closed:
            run.errors["connection_closed"] += 1
        c.sock.close()
    offered = total - first_measured
    return run.result(mode="open", transport=target.kind, conns=conns, offered_rate=rate, window_s=seconds,
                      hold_s=hold, offered=offered,
                      rate=round(run.completed / seconds, 1) if seconds else 0.0,
                      send_lag=lag.summary(), cpu=cpu.result, start_wall=round(start_wall, 6),
                      outcomes={k: {"n": int(v[0]), "first_s": round(v[1], 4), "last_s": round(v[2], 4)}
                                for k, v in sorted(outcomes.items())},
                      # the slow replies: [op, scheduled s after start_wall, latency ms]
                      slow_at=[[op, round(n * interval, 4), round(lat * 1000.0, 3)] for op, n, lat in run.slow_at
                               if op == "check"])


# -- command line ----------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tcp", help="HOST:PORT")
    p.add_argument("--unix", help="socket path")
    p.add_argument("--udp", help="HOST:PORT")
    p.add_argument("--tag", default=f"lg{os.getpid()}", help="prefix of call ids and users (unique per run)")
    p.add_argument("--pid", type=int, action="append", default=[], help="service pid to measure CPU of (repeat)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before the measured window")
    p.add_argument("--lost-after", type=float, default=2.0, help="a reply later than this is lost")
    p.add_argument("--auth-token", help="send {op: auth, token} first on each connection")


def main(argv: list[str] | None = None) -> int:
    """Run one measurement; print its JSON result on stdout (and a line on stderr)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("closed", help="closed loop (pipelined / windowed)")
    _common(c)
    c.add_argument("--conns", type=int, default=8)
    c.add_argument("--depth", type=int, default=64, help="requests outstanding per connection")
    c.add_argument("--seconds", type=float, help="measured window (default 10 unless --calls)")
    c.add_argument("--calls", type=int, help="run until this many calls are done instead")
    c.add_argument("--ops", default="check,end", help="operations of each call (check,end / check,answer / end)")
    c.add_argument("--template", choices=("bench", "held"), default="bench")
    o = sub.add_parser("open", help="open loop at a fixed offered rate")
    _common(o)
    o.add_argument("--conns", type=int, default=4)
    o.add_argument("--rate", type=float, default=2000.0, help="calls (check+end) offered per second")
    o.add_argument("--seconds", type=float, default=12.0)
    o.add_argument("--hold", type=float, default=1.0, help="seconds from a check to its end")
    o.add_argument("--ops", default="check,end", help="check,end (default) or check (checks only, calls stay held)")
    o.add_argument("--start-at", type=float, help="wall-clock time (epoch seconds) the first check is due")
    o.add_argument("--bound-ms", type=float, help="count replies slower than this (result: slow)")
    r = sub.add_parser("radius", help="RADIUS Access-Requests, closed loop (see bench_radius.py)")
    r.add_argument("--auth", required=True, help="HOST:PORT of the RADIUS auth listener")
    r.add_argument("--acct", help="HOST:PORT of the acct listener: end each allowed call with a Stop")
    r.add_argument("--secret", default="bench-secret")
    r.add_argument("--window", type=int, default=32)
    r.add_argument("--seconds", type=float, default=10.0)
    r.add_argument("--warmup", type=float, default=1.0)
    r.add_argument("--lost-after", type=float, default=1.0)
    r.add_argument("--tag", default=f"rg{os.getpid()}")
    r.add_argument("--pid", type=int, action="append", default=[])
    args = ap.parse_args(argv)
    if args.mode == "radius":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_radius import radius_closed  # type: ignore[import-not-found]

        host, port = args.auth.rsplit(":", 1)
        acct = None
        if args.acct:
            ahost, aport = args.acct.rsplit(":", 1)
            acct = (ahost, int(aport))
        res = radius_closed((host, int(port)), args.secret.encode(), args.seconds, args.window, args.warmup,
                            args.tag, acct=acct, lost_after=args.lost_after, pids=args.pid)
    else:
        target = Target.parse(args.tcp, args.unix, args.udp)
        if args.mode == "closed":
            ops = [x for x in args.ops.split(",") if x]
            if not ops or any(op not in OPS for op in ops):
                raise SystemExit(f"--ops: a comma list of {', '.join(OPS)}")
            seconds = args.seconds if args.seconds is not None or args.calls else 10.0
            kw: dict[str, Any] = dict(seconds=seconds, calls=args.calls, warmup=args.warmup if seconds else 0.0,
                                      lost_after=args.lost_after, template=args.template, pids=args.pid)
            if target.kind == "udp":
                res = udp_closed(target, args.conns, args.depth, ops, args.tag, **kw)
            else:
                res = stream_closed(target, args.conns, args.depth, ops, args.tag, auth_token=args.auth_token, **kw)
        else:
            if target.kind == "udp":
                raise SystemExit("open loop: --tcp or --unix")
            ops = tuple(x for x in args.ops.split(",") if x)
            if ops not in (("check", "end"), ("check",)):
                raise SystemExit("--ops: check,end or check")
            res = stream_open(target, args.conns, args.rate, args.seconds, args.tag, hold=args.hold,
                              warmup=args.warmup, lost_after=args.lost_after, pids=args.pid,
                              auth_token=args.auth_token, ops=ops, start_at=args.start_at,
                              bound=args.bound_ms / 1000.0 if args.bound_ms is not None else None)
    sys.stdout.write(orjson.dumps(res).decode() + "\n")
    print(describe(res), file=sys.stderr)
    return 0


def describe(res: dict[str, Any]) -> str:
    """One human line for a result."""
    lat = res.get("latency", {}).get("check", {})
    errs = res.get("error_count", 0)
    cpu = res.get("cpu", {})
    head = f"{res['mode']} {res.get('transport', 'radius')}: {res['rate']:,.0f}/s"
    if res["mode"] == "open":
        head += f" (offered {res['offered_rate']:,.0f}/s)"
    return (f"{head}  check p50 {lat.get('p50')} p99 {lat.get('p99')} p99.9 {lat.get('p999')} max {lat.get('max')} ms"
            f"  errors {errs}{' ' + str(res['errors']) if errs else ''}  lost {res['lost']}"
            f"  generator {cpu.get('generator_core', 0):.0%} of a core, services {cpu.get('service_core')}, "
            f"machine {cpu.get('machine_busy', 0):.0%} busy")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
