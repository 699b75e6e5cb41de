"""Real Kamailio and sipp processes for the end-to-end tests (everything on 127.0.0.1).

`Kamailio` runs the shipped integrations/kamailio/kamailio.cfg with only its ports, upstream
and policy switches changed through `-A` defines. `Uas` is a sipp UAS behind it; `run_uac`
runs a sipp UAC scenario in front of it under `timeout -s INT` and returns sipp's
per-message counts from `-trace_counts` (never its screen).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, LineClient, free_port

CFG = ROOT / "integrations" / "kamailio" / "kamailio.cfg"
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
HOST = "127.0.0.1"
#: The evapi shared secret of the test stacks (Kamailio's EVAPI_TOKEN, callpolicy's [evapi] token).
TOKEN = "e2e-" + os.urandom(12).hex()


def missing_tools() -> str | None:
    """Why the e2e tests cannot run here, or None."""
    for exe in ("kamailio", "sipp", "kamcmd", "timeout"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install kamailio kamailio-extra-modules sip-tester)"
    return None


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `pred` until it is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


class Kamailio:
    """A private Kamailio with the shipped config on free ports.

    Subclasses running another config override `policy_defines()` (how it reaches callpolicy).
    """

    #: whether its config loads evapi (start() then also waits for the evapi port)
    listens_evapi = True

    def __init__(self, upstream_port: int, *, fail_open: bool = False, timeout_ms: int = 500,
                 children: int = 4, sip_port: int | None = None, evapi_port: int | None = None,
                 debug: int = 2, cfg: Path = CFG, defines: Sequence[str] = (),
                 env: dict[str, str] | None = None, token: str | None = TOKEN) -> None:
        self.upstream_port = upstream_port
        self.sip_port = sip_port or free_port()
        self.evapi_port = evapi_port or free_port()
        self.fail_open = fail_open
        self.timeout_ms = timeout_ms
        self.children = children
        self.debug = debug
        self.cfg = cfg
        self.extra_defines = list(defines)
        self.env = env
        self.dir = Path(tempfile.mkdtemp(prefix="kamailio-"))
        self.log_path = self.dir / "kamailio.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = token
        if token is not None:
            # the documented way: a file the shipped config imports (found in Kamailio's cwd)
            (self.dir / "callpolicy-evapi-token.cfg").write_text(f'#!define EVAPI_TOKEN "{token}"\n')

    @property
    def evapi(self) -> str:
        """The evapi address callpolicy connects to."""
        return f"{HOST}:{self.evapi_port}"

    def policy_defines(self) -> list[str]:
        """The -A defines that point the config at callpolicy (here: the evapi listener)."""
        return [f'EVAPI_BIND="{HOST}:{self.evapi_port}"', f"POLICY_TIMEOUT_MS={self.timeout_ms}"]

    def defines(self) -> list[str]:
        """The -A defines: ports, upstream, policy switches."""
        out = [f"SIP_LISTEN=udp:{HOST}:{self.sip_port}",
               f'UPSTREAM_URI="sip:{HOST}:{self.upstream_port}"',
               *self.policy_defines(),
               f"SIP_CHILDREN={self.children}",
               f"DBG_LEVEL={self.debug}"]
        if self.fail_open:
            out.append("POLICY_FAIL_OPEN")
        return out + self.extra_defines

    def argv(self) -> list[str]:
        """The command line."""
        cmd = ["kamailio", "-f", str(self.cfg), "-DD", "-E", "-Y", str(self.dir), "-w", str(self.dir),
               "-P", str(self.dir / "kamailio.pid"), "-m", "128", "-M", "16"]
        for d in self.defines():
            cmd += ["-A", d]
        return cmd

    def check(self) -> subprocess.CompletedProcess[str]:
        """`kamailio -c` with the same defines."""
        cmd = ["kamailio", "-c", "-f", str(self.cfg)]
        for d in self.defines():
            cmd += ["-A", d]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, cwd=str(self.dir))

    def start(self, timeout: float = 15.0) -> Kamailio:
        """Start and wait until its ctl socket answers."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(self.dir), env=env)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kamailio exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            # the ctl socket answers before every process has its sockets: evapi listens in the
            # EvAPI dispatcher, which may come up a moment later
            return ((self.dir / "kamailio_ctl").exists() and self.rpc_ok("core.uptime")
                    and (not self.listens_evapi or tcp_listening(self.evapi_port)))

        wait_for(up, timeout, "kamailio to start")
        return self

    def rpc(self, *args: str) -> str:
        """A kamcmd command through the private ctl socket."""
        res = subprocess.run(["kamcmd", "-s", f"unix:{self.dir}/kamailio_ctl", *args],
                             capture_output=True, text=True, timeout=10, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"kamcmd {' '.join(args)}: {res.stderr or res.stdout}")
        return res.stdout

    def rpc_ok(self, *args: str) -> bool:
        try:
            self.rpc(*args)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def clients(self) -> int:
        """How many callpolicy clients the config counts as connected ($shv(policy_clients))."""
        out = self.rpc("pv.shvGet", "policy_clients")
        for line in out.splitlines():
            if "value:" in line:
                return int(line.split("value:")[1].strip())
        return 0

    def wait_clients(self, n: int = 1, timeout: float = 10.0) -> None:
        """Wait until n callpolicy clients are connected."""
        wait_for(lambda: self.clients() >= n, timeout, f"{n} callpolicy client(s) on {self.evapi}")

    def active_dialogs(self) -> int:
        """Dialogs Kamailio still tracks (`dlg.stats_active` all)."""
        for line in self.rpc("dlg.stats_active").splitlines():
            if line.strip().startswith("all:"):
                return int(line.split(":")[1])
        return -1

    def log(self) -> str:
        """What Kamailio logged."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the main process (-DD keeps it the parent of all children)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self) -> Kamailio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _keys(keys: dict[str, str]) -> list[str]:
    out: list[str] = []
    for k, v in keys.items():
        out += ["-key", k, v]
    return out


class Uas:
    """A sipp UAS on a free port, running one scenario until stopped."""

    def __init__(self, scenario: str = "uas.xml", *, port: int | None = None,
                 keys: dict[str, str] | None = None, subst: dict[str, str] | None = None,
                 extra: Sequence[str] = (), scenarios: Path = SCENARIOS) -> None:
        self.port = port or free_port()
        self.keys = keys or {}
        self.extra = list(extra)
        self.dir = Path(tempfile.mkdtemp(prefix="sipp-uas-"))
        self.scenario = scenarios / scenario
        if subst:  # sipp checks response codes when it loads the file: no [keyword] there
            text = self.scenario.read_text()
            for k, v in subst.items():
                text = text.replace(f"@{k}@", v)
            self.scenario = self.dir / scenario
            self.scenario.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Uas:
        """Start; the UDP socket is bound when this returns."""
        cmd = ["sipp", "-sf", str(self.scenario), "-i", HOST, "-p", str(self.port), "-nostdin",
               "-trace_counts", "-fd", "1", "-max_socket", "2048", *_keys(self.keys), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.dir / "err", "wb"),  # noqa: SIM115
                                     stdin=subprocess.DEVNULL, cwd=str(self.dir))

        def bound() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"sipp UAS exited {self.proc.returncode}: "
                                   f"{(self.dir / 'err').read_text(errors='replace')}")
            return udp_bound(self.port)

        wait_for(bound, 10, "the sipp UAS")
        return self

    def stop(self) -> None:
        """Stop it (SIGTERM; SIGKILL if it hangs: a UAS has nothing left to report)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Uas:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tcp_listening(port: int) -> bool:
    """Whether a socket LISTENs on TCP `port` (read from /proc/net/tcp: no connection is made)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                if parts[1].endswith(want) and parts[3] == "0A":  # 0A = TCP_LISTEN
                    return True
    return False


def udp_bound(port: int) -> bool:
    """Whether something already holds UDP `port` on HOST."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


