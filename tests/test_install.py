"""Installing it like a service: `init`, the wheel's package data, serve without a config, the systemd
unit (systemd-analyze verify) and sd_notify READY/RELOADING/STOPPING/WATCHDOG on a real socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, RULES, LineClient, ServiceProcess, free_port

EXAMPLES = ROOT / "policy" / "examples"
UNIT = ROOT / "integrations" / "systemd" / "callpolicy.service"


def cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policy", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, env=env)


def test_packaged_examples_are_the_repository_files() -> None:
    """policy/examples/ is what `init` writes: byte for byte the repo's service.toml and rules/."""
    assert (EXAMPLES / "service.toml").read_bytes() == (ROOT / "service.toml").read_bytes(), \
        "policy/examples/service.toml differs from service.toml: cp service.toml policy/examples/"
    repo = sorted(p.name for p in RULES.glob("*.toml"))
    packaged = sorted(p.name for p in (EXAMPLES / "rules").glob("*.toml"))
    assert packaged == repo, "policy/examples/rules/ and rules/ hold different files"
    for name in repo:
        assert (EXAMPLES / "rules" / name).read_bytes() == (RULES / name).read_bytes(), \
            f"policy/examples/rules/{name} differs from rules/{name}: cp rules/*.toml policy/examples/rules/"


