"""End to end through Kamailio's misc_radius / acc_radius: sipp UAC -> Kamailio
(integrations/kamailio/kamailio-radius.cfg) -> sipp UAS, with a real `callpolicy serve` whose
`[radius]` front end Kamailio talks to through radcli. Everything on 127.0.0.1, every process
stopped at the end of the test."""

from __future__ import annotations

import contextlib
import csv
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, RULES, LineClient, ServiceProcess, free_port

CFG = ROOT / "integrations" / "kamailio" / "kamailio-radius.cfg"
RADCLI_DICT = ROOT / "integrations" / "kamailio" / "radius" / "dictionary"
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
HOST = "127.0.0.1"
SECRET = "e2e-secret"


def missing_tools() -> str | None:
    """Why these tests cannot run here, or None."""
    for exe in ("kamailio", "sipp", "kamcmd", "timeout"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed (apt-get install kamailio kamailio-radius-modules sip-tester)"
    mods = [Path("/usr/lib/x86_64-linux-gnu/kamailio/modules"), Path("/usr/lib/kamailio/modules"),
            Path("/usr/lib64/kamailio/modules"), Path("/usr/local/lib64/kamailio/modules")]
    if not any((m / "misc_radius.so").exists() for m in mods):
        return "kamailio-radius-modules is not installed (misc_radius.so not found)"
    return None


MISSING = missing_tools()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the `kamailio` tests here when kamailio/sipp/the RADIUS modules are missing."""
    if not MISSING:
        return
    for item in items:
        if item.get_closest_marker("kamailio") is not None and "e2e_radius" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=MISSING))


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def udp_bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


class RadiusService:
    """`callpolicy serve` with a [radius] table; Kamailio (127.0.0.1) is an `avp` client."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.auth = free_port()
        self.acct = free_port()
        cfg = workdir / "service.toml"
        cfg.write_text(
            f'[rules]\ndir = "{RULES}"\nwatch = false\n\n'
            f'[radius]\nauth = "{HOST}:{self.auth}"\nacct = "{HOST}:{self.acct}"\n'
            f'clients = [{{address = "{HOST}", secret = "{SECRET}", style = "avp", name = "kamailio"}}]\n')
        self.proc = ServiceProcess(config=cfg, workdir=workdir, extra=["--log-level", "info"])

    @property
    def port(self) -> int:
        return self.proc.port

    def start(self) -> RadiusService:
        self.proc.start()
        return self

    def stop(self) -> None:
        self.proc.stop()

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        c = LineClient(port=self.proc.port)
        try:
            return c.call(op, **fields)
        finally:
            c.close()

    def sizes(self) -> dict[str, int]:
        out = {}
        for p in ("total", "emergency", "local", "domestic", "international", "user", "account", "type"):
            r = self.call("profile_size", profile=p)
            assert r.get("ok"), r
            out[p] = int(r["size"])
        return out

    def size(self, profile: str, value: str | None = None) -> int:
        r = self.call("profile_size", profile=profile, **({"value": value} if value is not None else {}))
        assert r.get("ok"), r
        return int(r["size"])

    def radius_stats(self) -> dict[str, Any]:
        r: dict[str, Any] = self.call("stats").get("radius", {})
        return r

    def wait_zero(self, timeout: float = 8.0) -> dict[str, int]:
        sizes: dict[str, int] = {}

        def zero() -> bool:
            nonlocal sizes
            sizes = self.sizes()
            return not any(sizes.values())

        with contextlib.suppress(TimeoutError):
            wait_for(zero, timeout, "profile counts to return to 0", interval=0.1)
        return sizes


class Kamailio:
    """A private Kamailio running kamailio-radius.cfg on free ports, radcli pointed at the service."""

    def __init__(self, upstream_port: int, auth_port: int, acct_port: int, *, fail_open: bool = False,
                 children: int = 8, cfg: Path = CFG) -> None:
        self.upstream_port = upstream_port
        self.sip_port = free_port()
        self.fail_open = fail_open
        self.children = children
        self.cfg = cfg
        self.dir = Path(tempfile.mkdtemp(prefix="kamailio-radius-"))
        self.log_path = self.dir / "kamailio.log"
        (self.dir / "servers").write_text(f"{HOST}\t{SECRET}\n")
        self.radcli = self.dir / "radiusclient.conf"
        self.radcli.write_text(
            f"authserver\t{HOST}:{auth_port}:{SECRET}\n"
            f"acctserver\t{HOST}:{acct_port}:{SECRET}\n"
            f"servers\t{self.dir / 'servers'}\n"
            f"dictionary\t{RADCLI_DICT}\n"
            "radius_timeout\t1\nradius_retries\t1\nradius_deadtime\t0\n"
            f"bindaddr\t{HOST}\ndefault_realm\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def defines(self) -> list[str]:
        out = [f"SIP_LISTEN=udp:{HOST}:{self.sip_port}",
               f'UPSTREAM_URI="sip:{HOST}:{self.upstream_port}"',
               f'RADIUS_CONFIG="{self.radcli}"',
               f"SIP_CHILDREN={self.children}",
               "DBG_LEVEL=2"]
        if self.fail_open:
            out.append("POLICY_FAIL_OPEN")
        return out

    def argv(self) -> list[str]:
        cmd = ["kamailio", "-f", str(self.cfg), "-DD", "-E", "-Y", str(self.dir), "-w", str(self.dir),
               "-P", str(self.dir / "kamailio.pid"), "-m", "128", "-M", "16"]
        for d in self.defines():
            cmd += ["-A", d]
        return cmd

    def check(self) -> subprocess.CompletedProcess[str]:
        cmd = ["kamailio", "-c", "-f", str(self.cfg)]
        for d in self.defines():
            cmd += ["-A", d]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)

    def start(self, timeout: float = 15.0) -> Kamailio:
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=str(self.dir))

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kamailio exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            return (self.dir / "kamailio_ctl").exists() and self.rpc_ok("core.uptime")

        wait_for(up, timeout, "kamailio to start")
        return self

    def rpc(self, *args: str) -> str:
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

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
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