@dataclass
class SippResult:
    """What a sipp UAC run reported."""

    rc: int
    counts: dict[str, int] = field(default_factory=dict)
    stats: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0
    stderr: str = ""

    def recv(self, code: int | str) -> int:
        """How many `code` responses (or requests) the scenario received, over all its elements."""
        suffix = f"_{code}_Recv"
        return sum(v for k, v in self.counts.items() if k.endswith(suffix))

    def first_recv(self, code: int | str) -> int:
        """Received `code` at its first element only (the INVITE's 200, not the BYE's)."""
        for k, v in self.counts.items():
            if k.endswith(f"_{code}_Recv"):
                return v
        return 0

    @property
    def successful(self) -> int:
        return int(self.stats.get("SuccessfulCall(C)", "0") or 0)

    @property
    def failed(self) -> int:
        return int(self.stats.get("FailedCall(C)", "0") or 0)


def _last_row(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    if len(rows) < 2:
        return {}
    return {k.strip(): v.strip() for k, v in zip(rows[0], rows[-1], strict=False) if k.strip()}


def run_uac(target_port: int, *, scenario: str = "uac.xml", calls: int = 1, rate: float = 10,
            hold_ms: int = 1000, from_user: str = "alice", service: str = "100",
            limit: int | None = None, timeout: float = 30, recv_timeout_ms: int = 10000,
            keys: dict[str, str] | None = None, extra: Sequence[str] = (),
            scenarios: Path = SCENARIOS) -> SippResult:
    """Run a sipp UAC scenario to the end (bounded by `timeout`) and read its counts."""
    work = Path(tempfile.mkdtemp(prefix="sipp-uac-"))
    port = free_port()
    cmd = ["timeout", "-s", "INT", "-k", "5", str(int(timeout)),
           "sipp", f"{HOST}:{target_port}", "-sf", str(scenarios / scenario), "-i", HOST, "-p", str(port),
           "-s", service, "-m", str(calls), "-r", str(rate), "-d", str(hold_ms),
           "-nostdin", "-recv_timeout", str(recv_timeout_ms), "-default_behaviors", "all,-bye",
           "-trace_counts", "-trace_stat", "-stf", str(work / "stat.csv"), "-fd", "1",
           "-max_socket", "2048", *_keys({"from_user": from_user, **(keys or {})})]
    if limit is not None:
        cmd += ["-l", str(limit)]
    cmd += list(extra)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=str(work), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, timeout=timeout + 15, check=False)
    out = SippResult(res.returncode, elapsed=time.monotonic() - t0,
                     stderr=res.stderr.decode(errors="replace"))
    for f in work.glob("*_counts.csv"):
        out.counts = {k: int(v) for k, v in _last_row(f).items() if v.isdigit() and "_" in k}
    if (work / "stat.csv").exists():
        out.stats = _last_row(work / "stat.csv")
    return out


