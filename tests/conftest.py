"""Shared fixtures: real processes on loopback, never mocks."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import RedisClusterNodes
from tests.helpers import RedisServer, free_port


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session (tests flush it through `redis_url`)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The private redis-server's URL, flushed before the test."""
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """One real Redis Cluster for the session: 3 primaries + 3 replicas on free loopback ports
    (`redis-server --cluster-enabled yes` x6, `redis-cli --cluster create ... --cluster-yes`).
    Tests share it with a prefix of their own; nothing here kills its nodes (the failover tests
    start their own cluster)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server or redis-cli not installed")
    cluster = RedisClusterNodes(primaries=3, replicas=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own (no persistence), to kill, stop and restart."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    server = RedisServer().start()
    yield server
    resume(server)
    server.stop()


def resume(server: RedisServer) -> None:
    """SIGCONT a server a test may have SIGSTOPped, so that it can be stopped."""
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)


@dataclass
class TlsRedis:
    """A redis-server answering only TLS, with the files a client needs."""

    port: int
    ca: Path
    client_cert: Path
    client_key: Path
    proc: subprocess.Popen[bytes]

    def url(self, **query: str) -> str:
        """A rediss:// URL trusting the test CA and presenting the client certificate."""
        params = {"ssl_ca_certs": str(self.ca), "ssl_certfile": str(self.client_cert),
                  "ssl_keyfile": str(self.client_key), **query}
        return f"rediss://127.0.0.1:{self.port}/0?" + "&".join(f"{k}={v}" for k, v in params.items())


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> None:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate (EC keys)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=callpolicy test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, usage, alt in (("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
                             ("client", "clientAuth", "DNS:client")):
        (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                      f"extendedKeyUsage={usage}\nsubjectAltName={alt}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture
def tls_redis() -> Iterator[TlsRedis]:
    """A private redis-server on a TLS port only (mutual TLS), certificates made by openssl."""
    exe = shutil.which("redis-server")
    if exe is None or shutil.which("openssl") is None:
        pytest.skip("redis-server or openssl not installed")
    d = Path(tempfile.mkdtemp(prefix="redis-tls-"))
    make_certs(d)
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(d), "--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key"),
         "--tls-ca-cert-file", str(d / "ca.crt")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(str(d / "client.crt"), str(d / "client.key"))
    deadline = time.monotonic() + 10
    try:
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                if "tls" in out.lower() and ("not" in out.lower() or "support" in out.lower()):
                    pytest.skip(f"this redis-server was built without TLS: {out.strip()[-200:]}")
                raise RuntimeError(f"redis-server (TLS) exited: {out[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, \
                        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except (OSError, ssl.SSLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield TlsRedis(port, d / "ca.crt", d / "client.crt", d / "client.key", proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)
