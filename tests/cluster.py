"""A real Redis Cluster on loopback for tests and benchmarks: `redis-server --cluster-enabled yes`
per node, joined with `redis-cli --cluster create ... --cluster-yes`. No persistence; each node
in its own directory (its nodes.conf survives a kill, so a killed node restarted on its port
rejoins the cluster as a replica of whoever took its slots over)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import free_port

#: Cluster bus ports are the client port + 10000 (Redis's rule): both must be free.
BUS_OFFSET = 10000


def _free(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def cluster_ports(n: int) -> list[int]:
    """`n` free loopback ports whose bus ports (+10000) are free too."""
    ports: list[int] = []
    for _ in range(200 * n):
        p = free_port()
        if p + BUS_OFFSET < 65536 and p not in ports and _free(p + BUS_OFFSET):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise RuntimeError("no free ports for a cluster")


def _cmd(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command with redis-cli (raw output)."""
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=timeout)
    return out.stdout.strip()


class RedisClusterNodes:
    """`primaries` primaries with `replicas` replicas each, on free loopback ports."""

    def __init__(self, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        self.n_primaries = primaries
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = cluster_ports(primaries * (1 + replicas))
        self.dir = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def seeds(self) -> list[str]:
        """host:port of every node (what `[store] cluster` lists)."""
        return [f"127.0.0.1:{p}" for p in self.ports]

    @property
    def url(self) -> str:
        """The store URL: ``redis+cluster://`` and two seed nodes."""
        return "redis+cluster://" + ",".join(self.seeds[:2])

    def start_node(self, port: int) -> None:
        """Start (or restart) the node on `port`."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        d = self.dir / str(port)
        d.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(d), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-replica-validity-factor", "0",
             "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"cluster node {port} did not start")

    def start(self, timeout: float = 30.0) -> RedisClusterNodes:
        """Start every node, create the cluster, wait until every node says cluster_state:ok."""
        for p in self.ports:
            self.start_node(p)
        out = subprocess.run(["redis-cli", "--cluster", "create", *self.seeds, "--cluster-replicas",
                              str(self.n_replicas), "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-800:]} {out.stderr[-800:]}")
        self.wait_ok(timeout)
        if self.n_replicas:
            self.wait_replicas_synced(timeout)
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and agrees on the slot owners."""
        deadline = time.monotonic() + timeout
        while True:
            live = [p for p in self.ports if self.alive(p)]
            states = [_cmd(p, "CLUSTER", "INFO") for p in live]
            if all("cluster_state:ok" in s for s in states):
                maps = {self._slot_owners(p) for p in live}
                if len(maps) == 1:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok: {states}")
            time.sleep(0.1)

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Until every replica's link to its primary is up."""
        deadline = time.monotonic() + timeout
        while True:
            roles = [_cmd(p, "INFO", "replication") for p in self.ports if self.alive(p)]
            reps = [r for r in roles if "role:slave" in r]
            if len(reps) >= self.n_primaries * self.n_replicas - (len(self.ports) - len(roles)) and \
                    all("master_link_status:up" in r for r in reps):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas not synced: {roles}")
            time.sleep(0.1)

    def _slot_owners(self, port: int) -> tuple[tuple[int, int, int], ...]:
        text = _cmd(port, "CLUSTER", "SLOTS")
        lines = text.split("\n")
        out = []
        i = 0
        # raw redis-cli output of CLUSTER SLOTS: start, end, then per node ip, port, id (, hostname info)
        while i + 4 < len(lines):
            try:
                start, end, port_ = int(lines[i]), int(lines[i + 1]), int(lines[i + 3])
            except ValueError:
                i += 1
                continue
            out.append((start, end, port_))
            i += 5
            while i < len(lines) and not (lines[i].isdigit() and i + 1 < len(lines) and lines[i + 1].isdigit()
                                          and int(lines[i]) > end):
                i += 1
        return tuple(sorted(out))

    def role(self, port: int) -> str:
        """"master" or "slave" (or "" when the node does not answer)."""
        text = _cmd(port, "ROLE")
        return text.split("\n", 1)[0] if text else ""

    def nodes(self) -> list[list[str]]:
        """CLUSTER NODES of a live node, split into fields."""
        for p in self.ports:
            if self.alive(p):
                text = _cmd(p, "CLUSTER", "NODES")
                if text:
                    return [ln.split() for ln in text.split("\n") if ln.strip()]
        return []

    def primaries(self) -> list[int]:
        """Ports of the live primaries that serve slots (as a live node sees them)."""
        out = []
        for f in self.nodes():
            port = int(f[1].split("@")[0].rsplit(":", 1)[1])
            if "master" in f[2] and "fail" not in f[2] and len(f) > 8 and self.alive(port):
                out.append(port)
        return sorted(out)

    def replica_of(self, primary: int) -> list[int]:
        """Ports of the live replicas of `primary`."""
        nodes = _cmd(primary, "CLUSTER", "NODES")
        me = next((ln for ln in nodes.split("\n") if "myself" in ln), "")
        my_id = me.split()[0] if me else ""
        out = []
        for ln in nodes.split("\n"):
            f = ln.split()
            if len(f) > 3 and f[3] == my_id and "slave" in f[2]:
                out.append(int(f[1].split("@")[0].rsplit(":", 1)[1]))
        return [p for p in out if self.alive(p)]

    def alive(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def command(self, port: int, *args: str) -> str:
        """One command on one node (redis-cli raw output)."""
        return _cmd(port, *args)

    def kill(self, port: int, sig: int = signal.SIGKILL) -> None:
        """Kill one node (SIGKILL by default) and reap it."""
        proc = self.procs.get(port)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                proc.wait(10)

    def flush(self) -> None:
        """FLUSHALL on every live primary."""
        for p in self.primaries():
            _cmd(p, "FLUSHALL")

    def stop(self) -> None:
        """Stop every node and remove the directory."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