def profile_sizes(port: int, profiles: Sequence[str] = ("total", "emergency", "local", "domestic",
                                                         "international", "user", "account", "type")
                  ) -> dict[str, int]:
    """Every profile's size (over all values) as the service reports it."""
    c = LineClient(port=port)
    try:
        out = {}
        for p in profiles:
            r = c.call("profile_size", profile=p)
            assert r.get("ok"), r
            out[p] = int(r["size"])
        return out
    finally:
        c.close()


def profile_size(port: int, profile: str, value: str | None = None) -> int:
    """One profile's size (or one value of it)."""
    c = LineClient(port=port)
    try:
        r = c.call("profile_size", profile=profile, **({"value": value} if value is not None else {}))
        assert r.get("ok"), r
        return int(r["size"])
    finally:
        c.close()


def wait_profiles_zero(port: int, timeout: float = 5.0) -> dict[str, int]:
    """Wait until every profile is empty; return the last sizes seen."""
    sizes: dict[str, int] = {}

    def zero() -> bool:
        nonlocal sizes
        sizes = profile_sizes(port)
        return not any(sizes.values())

    with contextlib.suppress(TimeoutError):
        wait_for(zero, timeout, "profile counts to return to 0", interval=0.1)
    return sizes


def service_config(directory: Path, *, token: str | None = TOKEN, reconcile_interval: float = 60.0,
                   grace: float = 10.0, snapshot_interval: float = 10.0, extra: str = "") -> Path:
    """A service.toml for an e2e service: the shipped one plus an [evapi] section (secret in a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "service.toml").read_text()
    text = text.replace("snapshot_interval = 10.0", f"snapshot_interval = {snapshot_interval}")
    evapi = f"\n[evapi]\nreconcile_interval = {reconcile_interval}\nreconcile_grace = {grace}\n"
    if token is not None:
        (directory / "evapi.token").write_text(token + "\n")
        evapi += 'token_file = "evapi.token"\n'
    path = directory / "service.toml"
    path.write_text(text + evapi + extra)
    return path


def log_events(svc: Any, event: str) -> list[dict[str, Any]]:
    """The service's log lines of one event."""
    return [e for e in svc.log_events() if e.get("event") == event]


