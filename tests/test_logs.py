"""Logs as support reads them: the decision line's fields, releases with their reason, ISO-8601
timestamps (epoch optional), console without ANSI off a terminal, journald priorities."""

from __future__ import annotations

import datetime as dt
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from policy.clock import ManualClock
from policy.logs import IsoClock, on_journal, resolve_format
from policy.server import Server
from policy.settings import Settings
from tests.helpers import ROOT, RULES, LineClient, ServiceProcess, free_port

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
ANSI = "\x1b["


def test_iso_timestamps_by_default_in_json(tmp_path: Path) -> None:
    """Every JSON line's `ts` is ISO-8601 UTC with microseconds, close to now - the hot decision line too."""
    with ServiceProcess(workdir=tmp_path) as svc:
        c = svc.client()
        c.call("check", call_id="t1", **{"from": "sip:a@x", "to": "sip:1@x"})
        c.close()
    events = svc.log_events()
    assert {"listening", "decision", "stopped"} <= {e["event"] for e in events}
    now = time.time()
    for e in events:
        assert isinstance(e["ts"], str) and ISO.match(e["ts"]), e
        when = dt.datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
        assert abs(when - now) < 120, e


def test_epoch_timestamps_when_asked(tmp_path: Path) -> None:
    """`[log] timestamps = "epoch"`: `ts` is seconds since the epoch, a number."""
    cfg = tmp_path / "service.toml"
    cfg.write_text('[log]\ntimestamps = "epoch"\n[metrics]\nlisten = false\n')
    with ServiceProcess(workdir=tmp_path, config=cfg) as svc:
        c = svc.client()
        c.call("check", call_id="t1", **{"from": "sip:a@x", "to": "sip:1@x"})
        c.close()
    events = svc.log_events()
    assert any(e["event"] == "decision" for e in events)
    assert all(isinstance(e["ts"], float) and abs(e["ts"] - time.time()) < 120 for e in events), events


def test_iso_clock_formats_fractions_and_seconds() -> None:
    """The per-second cache never serves a stale second; microseconds are zero-padded."""
    c = IsoClock()
    assert c.format(1_700_000_000.000123) == "2023-11-14T22:13:20.000123Z"
    assert c.format(1_700_000_000.5) == "2023-11-14T22:13:20.500000Z"
    assert c.format(1_700_000_061.25) == "2023-11-14T22:14:21.250000Z"


def test_decision_line_carries_what_support_needs(tmp_path: Path) -> None:
    """call_id, from_tag, account, from/to users, src_ip, node, decision, code, rule, the limiting
    profile with size/limit, shadow and latency; shadow_would_deny names the call."""
    with ServiceProcess(workdir=tmp_path) as svc:
        c = svc.client()
        for i in range(4):
            c.call("check", call_id=f"d{i}", from_tag=f"ft{i}", account="acme", src_ip="192.0.2.7",
                   **{"from": f"sip:u{i}@example.com", "to": "sip:00491234@example.com"})
        c.close()
    events = svc.log_events()
    [deny] = [e for e in events if e["event"] == "decision" and e["decision"] == "deny"]
    expected = {"call_id": "d3", "from_tag": "ft3", "account": "acme", "from_user": "u3", "to_user": "00491234",
                "src_ip": "192.0.2.7", "decision": "deny", "code": 486, "rule": "account-cap",
                "limit": {"profile": "account", "value": "acme", "size": 3, "limit": 3},
                "shadow": ["international-shadow"], "level": "info"}
    assert {k: deny.get(k) for k in expected} == expected
    assert "node" not in deny and isinstance(deny["latency_ms"], float)  # fields without a value are left out
    allows = [e for e in events if e["event"] == "decision" and e["decision"] == "allow"]
    assert len(allows) == 3 and not any(k in e for e in allows for k in ("code", "rule", "limit", "duplicate", "node"))
    assert not any(v is None for e in events if e["event"] == "decision" for v in e.values())
    would = [e for e in events if e["event"] == "shadow_would_deny"]
    assert [e["call_id"] for e in would] == ["d2", "d3"] and would[0]["rules"] == ["international-shadow"]


async def test_releases_are_logged_at_info_with_the_reason(tmp_path: Path) -> None:
    """An expiry and an operator's release each log `call_released` at info with the reason (a
    proxy's own end does not)."""
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    port = free_port()
    settings = Settings(tcp=f"127.0.0.1:{port}", udp=None, unix=None, rules=str(rules), snapshot=None, watch=False,
                        metrics=None, base_dir=tmp_path, early_timeout=30.0)
    clock = ManualClock()
    server = Server(settings, clock=clock)
    await server.start()
    try:
        svc = server.service
        assert svc is not None
        with capture_logs() as logs:
            for cid in ("x1", "x2", "x3"):
                await svc.handle({"op": "check", "call_id": cid, "account": "b", "from": f"sip:{cid}@x",
                                  "to": "sip:1@x"})
            await svc.handle({"op": "end", "call_id": "x1"})
            await svc.handle({"op": "release", "call_id": "x2"})
            clock.advance(31)
            for rec in await svc.store.sweep(clock.now()):
                svc.ended(rec, "timeout", clock.now())
    finally:
        await server.stop()
    released = [(e["call_id"], e["reason"], e["log_level"]) for e in logs if e["event"] == "call_released"]
    assert released == [("x2", "admin", "info"), ("x3", "timeout", "info")]
    assert [e["by"] for e in logs if e["event"] == "call_released"] == ["local", None]
    ends = [(e["call_id"], e["reason"]) for e in logs if e["event"] == "call_end"]
    assert ends == [("x1", "bye"), ("x2", "admin"), ("x3", "timeout")]


