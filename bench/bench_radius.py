"""Benchmark the RADIUS front end: Access-Request round trips per second and latency.

Starts a `callpolicy serve` (embedded store, a temporary service.toml with a `[radius]` table
on free loopback ports) unless `--auth HOST:PORT` points at a running one, then drives it from
this one process over one UDP socket with a window of outstanding requests (closed loop).

With two or more CPUs the service is pinned to one CPU and the generator to the others
(`--no-pin` to let the scheduler place them): on a 2-core machine the two otherwise keep
preempting each other and the figure measures the scheduler more than the service.

Every Access-Request is a new call (its own Acct-Session-Id, account and From user, so every
check is admitted and none is a duplicate) and is encoded with raw struct packing: the load
generator has to be much cheaper than the service, both share the machine's cores. Replies are
matched by identifier and their Response Authenticator is verified.

Printed: requests/s, p50/p99/p99.9 round-trip latency, lost requests, and (when the bench
started the service) the service's CPU time per round trip read from /proc - on a shared or
small machine the service is often not on a core of its own, and that figure says what it
does when it is. `--acct` also measures Accounting Start+Stop pairs. `--json` prints JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ACCESS_REQUEST = 1
ACCESS_ACCEPT = 2
ACCESS_REJECT = 3
ACCOUNTING_REQUEST = 4
ACCOUNTING_RESPONSE = 5


def free_port() -> int:
    """A free TCP+UDP port on 127.0.0.1."""
    from tests.helpers import free_port as fp

    return fp()


def attr(code: int, value: bytes) -> bytes:
    """One encoded attribute."""
    return bytes((code, len(value) + 2)) + value


def access_request(ident: int, auth: bytes, n: int, secret: bytes, message_auth: bool) -> bytes:
    """An Access-Request for a new call number n (User-Name, Acct-Session-Id, Calling/Called-Station-Id)."""
    attrs = (attr(1, b"bench-%d" % n) + attr(44, b"rb-%d-%d@bench" % (os.getpid(), n))
             + attr(31, b"sip:u%d@bench.example" % n) + attr(30, b"sip:+4930%07d@bench.example" % n)
             + attr(4, b"\x7f\x00\x00\x01"))
    if message_auth:
        attrs += attr(80, b"\x00" * 16)
    head = struct.pack("!BBH", ACCESS_REQUEST, ident, 20 + len(attrs))
    if message_auth:
        mac = hmac.new(secret, head + auth + attrs, "md5").digest()
        attrs = attrs[:-16] + mac
    return head + auth + attrs


def acct_request(ident: int, n: int, status: int, secret: bytes) -> bytes:
    """An Accounting-Request (Start=1 / Stop=2) for call n; the authenticator is computed."""
    attrs = (attr(40, struct.pack("!I", status)) + attr(1, b"bench-%d" % n)
             + attr(44, b"ra-%d-%d@bench" % (os.getpid(), n)) + attr(31, b"sip:u%d@bench.example" % n))
    head = struct.pack("!BBH", ACCOUNTING_REQUEST, ident, 20 + len(attrs))
    auth = hashlib.md5(head + b"\x00" * 16 + attrs + secret).digest()
    return head + auth + attrs


def status_server(addr: tuple[str, int], secret: bytes, timeout: float = 0.2) -> bool:
    """Send a Status-Server (RFC 5997, with Message-Authenticator); True if a valid reply came."""
    auth = os.urandom(16)
    attrs = attr(80, b"\x00" * 16)
    head = struct.pack("!BBH", 12, 0, 20 + len(attrs))
    attrs = attrs[:2] + hmac.new(secret, head + auth + attrs, "md5").digest()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(head + auth + attrs, addr)
            data = s.recv(4096)
        except OSError:
            return False
    return len(data) >= 20 and hmac.compare_digest(
        hashlib.md5(data[:4] + auth + data[20:] + secret).digest(), data[4:20])


def start_service(secret: str, workdir: Path, log_level: str) -> tuple[subprocess.Popen[bytes], int, int, int]:
    """`callpolicy serve` with [radius]; returns (process, tcp port, auth port, acct port)."""
    tcp, auth, acct = free_port(), free_port(), free_port()
    cfg = workdir / "service.toml"
    cfg.write_text(
        f'[listen]\ntcp = "127.0.0.1:{tcp}"\nudp = false\nunix = false\n\n'
        f'[rules]\ndir = "{ROOT / "rules"}"\nwatch = false\n\n'
        '[store]\nsnapshot = false\n\n[metrics]\nlisten = false\n\n'
        f'[log]\nlevel = "{log_level}"\nformat = "json"\n\n'
        f'[radius]\nauth = "127.0.0.1:{auth}"\nacct = "127.0.0.1:{acct}"\n'
        f'clients = [{{address = "127.0.0.1", secret = "{secret}", style = "avp", name = "bench"}}]\n')
    log = open(workdir / "serve.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "policy", "--config", str(cfg), "serve"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"callpolicy exited: {(workdir / 'serve.log').read_text()[-2000:]}")
        # ready when a signed Status-Server gets its answer: that is our listener with our secret
        # (a ping alone could reach a stranger that grabbed the same free port first)
        if status_server(("127.0.0.1", auth), secret.encode()):
            return proc, tcp, auth, acct
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("callpolicy did not start")


def closed_loop(addr: tuple[str, int], secret: bytes, seconds: float, window: int, warmup: float,
                kind: str = "auth", message_auth: bool = False) -> dict[str, Any]:
    """Keep `window` requests outstanding for `seconds`; round trips/s and latency percentiles."""
    assert 1 <= window <= 256
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect(addr)
    sock.setblocking(False)
    pending: dict[int, tuple[float, bytes, int]] = {}  # id -> (sent at, request authenticator, stage)
    free_ids = list(range(256))
    n = 0
    done = 0
    bad = 0
    lost = 0
    lat: list[float] = []
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds
    measured_done = 0

    def send_new(stage: int = 1, call: int | None = None) -> None:
        nonlocal n
        ident = free_ids.pop()
        if kind == "auth":
            auth = os.urandom(16)
            n += 1
            data = access_request(ident, auth, n, secret, message_auth)
        else:
            if call is None:
                n += 1
                call = n
            data = acct_request(ident, call, stage, secret)
            auth = data[4:20]
        pending[ident] = (time.perf_counter(), auth, stage if kind == "auth" else stage * 1_000_000_000 + call)
        sock.send(data)

    for _ in range(window):
        send_new()
    while True:
        now = time.perf_counter()
        if now >= t_end:
            break
        r, _, _ = select.select([sock], [], [], 1.0)
        if not r:
            # everything outstanding is lost: count and refill
            lost += len(pending)
            free_ids.extend(pending)
            pending.clear()
            for _ in range(window):
                send_new()
            continue
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                break
            t = time.perf_counter()
            ident = data[1]
            entry = pending.pop(ident, None)
            if entry is None:
                continue
            sent, auth, stage = entry
            free_ids.append(ident)
            check = hashlib.md5(data[:4] + auth + data[20:] + secret).digest()
            if not hmac.compare_digest(check, data[4:20]):
                bad += 1
            if kind == "acct" and stage // 1_000_000_000 == 1:
                # Start answered: send its Stop (the pair is one round trip in the figures)
                send_new(2, stage % 1_000_000_000)
                continue
            done += 1
            if sent >= t_measure:
                measured_done += 1
                lat.append((t - sent) * 1000)
            send_new()
    elapsed = time.perf_counter() - t_measure
    sock.close()
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(len(lat) * p))], 3) if lat else 0.0

    return {
        "kind": kind, "window": window, "seconds": round(elapsed, 2),
        "per_second": round(measured_done / elapsed), "completed": done, "lost": lost, "bad_replies": bad,
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
        "mean_ms": round(statistics.fmean(lat), 3) if lat else 0.0,
    }


def pin(service_pid: int) -> None:
    """Service on the last CPU, this load generator on the others (no-op with one CPU)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            os.sched_setaffinity(service_pid, {cpus[-1]})
            os.sched_setaffinity(0, set(cpus[:-1]))
    except (AttributeError, OSError):
        pass