def test_init_then_check_rules_then_serve(tmp_path: Path) -> None:
    """`init DIR` into an empty directory; `--config DIR/service.toml check-rules` passes; serve runs from it."""
    target = tmp_path / "etc" / "callpolicy"
    r = cli("init", str(target))
    assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == \
        ["rules/account-limits.toml", "rules/default.toml", "service.toml"]
    assert "next: callpolicy --config" in r.stdout
    r = cli("--config", str(target / "service.toml"), "check-rules", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ok: 8 rules"), (r.stdout, r.stderr)
    with ServiceProcess(workdir=tmp_path, config=target / "service.toml", rules=target / "rules") as svc:
        c = svc.client()
        reply = c.call("check", call_id="i1", account="acme", **{"from": "sip:a@x", "to": "sip:6002@x"})
        assert reply["decision"] == "allow"
        c.close()
    assert any(e["event"] == "listening" for e in svc.log_events())


def test_init_never_overwrites_without_force(tmp_path: Path) -> None:
    """A second init refuses (exit 1, naming the files); --force overwrites."""
    assert cli("init", str(tmp_path)).returncode == 0
    (tmp_path / "service.toml").write_text("# mine\n")
    r = cli("init", str(tmp_path))
    assert r.returncode == 1 and "would overwrite" in r.stderr and "service.toml" in r.stderr
    assert (tmp_path / "service.toml").read_text() == "# mine\n"
    assert cli("init", "--force", str(tmp_path)).returncode == 0
    assert (tmp_path / "service.toml").read_bytes() == (ROOT / "service.toml").read_bytes()


def test_wheel_ships_examples_and_license(tmp_path: Path) -> None:
    """The built wheel holds the example config and rules (so `pip install && init` needs no
    checkout) and the LICENSE, whose text matches pyproject's license."""
    pytest.importorskip("wheel", reason="the dev extra installs `wheel` to build the wheel offline")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "policy", src / "policy", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [whl] = (tmp_path / "dist").glob("callpolicy-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "policy/examples/service.toml" in names
    assert "policy/examples/rules/default.toml" in names and "policy/examples/rules/account-limits.toml" in names
    assert any(n.endswith(".dist-info/LICENSE") or n.endswith("licenses/LICENSE") for n in names), names
    license_kind = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert (ROOT / "LICENSE").read_text().startswith(f"{license_kind} License\n")


def test_serve_without_config_says_which_defaults(tmp_path: Path) -> None:
    """No --config, no $CALLPOLICY_CONFIG, no ./service.toml: a warning names the defaults in use."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CALLPOLICY_CONFIG"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "policy", "serve", "--rules", str(RULES), "--listen",
                                 f"127.0.0.1:{port}", "--unix", "none", "--snapshot", "none", "--log-format", "json"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while b'"listening"' not in log.read_bytes():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    text = log.read_text()
    assert '"event":"no_config"' in text and "callpolicy init DIR" in text
    assert f'"tcp":"127.0.0.1:{port}"' in text and '"store":"embedded"' in text
    # and without the rules flag, it says where it looked for rules
    r = cli("serve", "--listen", f"127.0.0.1:{port}", "--unix", "none", "--log-format", "json", cwd=tmp_path,
            env=env)
    assert r.returncode == 2 and "rules not loaded" in r.stderr
    assert '"no_config"' in r.stderr and str(tmp_path / "rules") in r.stderr


# -- systemd ---------------------------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at this venv's callpolicy)."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text()
    for needed in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec=", "User=callpolicy",
                   "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert needed in text, needed
    binary = Path(sys.executable).with_name("callpolicy")
    assert binary.exists()
    unit = tmp_path / "callpolicy.service"
    unit.write_text(text.replace("/usr/local/bin/callpolicy", str(binary)))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and ("Failed to connect" in r.stderr or "System has not been booted" in r.stderr):
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # a broken unit is caught (the check can fail)
    unit.write_text(text.replace("Type=notify", "Type=notifyy").replace("/usr/local/bin/callpolicy", str(binary)))
    bad = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "notifyy" in bad.stderr


class NotifySocket:
    """A Unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def read_until(self, needle: str, timeout: float = 15.0) -> list[str]:
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while not any(needle in m for m in self.messages):
            assert time.monotonic() < deadline, (needle, self.messages)
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())
        return self.messages

    def read_count(self, needle: str, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while sum(needle in m for m in self.messages) < n:
            assert time.monotonic() < deadline, (needle, n, self.messages)
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_watchdog_reload_stopping(tmp_path: Path) -> None:
    """READY=1 once listening, WATCHDOG=1 every WATCHDOG_USEC/2, RELOADING=1 then READY=1 on SIGHUP,
    STOPPING=1 on SIGTERM."""
    ns = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "200000"}
    svc = ServiceProcess(workdir=tmp_path, env=env)
    try:
        svc.start()
        msgs = ns.read_until("READY=1")
        ready = next(m for m in msgs if "READY=1" in m)
        assert f"MAINPID={svc.proc.pid}" in ready and "STATUS=rules " in ready  # type: ignore[union-attr]
        t = time.monotonic()
        ns.read_count("WATCHDOG=1", 6)  # every 0.1 s: 6 within about half a second
        assert time.monotonic() - t < 5
        svc.send_signal(signal.SIGHUP)
        msgs = ns.read_until("RELOADING=1")
        reloading = [i for i, m in enumerate(msgs) if "RELOADING=1" in m]
        assert "MONOTONIC_USEC=" in msgs[reloading[0]]
        ns.read_count("READY=1", 2)  # READY=1 again after the reload
        assert any("READY=1" in m for m in ns.messages[reloading[0] + 1:])
        assert svc.stop(signal.SIGTERM) == 0
        ns.read_until("STOPPING=1", timeout=5)
    finally:
        svc.stop()
        ns.close()


def test_sd_notify_watchdog_for_another_pid_and_abstract_socket(tmp_path: Path) -> None:
    """WATCHDOG_PID naming another process: no pings; an abstract (@name) socket works."""
    name = f"callpolicy-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(0.2)
    env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
    got: list[str] = []
    try:
        with ServiceProcess(workdir=tmp_path, env=env) as svc:
            deadline = time.monotonic() + 10
            while not any("READY=1" in m for m in got) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    got.append(sock.recv(4096).decode())
            t = time.monotonic()
            while time.monotonic() - t < 0.6:
                with contextlib.suppress(TimeoutError):
                    got.append(sock.recv(4096).decode())
            assert LineClient(port=svc.port).call("ping")["ok"]
    finally:
        sock.close()
    assert any("READY=1" in m for m in got), got
    assert not any("WATCHDOG=1" in m for m in got), got


def test_sd_notify_does_nothing_outside_systemd() -> None:
    """No NOTIFY_SOCKET: notify is a no-op (False); no watchdog without WATCHDOG_USEC."""
    from policy import sdnotify

    assert sdnotify.notify("READY=1", environ={}) is False
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