class Uas:
    """A sipp UAS on a free port running one scenario until stopped."""

    def __init__(self, scenario: str = "uas.xml") -> None:
        self.scenario = SCENARIOS / scenario
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sipp-uas-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Uas:
        cmd = ["sipp", "-sf", str(self.scenario), "-i", HOST, "-p", str(self.port), "-nostdin",
               "-max_socket", "1024"]
        self._err = open(self.dir / "err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err,
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
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # sipp quits at once
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        self.proc = None


@dataclass
class SippResult:
    """A sipp UAC run: exit code and per-element counts from -trace_counts."""

    rc: int
    counts: dict[str, int] = field(default_factory=dict)
    stderr: str = ""

    def recv(self, code: int) -> int:
        return sum(v for k, v in self.counts.items() if k.endswith(f"_{code}_Recv"))

    def first_recv(self, code: int) -> int:
        """`code` received at its first element (the INVITE's 200, not the BYE's)."""
        for k, v in self.counts.items():
            if k.endswith(f"_{code}_Recv"):
                return v
        return 0


def _last_row(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    if len(rows) < 2:
        return {}
    return {k.strip(): v.strip() for k, v in zip(rows[0], rows[-1], strict=False) if k.strip()}


def run_uac(target_port: int, *, scenario: str = "uac.xml", calls: int = 1, rate: float = 10, hold_ms: int = 1000,
            from_user: str = "alice", service: str = "200", timeout: int = 40,
            extra: Sequence[str] = ()) -> SippResult:
    """Run the UAC scenario to the end, bounded by `timeout -s INT -k 5`."""
    work = Path(tempfile.mkdtemp(prefix="sipp-uac-"))
    cmd = ["timeout", "-s", "INT", "-k", "5", str(timeout),
           "sipp", f"{HOST}:{target_port}", "-sf", str(SCENARIOS / scenario), "-i", HOST,
           "-p", str(free_port()), "-s", service, "-m", str(calls), "-r", str(rate), "-d", str(hold_ms),
           "-nostdin", "-recv_timeout", "10000", "-default_behaviors", "all,-bye",
           "-trace_counts", "-max_socket", "1024", "-key", "from_user", from_user, *extra]
    res = subprocess.run(cmd, cwd=str(work), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, timeout=timeout + 15, check=False)
    out = SippResult(res.returncode, stderr=res.stderr.decode(errors="replace"))
    for f in work.glob("*_counts.csv"):
        out.counts = {k: int(v) for k, v in _last_row(f).items() if v.isdigit() and "_" in k}
    return out


@dataclass
class Stack:
    uas: Uas
    kam: Kamailio
    svc: RadiusService | None

    def dump(self) -> str:
        out = "---- kamailio ----\n" + self.kam.log()[-5000:]
        if self.svc is not None:
            out += "\n---- callpolicy ----\n" + self.svc.proc.log()[-5000:]
        return out


StackFactory = Callable[..., Stack]


@pytest.fixture
def radius_stack(tmp_path: Path) -> Iterator[StackFactory]:
    """Build UAS + service + Kamailio; all stopped at the end of the test."""
    started: list[Any] = []

    def factory(*, uas: str = "uas.xml", service: bool = True, fail_open: bool = False) -> Stack:
        u = Uas(uas).start()
        started.append(u)
        svc = None
        if service:
            svc = RadiusService(tmp_path).start()
            started.append(svc)
            auth, acct = svc.auth, svc.acct
        else:
            auth, acct = free_port(), free_port()  # nobody answers there
        k = Kamailio(u.port, auth, acct, fail_open=fail_open).start()
        started.append(k)
        return Stack(u, k, svc)

    yield factory
    for obj in reversed(started):
        obj.stop()
