"""The real `callpolicy` process: restarts with snapshots, signals, and the CLI as an operator uses it."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.helpers import ROOT, LineClient, ServiceProcess


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run `python -m policy ARGS` and capture its output."""
    return subprocess.run([sys.executable, "-m", "policy", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=30)


def check(c: LineClient, cid: str, user: str = "6001", account: str = "acme", to: str = "6002") -> str:
    """Send a check, return the decision."""
    r = c.call("check", call_id=cid, account=account, **{"from": f"sip:{user}@example.com",
                                                          "to": f"sip:{to}@example.com"})
    assert r["ok"], r
    decision: str = r["decision"]
    return decision


def write_config(tmp: Path, snapshot_interval: float = 10.0, extra: str = "") -> Path:
    """A service.toml for a test (ports and paths come from the command line); `extra` is more TOML."""
    cfg = tmp / "service.toml"
    cfg.write_text(f"[store]\nsnapshot_interval = {snapshot_interval}\n[metrics]\nlisten = false\n{extra}")
    return cfg


def test_sigterm_snapshot_restores_every_call(tmp_path: Path) -> None:
    """A restart for an upgrade forgets no call: SIGTERM writes the snapshot, start restores it."""
    svc = ServiceProcess(workdir=tmp_path, config=write_config(tmp_path)).start()
    c = svc.client()
    for i in range(3):
        assert check(c, f"a{i}", user=f"u{i}") == "allow"
    c.call("answer", call_id="a0")
    c.close()
    assert svc.stop(signal.SIGTERM) == 0
    snap = orjson.loads((tmp_path / "snapshot.json").read_bytes())
    assert snap["version"] == 2  # calls are rows (field order: policy.store.snapshot.ROW_FIELDS)
    assert sorted(x[0] for x in snap["calls"]) == ["a0", "a1", "a2"]
    assert not list(tmp_path.glob("snapshot.json.journal.*"))  # folded into the final snapshot
    svc2 = ServiceProcess(workdir=tmp_path, config=write_config(tmp_path), port=svc.port).start()
    c = svc2.client()
    assert c.call("profile_size", profile="account", value="acme")["size"] == 3
    assert check(c, "a3", user="u3") == "deny"
    [active] = [x for x in c.call("profile_list", profile="account", value="acme")["calls"]
                if x["state"] == "active"]
    assert active["call_id"] == "a0"
    assert c.call("end", call_id="a1")["released"] is True
    assert check(c, "a3", user="u3") == "allow"
    c.close()
    svc2.stop()
    assert any(e["event"] == "snapshot_restored" and e["calls"] == 3 for e in svc2.log_events())


def test_sigkill_loses_no_end_or_answer_since_the_last_snapshot(tmp_path: Path) -> None:
    """Ends, answers and checks after the last snapshot survive a SIGKILL: the journal holds them.

    Before the journal, the ended a1 came back (holding a slot) and a0 came back unanswered.
    """
    cfg = write_config(tmp_path, snapshot_interval=3600)  # no compaction: only the journal can save them
    svc = ServiceProcess(workdir=tmp_path, config=cfg).start()
    c = svc.client()
    for i in range(3):
        assert check(c, f"a{i}", user=f"u{i}") == "allow"  # acme is full (cap 3)
    c.close()
    assert svc.stop(signal.SIGTERM) == 0  # the last snapshot: a0..a2, all early

    svc = ServiceProcess(workdir=tmp_path, config=cfg, port=svc.port).start()
    c = svc.client()
    assert c.call("answer", call_id="a0")["ok"]
    assert c.call("end", call_id="a1")["released"] is True
    assert check(c, "a3", user="u3") == "allow"
    assert c.call("ping")["ok"]  # answered after the last change: its journal line has been written
    c.close()
    [seg] = tmp_path.glob("snapshot.json.journal.*")
    assert seg.stat().st_size > 0
    svc.stop(signal.SIGKILL)

    svc = ServiceProcess(workdir=tmp_path, config=cfg, port=svc.port).start()
    c = svc.client()
    calls = {x["call_id"]: x["state"] for x in c.call("profile_list", profile="account", value="acme")["calls"]}
    assert calls == {"a0": "active", "a2": "early", "a3": "early"}
    assert check(c, "a4", user="u4") == "deny"
    stats = c.call("stats")["dialogs"]
    assert (stats["processed_dialogs"], stats["active_dialogs"], stats["early_dialogs"]) == (4, 1, 2)
    c.close()
    svc.stop()
    restored = [e for e in svc.log_events() if e["event"] == "snapshot_restored"][-1]  # the log is appended to
    assert restored["journal_lines"] == 3 and restored["calls"] == 3
    for name in ("snapshot.json", "snapshot.json.lock"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_second_instance_on_the_same_snapshot_is_refused(tmp_path: Path) -> None:
    """Two processes never share one state: the second exits non-zero naming the snapshot and the holder."""
    cfg = write_config(tmp_path)
    svc = ServiceProcess(workdir=tmp_path, config=cfg).start()
    assert svc.proc is not None
    r = cli("--config", str(cfg), "serve", "--rules", str(ROOT / "rules"), "--listen", "127.0.0.1:0",
            "--unix", "none", "--snapshot", svc.snapshot, "--metrics", "none", "--log-format", "json")
    assert r.returncode == 1
    assert (f"callpolicy: cannot start: snapshot {svc.snapshot} is in use by a running service "
            f"(pid {svc.proc.pid} holds {svc.snapshot}.lock)") in r.stderr
    c = svc.client()
    assert c.call("ping")["ok"]
    c.close()
    assert svc.stop() == 0


def test_live_unix_socket_is_never_taken_over_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    """A second service refuses a Unix socket a live one answers on; a killed one's stale file is replaced."""
    cfg = write_config(tmp_path)
    svc = ServiceProcess(workdir=tmp_path, config=cfg).start()
    r = cli("--config", str(cfg), "serve", "--rules", str(ROOT / "rules"), "--listen", "127.0.0.1:0",
            "--unix", svc.unix, "--snapshot", "none", "--metrics", "none", "--log-format", "json")
    assert r.returncode == 1
    assert f"callpolicy: cannot start: unix socket {svc.unix} is in use by a running service" in r.stderr
    c = LineClient(unix=svc.unix)
    assert c.call("ping")["ok"]  # still the first one's socket
    c.close()
    svc.stop(signal.SIGKILL)
    assert os.path.exists(svc.unix)  # stale: nobody accepts on it
    svc2 = ServiceProcess(workdir=tmp_path, config=cfg).start()
    c = LineClient(unix=svc2.unix)
    assert c.call("ping")["ok"]
    c.close()
    assert svc2.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real full disk (mounting needs root; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(directory: Path) -> Path:
    """Write a file until the file system says ENOSPC."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_disk_at_shutdown_exits_non_zero_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    """ENOSPC on the final snapshot: exit 1 with a clear line (not "cannot start"), no .tmp, and the
    next start restores every call from the previous snapshot and the journal."""
    cfg = write_config(tmp_path)
    svc = ServiceProcess(workdir=tmp_path, config=cfg)
    svc.snapshot = str(small_disk / "snapshot.json")
    svc.start()
    c = svc.client()
    for i in range(3):
        assert check(c, f"d{i}", user=f"u{i}") == "allow"
    c.call("answer", call_id="d0")
    c.call("end", call_id="d1")
    assert c.call("ping")["ok"]
    c.close()
    filler = fill_disk(small_disk)
    assert svc.stop(signal.SIGTERM) == 1
    out = svc.log()
    assert (f"callpolicy: stopped with an error: final snapshot {svc.snapshot} not written: [Errno 28] "
            "No space left on device; the journal is kept and the next start replays it: nothing is lost") in out
    assert "cannot start" not in out
    [failed] = [e for e in svc.log_events() if e["event"] == "snapshot_write_failed"]
    assert failed["path"] == svc.snapshot and "No space left" in failed["error"] and failed["final"] is True
    assert not [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")]
    filler.unlink()

    svc = ServiceProcess(workdir=tmp_path, config=cfg, port=svc.port)
    svc.snapshot = str(small_disk / "snapshot.json")
    svc.start()
    c = svc.client()
    calls = {x["call_id"]: x["state"] for x in c.call("profile_list", profile="account", value="acme")["calls"]}
    assert calls == {"d0": "active", "d2": "early"}
    c.close()
    assert svc.stop() == 0


def test_corrupt_snapshot_is_set_aside(tmp_path: Path) -> None:
    """A corrupt snapshot is reported and moved aside; the service starts empty, no crash."""
    (tmp_path / "snapshot.json").write_bytes(b'{"version": 1, "calls": [{"call_id": ')
    svc = ServiceProcess(workdir=tmp_path, config=write_config(tmp_path)).start()
    c = svc.client()
    assert c.call("profile_size", profile="total")["size"] == 0
    assert check(c, "x") == "allow"
    c.close()
    svc.stop()
    errors = [e for e in svc.log_events() if e["event"] == "snapshot_unreadable"]
    assert len(errors) == 1 and errors[0]["level"] == "error"
    assert list(tmp_path.glob("snapshot.json.corrupt-*"))


def wait_for_rules_version(c: LineClient, old: str, timeout: float = 5.0) -> str:
    """Poll `stats` until the rules version differs from `old` (bounded); the version seen last."""
    deadline = time.monotonic() + timeout
    version: str = c.call("stats")["rules_version"]
    while version == old and time.monotonic() < deadline:
        time.sleep(0.05)
        version = c.call("stats")["rules_version"]
    return version


def test_sighup_reloads_and_logs_listening_line(tmp_path: Path) -> None:
    """SIGHUP reloads edited rules; the start logs one line with where it listens and the rule count.

    The file watch is off here, so only the signal can have reloaded them."""
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    cfg = write_config(tmp_path, extra="[rules]\nwatch = false\n")
    svc = ServiceProcess(rules=rules, workdir=tmp_path, config=cfg).start()
    [listening] = [e for e in svc.log_events() if e["event"] == "listening"]
    assert listening["tcp"] == f"127.0.0.1:{svc.port}" and listening["udp"] == f"127.0.0.1:{svc.port}"
    assert listening["unix"] == svc.unix and listening["rules"] == 8 and listening["store"] == "embedded"
    c = svc.client()
    v1 = c.call("stats")["rules_version"]
    assert listening["rules_version"] == v1
    (rules / "account-limits.toml").write_text("[overrides.account-cap]\nacme = 1\n")
    time.sleep(1.5)  # longer than the default watch interval: nothing reloads without the signal
    assert c.call("stats")["rules_version"] == v1
    assert not [e for e in svc.log_events() if e["event"] == "rules_reloaded"]
    svc.send_signal(signal.SIGHUP)
    v2 = wait_for_rules_version(c, v1)
    assert v2 != v1
    stats = c.call("stats")
    assert stats["reloads"] == 1 and stats["reload_errors"] == 0
    assert check(c, "a0", user="u0") == "allow"
    assert check(c, "a1", user="u1") == "deny"
    c.close()
    svc.stop()
    [reloaded] = [e for e in svc.log_events() if e["event"] == "rules_reloaded"]
    assert reloaded["version"] == v2 and reloaded["previous"] == v1 and reloaded["rules"] == 8


def test_rules_watch_reloads_an_edit_without_a_signal(tmp_path: Path) -> None:
    """`[rules] watch = true`: a saved edit is picked up within a few watch intervals, no signal sent."""
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    cfg = write_config(tmp_path, extra="[rules]\nwatch = true\nwatch_interval = 0.2\n")
    svc = ServiceProcess(rules=rules, workdir=tmp_path, config=cfg).start()
    c = svc.client()
    v1 = c.call("stats")["rules_version"]
    assert check(c, "w0", user="u0") == "allow"
    assert check(c, "w1", user="u1") == "allow"
    assert c.call("end", call_id="w1")["released"] is True
    (rules / "account-limits.toml").write_text("[overrides.account-cap]\nacme = 1\n")
    v2 = wait_for_rules_version(c, v1)
    assert v2 != v1, "the edit was not picked up within 5 s"
    assert check(c, "w2", user="u2") == "deny"  # acme holds w0: at its new cap of 1
    c.close()
    svc.stop()
    [reloaded] = [e for e in svc.log_events() if e["event"] == "rules_reloaded"]
    assert reloaded["version"] == v2 and reloaded["previous"] == v1


def test_bad_rules_at_start_exit_with_the_message(tmp_path: Path) -> None:
    """A broken rules directory at start is refused with file, rule and key, exit code 2."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.toml").write_text('[profiles]\nno_value = ["total"]\n[[rule]]\nname = "x"\n'
                                  'join = [{ profile = "totl" }]\n')
    r = cli("serve", "--rules", str(rules), "--listen", "127.0.0.1:0", "--unix", "none", "--snapshot", "none",
            "--metrics", "none")
    assert r.returncode == 2
    assert f"{rules / 'r.toml'}: rule 'x': key 'join[0].profile': undefined profile 'totl'" in r.stderr


def test_cli_check_rules() -> None:
    """check-rules validates offline with the same messages as a reload."""
    ok = cli("check-rules", "rules")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 8 rules, 1 classifiers, 8 profiles in 2 file(s)")
    bad = cli("check-rules", str(ROOT / "tests" / "rules_bad" / "wrong_type.toml"))
    assert bad.returncode == 1
    assert bad.stderr.strip() == (f"error: {ROOT / 'tests' / 'rules_bad' / 'wrong_type.toml'}: rule 'cap': "
                                  "key 'limit.max': must be an integer, not a string")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> ServiceProcess:
    """One running service for the CLI tests."""
    tmp = tmp_path_factory.mktemp("cli")
    svc = ServiceProcess(workdir=tmp, config=write_config(tmp)).start()
    yield svc  # type: ignore[misc]
    svc.stop()


def test_cli_quick_start_check_output_and_ping(service: ServiceProcess) -> None:
    """README's Quick start, line by line: the check's profile lines and the hint to end the call,
    which works; `callpolicy ping` says pong. (First on the module's service: acme is empty.)"""
    srv = f"127.0.0.1:{service.port}"
    ping = cli("ping", "--server", srv)
    assert ping.returncode == 0 and ping.stdout.strip() == "pong", ping.stdout + ping.stderr
    r = cli("check", "--server", srv, "--from", "sip:6001@example.com", "--to", "sip:00861012345678@example.com",
            "--account", "acme")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    m = re.fullmatch(r"ALLOW  call_id=(cli-[0-9a-f-]{36})", lines[0])
    assert m, lines[0]
    cid = m.group(1)
    assert lines[1:] == [
        "  total: 1  (count-all)",
        "  type=international: 1  (count-all)",
        "  international: 1  (count-international)",
        "  account=acme: 1/3  (account-cap)",
        "  user=6001@example.com: 1/4  (user-cap)",
        "  international: 1/2  (international-shadow shadow)",
        f"  held until it expires or: callpolicy end {cid}",
    ]
    readme = (ROOT / "README.md").read_text()
    for line in lines[1:-1]:  # what README's Quick start shows is what the CLI prints
        assert f"\n{line}\n" in readme, line
    assert "\n  held until it expires or: callpolicy end cli-" in readme
    assert cli("profile", "size", "account", "acme", "--server", srv).stdout.strip() == "1"
    hint = lines[-1].split("or: ", 1)[1].split()
    assert hint[:2] == ["callpolicy", "end"]
    end = cli(*hint[1:], "--server", srv)
    assert end.returncode == 0 and end.stdout.strip() == "released"
    assert cli("profile", "size", "account", "acme", "--server", srv).stdout.strip() == "0"
    down = cli("ping", "--server", "127.0.0.1:1")
    assert down.returncode == 2 and "cannot connect to callpolicy at 127.0.0.1:1" in down.stderr


def test_cli_check_ruri_reaches_the_rules(tmp_path: Path) -> None:
    """`check --ruri` sends the Request-URI: a rule on `ruri_user` counts and caps the calls that
    carry it, and not a call whose To has the same number but no --ruri."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.toml").write_text(
        '[profiles]\nno_value = ["premium"]\n'
        '[[rule]]\nname = "premium-cap"\nmatch = { ruri_user = "0900123" }\n'
        'limit = { profile = "premium", max = 1 }\ndeny = { code = 403, reason = "Premium busy" }\n')
    svc = ServiceProcess(rules=rules, workdir=tmp_path, config=write_config(tmp_path)).start()
    try:
        srv = f"127.0.0.1:{svc.port}"
        base = ("check", "--server", srv, "--from", "sip:6001@example.com", "--to", "sip:0900123@example.com")
        first = cli(*base, "--ruri", "sip:0900123@gw.example.com", "--call-id", "r1")
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines()[:2] == ["ALLOW  call_id=r1", "  premium: 1/1  (premium-cap)"]
        second = cli(*base, "--ruri", "sip:0900123@gw.example.com", "--call-id", "r2")
        assert second.stdout.startswith("DENY 403 Premium busy (rule premium-cap)  call_id=r2"), second.stdout
        plain = cli(*base, "--call-id", "r3")  # no Request-URI: the rule does not match
        assert plain.stdout.splitlines() == ["ALLOW  call_id=r3", "  held until it expires or: callpolicy end r3"]
        other = cli(*base, "--ruri", "sip:0900999@gw.example.com", "--call-id", "r4")
        assert other.stdout.startswith("ALLOW  call_id=r4"), other.stdout
        assert cli("profile", "size", "premium", "--server", srv).stdout.strip() == "1"
    finally:
        svc.stop()


def test_cli_check_profile_end_stats(service: ServiceProcess) -> None:
    """check, profile size/list, end and stats, as an operator types them."""
    srv = f"127.0.0.1:{service.port}"
    for i in range(3):
        r = cli("check", "--server", srv, "--from", f"sip:{i}@example.com", "--to", "sip:6002@example.com",
                "--account", "acme", "--call-id", f"cli-{i}")
        assert r.returncode == 0 and r.stdout.startswith(f"ALLOW  call_id=cli-{i}")
    r = cli("check", "--server", srv, "--from", "sip:9@example.com", "--to", "sip:6002@example.com",
            "--account", "acme")
    assert r.stdout.startswith("DENY 486 Account call limit reached (rule account-cap)")
    assert cli("profile", "size", "account", "acme", "--server", srv).stdout.strip() == "3"
    listing = cli("profile", "list", "account", "acme", "--unix", service.unix).stdout
    assert "cli-0" in listing and listing.strip().endswith("3 call(s)")
    assert cli("end", "cli-0", "--server", srv).stdout.strip() == "released"
    assert cli("end", "cli-0", "--server", srv).stdout.strip() == "not held (nothing to release)"
    stats = cli("stats", "--server", srv).stdout
    assert "dialog:early_dialogs = 2" in stats and "rule:account-cap:deny = 1" in stats
    bad = cli("profile", "size", "nosuch", "--server", srv)
    assert bad.returncode == 1 and "unknown_profile" in bad.stderr


def test_cli_dry_run_explains(service: ServiceProcess) -> None:
    """--dry-run evaluates without reserving and explains each rule."""
    srv = f"127.0.0.1:{service.port}"
    r = cli("check", "--server", srv, "--from", "sip:6001@example.com", "--to", "sip:00861012345678@example.com",
            "--account", "zeta", "--dry-run")
    assert r.returncode == 0
    assert "attrs: type=international" in r.stdout
    assert "+ account-cap: matched: account is present" in r.stdout
    assert "- emergency: not matched: type == 'emergency'" in r.stdout
    assert cli("profile", "size", "account", "zeta", "--server", srv).stdout.strip() == "0"


def test_cli_unreachable_service() -> None:
    """An admin command with no service says so clearly."""
    r = cli("stats", "--server", "127.0.0.1:1")
    assert r.returncode == 2 and "cannot connect to callpolicy at 127.0.0.1:1" in r.stderr


def test_nc_style_udp_and_line_protocol(service: ServiceProcess) -> None:
    """The README's nc example: a line of JSON in, a line of JSON out."""
    if shutil.which("nc") is None:
        pytest.skip("nc not installed")
    out = subprocess.run(["nc", "-q", "1", "127.0.0.1", str(service.port)],
                         input=b'{"op":"ping","id":1}\n', capture_output=True, timeout=10).stdout
    assert orjson.loads(out)["pong"] is True


def test_python_m_policy_help() -> None:
    """`python -m policy` is the CLI."""
    r = cli("--help")
    assert r.returncode == 0 and "check-rules" in r.stdout
    assert os.path.exists(ROOT / "service.toml")


def test_prometheus_metrics(tmp_path: Path) -> None:
    """/metrics shows decisions per rule and the dialog stats."""
    import urllib.request

    from tests.helpers import free_port

    mport = free_port()
    svc = ServiceProcess(workdir=tmp_path, config=write_config(tmp_path),
                         extra=["--metrics", f"127.0.0.1:{mport}"]).start()
    c = svc.client()
    for i in range(4):
        check(c, f"m{i}", user=f"u{i}")
    c.call("stats")
    c.close()
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    svc.stop()
    assert 'callpolicy_decisions_total{outcome="allow"} 3.0' in body
    assert 'callpolicy_rule_decisions_total{outcome="deny",rule="account-cap"} 1.0' in body
    assert "callpolicy_dialog_early_dialogs 3.0" in body
    assert 'callpolicy_task_restarts_total{task="sweeper"} 0.0' in body


def ping_unix(svc: ServiceProcess, timeout: float = 15.0) -> dict[str, object]:
    """Ping `svc` on its own Unix socket, waiting (bounded) until it is up."""
    deadline = time.monotonic() + timeout
    while True:
        assert svc.proc is not None and svc.proc.poll() is None, svc.log()
        try:
            c = LineClient(unix=svc.unix, timeout=1.0)
        except OSError:
            assert time.monotonic() < deadline, f"{svc.unix} never answered:\n{svc.log()}"
            time.sleep(0.05)
            continue
        try:
            r = c.call("ping")
        finally:
            c.close()
        assert r["ok"], r
        return r


def test_reuse_port_two_processes_answer_on_one_port(tmp_path: Path) -> None:
    """`[listen] reuse_port = true`: two processes (an embedded store each) serve one TCP and UDP
    port and the kernel spreads new connections and datagrams over both; without it the second
    process cannot bind the port.

    Each process has its own rules (a different rules_version, which `ping` returns), so a reply
    says which process answered."""
    rules_b = tmp_path / "rules-b"
    shutil.copytree(ROOT / "rules", rules_b)
    (rules_b / "account-limits.toml").write_text("[overrides.account-cap]\nacme = 1\n")
    procs: list[ServiceProcess] = []
    try:
        for name, rules in (("a", ROOT / "rules"), ("b", rules_b)):
            work = tmp_path / name
            work.mkdir()
            cfg = write_config(work, extra="[listen]\nreuse_port = true\n[rules]\nwatch = false\n")
            procs.append(ServiceProcess(rules=rules, workdir=work, config=cfg,
                                        port=procs[0].port if procs else None).start())
        a, b = procs
        assert a.port == b.port
        versions = {}
        for svc in (a, b):  # each one's own version, asked on its own Unix socket
            # start() returns on a ping over the shared port, which the other one may have answered
            versions[svc.unix] = ping_unix(svc)["rules_version"]
        assert len(set(versions.values())) == 2
        for svc in (a, b):
            [listening] = [e for e in svc.log_events() if e["event"] == "listening"]
            assert listening["tcp"] == listening["udp"] == f"127.0.0.1:{a.port}"

        seen_tcp: set[str] = set()
        for _ in range(200):  # each new connection lands on one of them (hash of the 4-tuple)
            c = LineClient(port=a.port)
            r = c.call("ping")
            c.close()
            assert r["ok"] and r["pong"] is True
            seen_tcp.add(r["rules_version"])
            if seen_tcp == set(versions.values()):
                break
        assert seen_tcp == set(versions.values())

        seen_udp: set[str] = set()
        for i in range(200):  # each new source port: one of them (padded: a UDP answer is never bigger)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(2.0)
                u.sendto(orjson.dumps({"op": "ping", "id": i, "pad": "x" * 100}), ("127.0.0.1", a.port))
                r = orjson.loads(u.recv(65535))
            assert r["ok"] and r["id"] == i
            seen_udp.add(r["rules_version"])
            if seen_udp == set(versions.values()):
                break
        assert seen_udp == set(versions.values())

        work = tmp_path / "c"
        work.mkdir()
        r = cli("--config", str(write_config(work)), "serve", "--rules", str(ROOT / "rules"), "--listen",
                f"127.0.0.1:{a.port}", "--unix", "none", "--snapshot", "none", "--metrics", "none")
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("callpolicy: cannot start: ") and str(a.port) in r.stderr, r.stderr
        assert "address already in use" in r.stderr, r.stderr
        # it says which listener, and how processes share a port
        assert f"[listen] tcp 127.0.0.1:{a.port}" in r.stderr and "reuse_port = true" in r.stderr, r.stderr
        for svc in (a, b):  # the refused one disturbed neither
            assert ping_unix(svc)["rules_version"] == versions[svc.unix]
    finally:
        codes = [svc.stop() for svc in procs]
    assert codes == [0, 0]