def cpu_seconds(pid: int) -> float:
    """User+system CPU a process used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def measured(proc: subprocess.Popen[bytes] | None, run: Any) -> dict[str, Any]:
    """Run one closed loop; with our own service also its CPU time per request."""
    c0, t0 = (cpu_seconds(proc.pid), time.perf_counter()) if proc else (0.0, 0.0)
    r: dict[str, Any] = run()
    if proc is not None and r["completed"]:
        used = cpu_seconds(proc.pid) - c0
        r["server_cpu_us"] = round(used / r["completed"] * 1e6, 1)
        r["server_busy"] = round(used / (time.perf_counter() - t0), 2)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--auth", help="HOST:PORT of a running service's RADIUS auth port (default: start one)")
    p.add_argument("--acct-port", type=int, help="acct port of the running service (with --auth)")
    p.add_argument("--secret", default="bench-secret", help="shared secret (a client entry for 127.0.0.1)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--window", type=int, default=32, help="requests outstanding (1-256)")
    p.add_argument("--message-authenticator", action="store_true", help="sign requests (RFC 2869)")
    p.add_argument("--acct", action="store_true", help="also measure Accounting Start+Stop pairs")
    p.add_argument("--log-level", default="info", help="service log level when the bench starts it")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the service and the load generator to different CPUs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    secret = args.secret.encode()
    proc = None
    try:
        if args.auth:
            host, port = args.auth.rsplit(":", 1)
            auth_addr = (host, int(port))
            acct_addr = (host, args.acct_port or int(port) + 1)
        else:
            work = Path(tempfile.mkdtemp(prefix="cpbench-radius-"))
            proc, _tcp, auth_port, acct_port = start_service(args.secret, work, args.log_level)
            if args.pin:
                pin(proc.pid)
            auth_addr, acct_addr = ("127.0.0.1", auth_port), ("127.0.0.1", acct_port)
        results = [measured(proc, lambda: closed_loop(auth_addr, secret, args.seconds, args.window,
                                                      args.warmup, "auth", args.message_authenticator))]
        if args.acct:
            results.append(measured(proc, lambda: closed_loop(acct_addr, secret, args.seconds, args.window,
                                                              args.warmup, "acct")))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    if args.json:
        print(orjson.dumps(results).decode())
    else:
        for r in results:
            what = "Access-Request round trips" if r["kind"] == "auth" else "Accounting Start+Stop pairs"
            print(f"RADIUS {what}: {r['per_second']}/s over {r['seconds']} s (window {r['window']}); "
                  f"latency p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, p99.9 {r['p999_ms']} ms; "
                  f"lost {r['lost']}, bad replies {r['bad_replies']}")
            if "server_cpu_us" in r:
                per = "round trip" if r["kind"] == "auth" else "Start+Stop pair"
                print(f"  service CPU {r['server_cpu_us']} us per {per} (busy {r['server_busy']:.0%} of one "
                      f"core): {round(1e6 / r['server_cpu_us'])}/s when it has a core to itself")
    return 0


if __name__ == "__main__":
    sys.exit(main())
