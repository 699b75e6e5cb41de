"""Benchmark the running service: closed loop with pipelining and open loop at a fixed rate.

`make bench` starts a `callpolicy serve` on the embedded store on free loopback ports and
drives it over TCP, Unix and UDP. The load generator pre-encodes every request and only
counts reply lines, so it costs far less CPU than the service (both share the 2 cores).

Figures printed: check+end pairs per second (closed loop), and p50/p99/p99.9 latency of
checks at a fixed offered rate (open loop). Run it a few times: these machines are noisy.

Reusable pieces (`closed_loop`, `open_loop`, `start_service`) are imported by the Redis,
RADIUS and Kamailio benches.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    """A free TCP+UDP port on 127.0.0.1."""
    from tests.helpers import free_port as fp

    return fp()


def start_service(store: str | None = None, port: int | None = None, extra: list[str] | None = None,
                  workdir: Path | None = None) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start `callpolicy serve` (logs to a file), wait for it; returns (process, port, unix path)."""
    work = workdir or Path(tempfile.mkdtemp(prefix="cpbench-"))
    port = port or free_port()
    unix = str(work / "bench.sock")
    cmd = [sys.executable, "-m", "policy", "--config", str(ROOT / "service.toml"), "serve",
           "--listen", f"127.0.0.1:{port}", "--unix", unix, "--snapshot", "none", "--metrics", "none",
           "--log-format", "json"]
    if store:
        cmd += ["--store", store]
    cmd += extra or []
    log = open(work / "serve.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b'{"op":"ping"}\n')
                if b"pong" in s.recv(4096):
                    return proc, port, unix
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"service did not start; see {work / 'serve.log'}")


def pair_messages(n: int, tag: str, accounts: int = 1000) -> Iterator[bytes]:
    """check+end pairs for n calls spread over many accounts and users (so they are allowed)."""
    for i in range(n):
        cid = f"{tag}-{i}"
        yield orjson.dumps({"op": "check", "call_id": cid, "from": f"sip:u{i}@bench.example",
                            "to": "sip:6002@bench.example", "account": f"acct{i % accounts}"}) + b"\n"
        yield orjson.dumps({"op": "end", "call_id": cid}) + b"\n"


def pad_datagram(msg: bytes, size: int) -> bytes:
    """A JSON object grown to `size` bytes with an ignored `pad` field (room for its answer over UDP)."""
    room = size - len(msg) - len(b',"pad":""')
    return msg[:-1] + b',"pad":"' + b"x" * room + b'"}' if room > 0 else msg


def _nodelay(transport: asyncio.BaseTransport) -> Any:
    """TCP_NODELAY on a TCP transport (not on a Unix socket); returns the transport."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport


class _Pipe(asyncio.Protocol):
    """Sends pre-encoded lines keeping `window` outstanding; records each reply's latency."""

    def __init__(self, msgs: list[bytes], window: int, done: asyncio.Future[None],
                 lat: list[float]) -> None:
        self.msgs = msgs
        self.window = window
        self.done = done
        self.lat = lat
        self.sent = 0
        self.got = 0
        self.times: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _nodelay(transport)
        self._fill()

    def _fill(self) -> None:
        assert self.transport is not None
        end = min(len(self.msgs), self.got + self.window)
        if end > self.sent:
            now = time.perf_counter()
            self.transport.write(b"".join(self.msgs[self.sent:end]))
            self.times.extend([now] * (end - self.sent))
            self.sent = end

    def data_received(self, data: bytes) -> None:
        n = data.count(b"\n")
        now = time.perf_counter()
        for _ in range(n):
            self.lat.append(now - self.times.popleft())
        self.got += n
        if self.got >= len(self.msgs):
            if not self.done.done():
                self.done.set_result(None)
            return
        self._fill()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"lost after {self.got} replies: {exc}"))


