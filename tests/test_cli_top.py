"""`callpolicy top`: the `top` op (what one refresh reads) and the live view under a pseudo-terminal
against a real `callpolicy serve` taking traffic."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import policy.service
from tests.helpers import ROOT, LineClient, ServiceProcess
from tests.inproc import serving

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")


def check(c: LineClient, call_id: str, account: str, to: str = "sip:6002@example.com") -> str:
    r = c.call("check", call_id=call_id, account=account, **{"from": f"sip:{call_id}@example.com"}, to=to)
    assert r.get("ok"), r
    return str(r["decision"])


async def test_top_op_nearest_caps_and_bounded_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys nearest their caps, fullest first (no-value profiles too, shadow flagged), `limit`
    of them; each profile's size and cap; the per-value walk bounded (and said so)."""
    async with serving(tmp_path) as srv:
        svc = srv.service

        async def chk(call_id: str, account: str, to: str = "sip:6002@example.com") -> None:
            r = await svc.handle({"op": "check", "call_id": call_id, "account": account,
                                  "from": f"sip:{call_id}@example.com", "to": to})
            assert r["decision"] == "allow", r

        for i in range(2):
            await chk(f"acme{i}", "acme")  # cap 3 (override): 67 %
        for i in range(3):
            await chk(f"zeta{i}", "zeta")  # cap 10: 30 %
        await chk("intl", "intl", to="sip:0049301234@example.com")  # international (shadow cap 2): 50 %
        r = await svc.handle({"op": "top", "limit": 3})
        assert r["ok"], r
        assert [(n["profile"], n["value"], n["size"], n["limit"]) for n in r["nearest"]] == [
            ("account", "acme", 2, 3), ("international", None, 1, 2), ("account", "zeta", 3, 10)]
        assert r["nearest"][1]["shadow"] is True and r["nearest"][0]["rule"] == "account-cap"
        prof = {p["profile"]: p for p in r["profiles"]}
        assert prof["total"]["size"] == 6 and prof["emergency"]["limit"] == 5
        assert prof["account"]["limit_each"] == 10 and prof["account"]["values"] == 3
        assert r["dialogs"]["early_dialogs"] == 6 and r["decisions"]["allow"] == 6
        assert r["shadow"] == 0 and r["latency"]["count"] == 6 and not r["scan_truncated"]
        # refreshes within TOP_CACHE_SECONDS share one walk of the values; the counters are fresh
        await chk("zeta3", "zeta")
        again = await svc.handle({"op": "top", "limit": 3})
        assert again["nearest"][2]["size"] == 3 and again["decisions"]["allow"] == 7
        monkeypatch.setattr(policy.service, "TOP_SCAN_MAX", 2)
        monkeypatch.setattr(policy.service, "TOP_CACHE_SECONDS", 0.0)
        r = await svc.handle({"op": "top", "limit": 3})
        assert r["values_scanned"] == 2 and r["scan_truncated"] is True


@pytest.fixture
def live(tmp_path: Path) -> Iterator[ServiceProcess]:
    cfg = tmp_path / "service.toml"
    cfg.write_text("[metrics]\nlisten = false\n")
    svc = ServiceProcess(workdir=tmp_path, config=cfg).start()
    yield svc
    svc.stop()


class Screen:
    """`callpolicy top` on a pseudo-terminal of 150 x 50; `text` is what it drew, escapes removed."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 150, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "150", "LINES": "50"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "policy", "top", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=ROOT, env=env, close_fds=True, start_new_session=True)
        os.close(slave)
        self.raw = b""

    def read(self, timeout: float = 0.2) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            with contextlib.suppress(OSError):  # the child closed the terminal
                self.raw += os.read(self.master, 1 << 20)

    @property
    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode(errors="replace")

    def last_frame(self) -> str:
        text = self.text
        return text[text.rfind("callpolicy top"):]

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read()
            m = re.search(pattern, self.last_frame())
            if m:
                return m
            if self.proc.poll() is not None:
                break
        raise AssertionError(f"{pattern!r} never on the screen; last frame:\n{self.last_frame()}")

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C
        deadline = time.monotonic() + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.1)
        self.read(0.1)
        os.close(self.master)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(5)


def row(text: str, profile: str, value: str) -> str:
    """The 'nearest their caps' row of one key."""
    m = re.search(rf"^\s*{re.escape(profile)}\s+{re.escape(value)}\s+\S+.*$", text, re.M)
    return m.group(0) if m else ""


def test_top_on_a_terminal_shows_what_changes(live: ServiceProcess) -> None:
    """Under a pseudo-terminal, against a live service: the first frames show the held calls; after
    traffic (checks allowed and denied) the screen shows the new sizes, the deny and a check rate;
    Ctrl-C leaves the alternate screen and exits 0."""
    c = live.client()
    for i in range(2):
        assert check(c, f"acme{i}", "acme") == "allow"
    screen = Screen(["--server", f"127.0.0.1:{live.port}", "--interval", "0.3"])
    try:
        screen.wait_for(r"(?s)account\s+acme\s+2/3.*store\s+embedded")
        first = screen.text.split("callpolicy top")[1]  # complete: a later frame, or the health panel, follows
        assert re.search(r"checks/s.*\n\s*-\s+-", first), first  # no rate before a second refresh
        assert "acme" in row(first, "account", "acme") and "zeta" not in first
        # traffic: acme fills up (3/3) and is denied once, zeta gets 6 calls
        assert check(c, "acme2", "acme") == "allow"
        assert check(c, "acme3", "acme") == "deny"
        for i in range(6):
            assert check(c, f"zeta{i}", "zeta") == "allow"
        screen.wait_for(r"account\s+acme\s+3/3")
        # a whole frame (drawn in several writes): from the header to the health panel
        frame = screen.wait_for(r"(?s)account\s+zeta\s+6/10.*store\s+embedded").string
        assert re.search(r"account\s+acme\s+3/3\s.*100\s+account-cap", frame), frame
        counts = re.search(r"checks/s\s+allow/s\s+deny/s.*\n(.*)", frame)
        assert counts is not None, frame
        cells = counts.group(1).split()
        # the last columns: active early checks allow deny shadow store-errors failed expired
        assert cells[-9:] == ["0", "9", "10", "9", "1", "0", "0", "0", "0"], frame
        assert re.search(r"total\s+9\s+-", frame) and re.search(r"account\s+9\s+10 each\s+2", frame), frame
        screen.wait_for(r"store\s+embedded")
        # a rate: some refresh saw the checks happen (> 0 checks/s)
        rates = [float(m.group(1)) for m in re.finditer(r"checks/s.*\n\s*([0-9.]+)\s", screen.text)]
        assert any(r > 0 for r in rates), screen.text[-3000:]
    finally:
        c.close()
        rc = screen.close()
    assert rc == 0, screen.text[-2000:]
    assert b"\x1b[?1049l" in screen.raw  # the alternate screen was left: the terminal is as it was
    assert "Traceback" not in screen.text


def test_top_without_a_terminal_prints_one_frame(live: ServiceProcess) -> None:
    """In a pipe (or with --once) one frame is printed and the command exits."""
    c = live.client()
    assert check(c, "one", "acme") == "allow"
    c.close()
    r = subprocess.run([sys.executable, "-m", "policy", "top", "--server", f"127.0.0.1:{live.port}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert r.returncode == 0 and r.stdout.startswith("callpolicy top") and r.stdout.count("callpolicy top") == 1
    assert re.search(r"account\s+acme\s+1/3", r.stdout), r.stdout
    assert "\x1b[" not in r.stdout