# -- formats ---------------------------------------------------------------------------------


def test_console_writes_no_ansi_when_not_a_terminal(tmp_path: Path) -> None:
    """`--log-format console` into a file: plain text, ISO timestamps, no escape sequences."""
    with ServiceProcess(workdir=tmp_path, extra=["--log-format", "console"]) as svc:
        c = svc.client()
        c.call("check", call_id="c1", **{"from": "sip:a@x", "to": "sip:1@x"})
        c.close()
    text = svc.log()
    assert "listening" in text and "decision" in text
    assert ANSI not in text
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \[info", text, re.M), text[:500]


def test_console_on_a_terminal_is_coloured(tmp_path: Path) -> None:
    """The same format on a terminal (a pty) is coloured - so the test above can fail."""
    port = free_port()
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "policy", "--config", str(ROOT / "service.toml"), "serve",
                             "--rules", str(RULES), "--listen", f"127.0.0.1:{port}", "--unix", "none",
                             "--snapshot", "none", "--metrics", "none"],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "JOURNAL_STREAM")})
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 15
        while b"listening" not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                out += os.read(master, 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        os.close(master)
    assert b"listening" in out and ANSI.encode() in out, out[:300]


def _journal_env(log: Path) -> dict[str, str]:
    st = os.stat(log)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journald_priorities_when_stderr_is_the_journal(tmp_path: Path) -> None:
    """JOURNAL_STREAM names our stderr and the format is auto: `<N>` syslog priorities, logfmt fields."""
    log = tmp_path / "serve.log"
    log.touch()
    with ServiceProcess(workdir=tmp_path, extra=["--log-format", "auto"], env=_journal_env(log)) as svc:
        c = svc.client()
        c.call("check", call_id="j1", **{"from": "sip:a@x", "to": "sip:1@x"})
        c.call("no_such_op")
        c.close()
    lines = svc.log().splitlines()
    assert any(x.startswith("<6>listening ") for x in lines), lines[:5]
    assert any(x.startswith("<6>decision call_id=j1 ") and " decision=allow" in x for x in lines), lines
    assert any(x.startswith("<4>bad_request ") for x in lines), lines
    assert all(re.match(r"<[0-7]>\S", x) for x in lines if x), lines
    assert ANSI not in svc.log() and not re.search(r"(^|\s)ts=", svc.log(), re.M)  # the journal keeps its own time


def test_journal_stream_of_another_file_is_not_journald(tmp_path: Path) -> None:
    """JOURNAL_STREAM set but naming another stream (output redirected): JSON as usual."""
    other = tmp_path / "other"
    other.touch()
    with ServiceProcess(workdir=tmp_path, extra=["--log-format", "auto"], env=_journal_env(other)) as svc:
        pass
    assert svc.log_events() and not svc.log().startswith("<")


def test_journald_format_by_name(tmp_path: Path) -> None:
    """`[log] format = "journald"` works without systemd too; priorities follow levels."""
    with ServiceProcess(workdir=tmp_path, extra=["--log-format", "journald"]) as svc:
        c = LineClient(port=svc.port)
        c.call("no_such_op")
        c.close()
    lines = svc.log().splitlines()
    assert any(x.startswith("<6>listening") for x in lines) and any(x.startswith("<4>bad_request") for x in lines)


def test_resolve_format(tmp_path: Path) -> None:
    """auto: journald on the announced journal stream, console on a tty, JSON otherwise."""
    f = tmp_path / "x"
    with open(f, "w") as out:
        assert resolve_format("auto", out) == "json"
        st = os.fstat(out.fileno())
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            assert on_journal(out) and resolve_format("auto", out) == "journald"
            assert resolve_format("json", out) == "json"
        finally:
            del os.environ["JOURNAL_STREAM"]
    assert not on_journal(object(), {"JOURNAL_STREAM": "1:2"})


@pytest.mark.parametrize("value", ["xml", "epochs"])
def test_bad_log_settings_are_refused(tmp_path: Path, value: str) -> None:
    from policy.errors import SettingsError
    from policy.settings import load_settings

    cfg = tmp_path / "s.toml"
    key = "format" if value == "xml" else "timestamps"
    cfg.write_text(f'[log]\n{key} = "{value}"\n')
    with pytest.raises(SettingsError, match=f"log.{key}"):
        load_settings(cfg)