async def closed_loop(connect: Callable[[Callable[[], asyncio.Protocol]], Any], msgs_per_conn: list[list[bytes]],
                      window: int) -> tuple[float, int, list[float]]:
    """Run every connection to completion; returns (seconds, replies, latencies)."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    futs = []
    t0 = time.perf_counter()
    for msgs in msgs_per_conn:
        fut: asyncio.Future[None] = loop.create_future()
        await connect(lambda m=msgs, f=fut: _Pipe(m, window, f, lat))  # type: ignore[misc]
        futs.append(fut)
    await asyncio.gather(*futs)
    return time.perf_counter() - t0, sum(len(m) for m in msgs_per_conn), lat


class _Open(asyncio.Protocol):
    """Open loop: the caller writes at a fixed rate; replies are timed against send times."""

    def __init__(self, lat: list[float]) -> None:
        self.lat = lat
        self.times: collections.deque[float] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        for _ in range(data.count(b"\n")):
            self.lat.append(now - self.times.popleft())


async def open_loop(connect: Callable[[Callable[[], asyncio.Protocol]], Any], msgs: list[bytes], rate: float,
                    conns: int = 4) -> tuple[float, list[float]]:
    """Send `msgs` at `rate` per second round-robin over `conns` connections; returns (seconds, latencies)."""
    lat: list[float] = []
    protos = []
    for _ in range(conns):
        _, proto = await connect(lambda: _Open(lat))
        protos.append(proto)
    t0 = time.perf_counter()
    interval = 1.0 / rate
    for i, m in enumerate(msgs):
        due = t0 + i * interval
        delay = due - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        p = protos[i % conns]
        p.times.append(time.perf_counter())
        p.transport.write(m)
    deadline = time.perf_counter() + 5
    while len(lat) < len(msgs) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    for p in protos:
        p.transport.close()
    return time.perf_counter() - t0, lat


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, msgs: list[bytes], window: int, done: asyncio.Future[None], lat: list[float]) -> None:
        self.msgs, self.window, self.done, self.lat = msgs, window, done, lat
        self.sent = self.got = 0
        self.times: dict[int, float] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._fill()

    def _fill(self) -> None:
        assert self.transport is not None
        while self.sent < len(self.msgs) and self.sent - self.got < self.window:
            self.times[self.sent] = time.perf_counter()
            self.transport.sendto(self.msgs[self.sent])
            self.sent += 1

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.perf_counter()
        self.lat.append(now - self.times.pop(self.got, now))
        self.got += 1
        if self.got >= len(self.msgs):
            if not self.done.done():
                self.done.set_result(None)
            return
        self._fill()


def pct(lat: list[float], p: float) -> float:
    """The p-th percentile in milliseconds."""
    if not lat:
        return float("nan")
    s = sorted(lat)
    return s[min(len(s) - 1, int(len(s) * p / 100))] * 1000


def line(name: str, n: int, secs: float, lat: list[float], unit: str = "pairs/s", per: int = 2) -> str:
    """One result line."""
    return (f"{name:<38} {n / per / secs:>10,.0f} {unit:<9} p50 {pct(lat, 50):6.3f} ms  "
            f"p99 {pct(lat, 99):6.3f} ms  p99.9 {pct(lat, 99.9):6.3f} ms")


async def run_all(port: int, unix: str, pairs: int, conns: int, window: int, rate: float,
                  seconds: float) -> list[str]:
    """Every scenario against one running service."""
    loop = asyncio.get_running_loop()
    out = []

    def tcp(factory: Callable[[], asyncio.Protocol]) -> Any:
        return loop.create_connection(factory, "127.0.0.1", port)

    def uds(factory: Callable[[], asyncio.Protocol]) -> Any:
        return loop.create_unix_connection(factory, unix)

    def split(msgs: list[bytes]) -> list[list[bytes]]:
        per = len(msgs) // conns // 2 * 2
        return [msgs[i * per:(i + 1) * per] for i in range(conns)]

    # warm up
    await closed_loop(tcp, split(list(pair_messages(2000, "warm"))), window)
    for name, connect in (("tcp", tcp), ("unix", uds)) if unix else (("tcp", tcp),):
        secs, n, lat = await closed_loop(connect, split(list(pair_messages(pairs, f"c-{name}"))), window)
        out.append(line(f"closed {name} {conns}x{window} pipelined", n, secs, lat))
    # UDP closed loop (one datagram per request, window outstanding per socket)
    lat_u: list[float] = []
    futs = []
    t0 = time.perf_counter()
    # padded: a UDP answer is never larger than its request (docs/security.md)
    udp_msgs = [pad_datagram(m.rstrip(b"\n"), 128) for m in pair_messages(pairs // 2, "udp")]
    per = len(udp_msgs) // conns // 2 * 2
    for i in range(conns):
        fut: asyncio.Future[None] = loop.create_future()
        chunk = udp_msgs[i * per:(i + 1) * per]
        await loop.create_datagram_endpoint(lambda c=chunk, f=fut: _Udp(c, 32, f, lat_u),  # type: ignore[misc]
                                            remote_addr=("127.0.0.1", port))
        futs.append(fut)
    try:
        await asyncio.wait_for(asyncio.gather(*futs), 60)
        out.append(line(f"closed udp {conns}x32", per * conns, time.perf_counter() - t0, lat_u))
    except TimeoutError:
        out.append(f"closed udp: datagrams lost ({len(lat_u)} of {per * conns} answered)")
    # open loop: checks only (then end them) at a fixed offered rate
    n_open = int(rate * seconds)
    checks = [m for i, m in enumerate(pair_messages(n_open, "open")) if i % 2 == 0]
    secs, lat = await open_loop(tcp, checks, rate)
    out.append(f"{'open tcp checks @ ' + format(rate, ',.0f') + '/s':<38} {len(lat) / secs:>10,.0f} checks/s  "
               f"p50 {pct(lat, 50):6.3f} ms  p99 {pct(lat, 99):6.3f} ms  p99.9 {pct(lat, 99.9):6.3f} ms")
    ends = [m for i, m in enumerate(pair_messages(n_open, "open")) if i % 2 == 1]
    await closed_loop(tcp, [ends], window)
    return out


def main(argv: list[str] | None = None) -> int:
    """Start a service (unless --port is given) and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, help="drive an already running service on this port")
    ap.add_argument("--unix", help="its Unix socket (with --port)")
    ap.add_argument("--store", help="store for the started service (default: embedded)")
    ap.add_argument("--pairs", type=int, default=100_000, help="check+end pairs per closed-loop run")
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--window", type=int, default=64, help="requests outstanding per connection")
    ap.add_argument("--rate", type=float, default=2000.0, help="offered checks/s for the open loop")
    ap.add_argument("--seconds", type=float, default=5.0, help="open-loop duration")
    args = ap.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    proc = None
    if args.port:
        port, unix = args.port, args.unix or ""
    else:
        proc, port, unix = start_service(args.store)
    print(f"callpolicy bench: store={args.store or 'embedded'} cores={os.cpu_count()} pairs={args.pairs} "
          f"python={sys.version.split()[0]}")
    try:
        for result in runner(run_all(port, unix, args.pairs, args.conns, args.window, args.rate, args.seconds)):
            print(result, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    _ = statistics
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