def evapi_info(port: int) -> dict[str, Any]:
    """The service's `stats` evapi section."""
    c = LineClient(port=port)
    try:
        r = c.call("stats")
        info: dict[str, Any] = r.get("evapi", {})
        return info
    finally:
        c.close()




def sip_invite(port: int, *, from_user: str = "alice", to_user: str = "100", timeout: float = 5.0
               ) -> tuple[int, float]:
    """Send one INVITE over UDP and wait for its final reply; ACK it if negative.

    Returns (status code, seconds from the INVITE to the final reply); (0, timeout) if none came.
    """
    import socket
    import uuid

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        lport = s.getsockname()[1]
        call_id = f"{uuid.uuid4()}@{HOST}"
        branch = f"z9hG4bK{uuid.uuid4().hex[:16]}"
        tag = uuid.uuid4().hex[:8]
        ruri = f"sip:{to_user}@{HOST}:{port}"
        via = f"Via: SIP/2.0/UDP {HOST}:{lport};branch={branch}"
        frm = f"From: <sip:{from_user}@{HOST}>;tag={tag}"
        invite = (f"INVITE {ruri} SIP/2.0\r\n{via}\r\n{frm}\r\nTo: <{ruri}>\r\nCall-ID: {call_id}\r\n"
                  f"CSeq: 1 INVITE\r\nContact: <sip:{from_user}@{HOST}:{lport}>\r\nMax-Forwards: 70\r\n"
                  "Content-Length: 0\r\n\r\n")
        t0 = time.perf_counter()
        s.sendto(invite.encode(), (HOST, port))
        deadline = t0 + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return 0, timeout
            s.settimeout(left)
            try:
                data = s.recv(65535).decode(errors="replace")
            except TimeoutError:
                return 0, timeout
            code = int(data.split(" ", 2)[1])
            if code < 200:
                continue
            elapsed = time.perf_counter() - t0
            to_hdr = next((ln for ln in data.split("\r\n") if ln.lower().startswith(("to:", "t:"))),
                          f"To: <{ruri}>")
            if code >= 300:
                ack = (f"ACK {ruri} SIP/2.0\r\n{via}\r\n{frm}\r\n{to_hdr}\r\nCall-ID: {call_id}\r\n"
                       "CSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
                s.sendto(ack.encode(), (HOST, port))
            return code, elapsed


class EvapiClient:
    """A raw evapi client: authenticates like callpolicy (with `token`) or not at all (None),
    then only reads; `frames()` are the netstrings Kamailio sent it, `send()` writes one."""

    def __init__(self, address: str, token: str | None = TOKEN, timeout: float = 5.0) -> None:
        import socket

        from policy.wire import StreamDecoder

        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.decoder = StreamDecoder(1 << 24)
        self.received: list[dict[str, Any]] = []
        challenge = self.read_until(lambda m: m.get("method") == "callpolicy.challenge", timeout)
        self.authenticated = False
        if token is not None and challenge is not None:
            from policy.transports.evapi import proof

            nonce = challenge["params"]["nonce"]
            self.send({"jsonrpc": "2.0", "method": "callpolicy.auth",
                       "params": {"proof": proof(nonce, token), "nonce": "n" * 32}, "id": 1})
            reply = self.read_until(lambda m: m.get("id") == 1, timeout)
            self.authenticated = bool(reply and "result" in reply)

    def send(self, msg: dict[str, Any]) -> None:
        from policy.wire import Framing, encode

        self.sock.sendall(encode(msg, Framing.NETSTRING))

    def read_until(self, pred: Any, timeout: float) -> dict[str, Any] | None:
        """Read frames until one satisfies `pred` (returned) or `timeout` passes (None)."""
        import orjson

        deadline = time.monotonic() + timeout
        seen = len(self.received)
        while True:
            for m in self.received[seen:]:
                if pred(m):
                    return m
            seen = len(self.received)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                return None
            if not data:
                return None
            self.received.extend(orjson.loads(ev.payload) for ev in self.decoder.feed(data))

    def close(self) -> None:
        self.sock.close()


class SilentEvapiClient(EvapiClient):
    """Connects to Kamailio's evapi like callpolicy would (authenticated), then never answers."""


def _header(msg: str, name: str) -> str:
    """The first header `name` of a SIP message (value only, "" if absent)."""
    for line in msg.split("\r\n")[1:]:
        if not line:
            break
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return ""


def _headers(msg: str, name: str) -> list[str]:
    out = []
    for line in msg.split("\r\n")[1:]:
        if not line:
            break
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            out.append(v.strip())
    return out


class PyUas:
    """A tiny UAS in a thread: 200 to every INVITE (copying Record-Route, its own To-tag per
    INVITE), 200 to every BYE. Unlike sipp it keeps calls apart by Call-ID *and* From-tag, so
    several calls may share a Call-ID."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.invites = 0
        self.byes = 0
        self._stop = False
        import threading

        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PyUas:
        self.thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                continue
            msg = data.decode(errors="replace")
            method = msg.split(" ", 1)[0]
            if method not in ("INVITE", "BYE"):
                continue
            n += 1
            to = _header(msg, "To")
            if method == "INVITE":
                self.invites += 1
                to += f";tag=uas{n}"
            else:
                self.byes += 1
            lines = ["SIP/2.0 200 OK", *[f"Via: {v}" for v in _headers(msg, "Via")], f"From: {_header(msg, 'From')}",
                     f"To: {to}", f"Call-ID: {_header(msg, 'Call-ID')}", f"CSeq: {_header(msg, 'CSeq')}"]
            if method == "INVITE":
                lines += [f"Record-Route: {r}" for r in _headers(msg, "Record-Route")]
                lines.append(f"Contact: <sip:uas@{HOST}:{self.port}>")
            self.sock.sendto(("\r\n".join([*lines, "Content-Length: 0", "", ""])).encode(), addr)

    def stop(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


class SipCall:
    """One call from a UDP socket of its own: `invite()` (ACKs whatever final reply), `bye()`."""

    def __init__(self, proxy_port: int, call_id: str, from_tag: str, *, from_user: str = "acme",
                 to_user: str = "200") -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.lport = int(self.sock.getsockname()[1])
        self.proxy = (HOST, proxy_port)
        self.call_id, self.from_tag = call_id, from_tag
        self.ruri = f"sip:{to_user}@{HOST}:{proxy_port}"
        self.frm = f"<sip:{from_user}@{HOST}>;tag={from_tag}"
        self.to = f"<{self.ruri}>"
        self.routes: list[str] = []
        self.target = self.ruri
        self.cseq = 1

    def _send(self, method: str, uri: str, branch: str, cseq: int, extra: str = "") -> None:
        route = "".join(f"Route: {r}\r\n" for r in self.routes) if method != "INVITE" else ""
        msg = (f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {HOST}:{self.lport};branch={branch}\r\n{route}"
               f"From: {self.frm}\r\nTo: {self.to}\r\nCall-ID: {self.call_id}\r\nCSeq: {cseq} {method}\r\n"
               f"Contact: <sip:caller@{HOST}:{self.lport}>\r\nMax-Forwards: 70\r\n{extra}Content-Length: 0\r\n\r\n")
        self.sock.sendto(msg.encode(), self.proxy)

    def _final(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ""
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(65535).decode(errors="replace")
            except TimeoutError:
                return ""
            if msg.startswith("SIP/2.0") and int(msg.split(" ", 2)[1]) >= 200:
                return msg

    def invite(self, timeout: float = 5.0) -> int:
        """Send the INVITE, wait for the final reply, ACK it; the status code (0: none)."""
        import uuid

        branch = f"z9hG4bK{uuid.uuid4().hex[:16]}"
        self._send("INVITE", self.ruri, branch, 1)
        reply = self._final(timeout)
        if not reply:
            return 0
        code = int(reply.split(" ", 2)[1])
        self.to = _header(reply, "To")
        if code >= 300:
            self._send("ACK", self.ruri, branch, 1)
            return code
        self.routes = list(reversed(_headers(reply, "Record-Route")))
        contact = _header(reply, "Contact")
        self.target = contact[contact.find("<") + 1:contact.find(">")] if "<" in contact else contact
        self._send("ACK", self.target, f"z9hG4bK{uuid.uuid4().hex[:16]}", 1)
        return code

    def bye(self, timeout: float = 5.0) -> int:
        """Hang up; the BYE's status code (0: none)."""
        import uuid

        self.cseq += 1
        self._send("BYE", self.target, f"z9hG4bK{uuid.uuid4().hex[:16]}", self.cseq)
        reply = self._final(timeout)
        return int(reply.split(" ", 2)[1]) if reply else 0

    def close(self) -> None:
        self.sock.close()
