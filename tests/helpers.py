"""Test helpers: free ports, a real `callpolicy serve` process, a real `redis-server`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port")


class LineClient:
    """A blocking line-JSON client for tests (pipelining allowed via send/recv)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5099, unix: str | None = None,
                 timeout: float = 5.0) -> None:
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(unix)
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, msg: dict[str, Any] | bytes) -> None:
        """Send a request (a dict is sent as one JSON line; bytes as they are)."""
        self.sock.sendall(msg if isinstance(msg, bytes) else orjson.dumps(msg) + b"\n")

    def recv(self) -> dict[str, Any]:
        """Read one line reply."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    def recv_raw(self, timeout: float = 2.0) -> bytes:
        """Read whatever arrives until the peer closes or the timeout passes."""
        self.sock.settimeout(timeout)
        data = self.buf
        self.buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        return data

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request, one reply."""
        self.send({"op": op, **fields})
        return self.recv()

    def close(self) -> None:
        """Close."""
        self.sock.close()


class ServiceProcess:
    """`callpolicy serve` in a subprocess on free loopback ports, with its own run dir."""

    def __init__(self, rules: Path | str = RULES, *, store: str | None = None,
                 extra: Sequence[str] = (), config: Path | str | None = None,
                 workdir: Path | None = None, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="callpolicy-"))
        self.port = port or free_port()
        self.unix = str(self.workdir / "callpolicy.sock")
        self.snapshot = str(self.workdir / "snapshot.json")
        self.rules = str(rules)
        self.store = store
        self.extra = list(extra)
        self.config = config
        self.log_path = self.workdir / "serve.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        """The command line."""
        cmd = [sys.executable, "-m", "policy"]
        cmd += ["--config", str(self.config)] if self.config else ["--config", str(ROOT / "service.toml")]
        cmd += ["serve", "--rules", self.rules, "--listen", f"127.0.0.1:{self.port}",
                "--unix", self.unix, "--snapshot", self.snapshot, "--log-format", "json"]
        if "--metrics" not in self.extra:
            cmd += ["--metrics", "none"]
        if self.store:
            cmd += ["--store", self.store]
        return cmd + self.extra

    def start(self, timeout: float = 15.0) -> ServiceProcess:
        """Start and wait until it answers a ping."""
        env = dict(os.environ)
        env.update(self.env or {})
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(self.workdir), env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"callpolicy exited {self.proc.returncode}:\n{self.log()}")
            try:
                c = LineClient(port=self.port, timeout=1.0)
                try:
                    r = c.call("ping")
                    # with [auth] tokens configured, an unauthenticated ping is refused: still up
                    if r.get("ok") or r.get("error", {}).get("code") == "unauthenticated":
                        return self
                finally:
                    c.close()
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"callpolicy did not start:\n{self.log()}")

    def client(self) -> LineClient:
        """A new TCP client."""
        return LineClient(port=self.port)

    def log(self) -> str:
        """What the service logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines, parsed."""
        out = []
        for line in self.log().splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return out

    def send_signal(self, sig: int) -> None:
        """Send a signal."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Stop (SIGTERM by default) and wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A private `redis-server` on a free loopback port (no persistence)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start and wait for PONG."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def command(self, *args: str) -> bytes:
        """Send one inline command and return the raw reply (for FLUSHALL and the like)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
