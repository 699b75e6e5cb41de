"""The `callpolicy` command as an operator types it, against a real `callpolicy serve`: --version,
--config after the command, check's validation, profile values, end --profile with its
confirmation, terminate without a proxy, human times (raw epochs with --json), a closed pipe."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import orjson
import pytest

from policy.cli import _settings, build_parser
from policy.cli.format import EXIT_PIPE, ago, span, table, until
from tests.helpers import ROOT, ServiceProcess


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policy", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False, input=stdin)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "service.toml"
    cfg.write_text("[metrics]\nlisten = false\n")
    s = ServiceProcess(workdir=tmp, config=cfg).start()
    yield s
    s.stop()


def hold(svc: ServiceProcess, account: str, n: int, prefix: str | None = None) -> None:
    """Hold n calls of an account (checked: early)."""
    c = svc.client()
    for i in range(n):
        r = c.call("check", call_id=f"{prefix or account}-{i}", from_tag=f"t{i}", account=account,
                   **{"from": f"sip:{account}{i}@example.com"}, to="sip:6002@example.com")
        assert r["decision"] == "allow", r
    c.close()


def size(svc: ServiceProcess, profile: str, value: str | None = None) -> int:
    c = svc.client()
    try:
        return int(c.call("profile_size", profile=profile, **({"value": value} if value else {}))["size"])
    finally:
        c.close()


# -- without a service ------------------------------------------------------------------------------


def test_version_is_the_package_metadata() -> None:
    """`--version` (and -V) print the installed package's version."""
    want = f"callpolicy {metadata.version('callpolicy')}"
    for flag in ("--version", "-V"):
        r = cli(flag)
        assert r.returncode == 0 and r.stdout.strip() == want


def test_config_is_accepted_after_the_command(tmp_path: Path) -> None:
    """`serve --config X` is the same as `--config X serve`; after the command it wins."""
    (tmp_path / "evapi.token").write_text("s\n")
    a = tmp_path / "a.toml"
    a.write_text('[evapi]\nnodes = ["10.0.0.1:8448"]\ntoken_file = "evapi.token"\n')
    b = tmp_path / "b.toml"
    b.write_text('[evapi]\nnodes = ["10.0.0.2:8448"]\ntoken_file = "evapi.token"\n')
    p = build_parser()
    assert _settings(p.parse_args(["serve", "--config", str(a)])).evapi_nodes == ["10.0.0.1:8448"]
    assert _settings(p.parse_args(["--config", str(a), "serve"])).evapi_nodes == ["10.0.0.1:8448"]
    assert _settings(p.parse_args(["--config", str(a), "serve", "-c", str(b)])).evapi_nodes == ["10.0.0.2:8448"]
    assert p.parse_args(["stats", "--config", str(b)]).config == str(b)
    r = cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr


def test_serve_tcp_and_udp_options_reach_the_settings(tmp_path: Path) -> None:
    """`serve --tcp HOST:PORT --udp HOST:PORT` set each listener apart (over service.toml and
    --listen); `none` switches one off."""
    cfg = tmp_path / "service.toml"
    cfg.write_text('[listen]\ntcp = "127.0.0.1:7000"\nudp = "127.0.0.1:7001"\n[metrics]\nlisten = false\n')
    p = build_parser()

    def listeners(*argv: str) -> tuple[str | None, str | None]:
        s = _settings(p.parse_args(["--config", str(cfg), "serve", *argv]))
        return s.tcp, s.udp

    assert listeners() == ("127.0.0.1:7000", "127.0.0.1:7001")
    assert listeners("--tcp", "127.0.0.2:5100", "--udp", "127.0.0.3:5101") == ("127.0.0.2:5100", "127.0.0.3:5101")
    assert listeners("--tcp", "127.0.0.2:5100") == ("127.0.0.2:5100", "127.0.0.1:7001")
    assert listeners("--udp", "[::1]:5101") == ("127.0.0.1:7000", "[::1]:5101")
    assert listeners("--listen", "127.0.0.4:5200") == ("127.0.0.4:5200", "127.0.0.4:5200")
    assert listeners("--listen", "127.0.0.4:5200", "--udp", "127.0.0.5:5201") == ("127.0.0.4:5200", "127.0.0.5:5201")
    assert listeners("--tcp", "none", "--udp", "127.0.0.3:5101") == (None, "127.0.0.3:5101")
    assert listeners("--listen", "none") == (None, None)


@pytest.mark.parametrize(("args", "message"), [
    (["--to", "sip:1@x"], "--from and --to are required"),
    (["--from", "sip:1@x"], "--from and --to are required"),
    (["--from", "sip:1@x", "--to", "sip:2@x", "--src-ip", "10.0.0"], "--src-ip '10.0.0' is not an IP address"),
    (["--from", "sip:1@x", "--to", "sip:2@x", "--src-ip", "example.com"], "is not an IP address"),
    (["--from", "sip:1@x", "--to", "sip:2@x", "--attr", "channels"], "--attr 'channels': expected NAME=VALUE"),
    (["--from", "sip:1@x", "--to", "sip:2@x", "--attr", "1x=2"], "expected NAME=VALUE"),
    (["--from", "sip:1@x", "--to", "sip:2@x", "--attr", "a=1", "--attr", "a=2"], "--attr 'a' given twice"),
])
def test_check_refuses_bad_arguments_before_asking(args: list[str], message: str) -> None:
    """Refused with exit 2 and the reason before any request: nothing listens on port 1 here,
    and the error is not 'cannot connect'."""
    r = cli("check", "--server", "127.0.0.1:1", *args)
    assert r.returncode == 2 and message in r.stderr and "cannot connect" not in r.stderr, r.stderr


def test_human_times() -> None:
    """Durations and relative times for tables."""
    assert [span(s) for s in (0, 42, 187, 43140, 43200 - 1, 2 * 86400 + 3 * 3600 + 5)] == \
        ["0s", "42s", "3m07s", "11h59m", "11h59m", "2d03h"]
    assert ago(1000.0, 1187.0) == "3m07s ago" and ago(None, 5.0) == "-" and ago(1000.0, 1000.4) == "now"
    assert until(1000.0 + 43140, 1000.0) == "in 11h59m" and until(1000.0, 1003.5) == "expired 3s ago"


def test_table_aligns_columns(capsys: pytest.CaptureFixture[str]) -> None:
    table(("A", "LONG-HEADER", "Z"), [("xx", 1, "last"), ("y", None, "")])
    assert capsys.readouterr().out.splitlines() == ["A   LONG-HEADER  Z", "xx  1            last", "y"]


# -- against a running service -----------------------------------------------------------------------


def test_check_without_from_never_holds_a_slot(svc: ServiceProcess) -> None:
    """A refused check reaches the service never: no slot, no decision counted."""
    srv = f"127.0.0.1:{svc.port}"
    before = orjson.loads(cli("stats", "--server", srv, "--json").stdout)
    r = cli("check", "--server", srv, "--account", "nofrom", "--to", "sip:1@x")
    assert r.returncode == 2
    after = orjson.loads(cli("stats", "--server", srv, "--json").stdout)
    assert after["dialogs"]["processed_dialogs"] == before["dialogs"]["processed_dialogs"]
    assert size(svc, "account", "nofrom") == 0
    ok = cli("check", "--server", srv, "--from", "sip:a@x", "--to", "sip:1@x", "--src-ip", "2001:db8::1",
             "--attr", "channels=4", "--dry-run")
    assert ok.returncode == 0 and ok.stdout.startswith("ALLOW"), ok.stdout + ok.stderr


def test_profile_values_sorted_with_top(svc: ServiceProcess) -> None:
    """`profile values PROFILE`: each value's size, biggest first (ties by value), --top N."""
    hold(svc, "pv-big", 4)
    hold(svc, "pv-mid", 2)
    hold(svc, "pv-one", 1)
    srv = f"127.0.0.1:{svc.port}"
    r = cli("profile", "values", "account", "--server", srv)
    assert r.returncode == 0, r.stderr
    every = [ln.split() for ln in r.stdout.splitlines()[1:-1]]
    assert [row for row in every if row[0].startswith("pv-")] == [["pv-big", "4"], ["pv-mid", "2"], ["pv-one", "1"]]
    assert [(-int(n), v) for v, n in every] == sorted((-int(n), v) for v, n in every)
    top = cli("profile", "values", "account", "--top", "1", "--server", srv).stdout.splitlines()
    assert top[0].split() == ["VALUE", "SIZE"] and top[1].split() == every[0]
    assert len(top) == 3 and f"{len(every) - 1} not shown" in top[2]
    data = orjson.loads(cli("profile", "values", "account", "--server", srv, "--json").stdout)
    assert {"value": "pv-big", "size": 4} in data["values"]
    bad = cli("profile", "values", "total", "--server", srv)
    assert bad.returncode == 1 and "declared without value" in bad.stderr


def test_profile_list_human_times_and_json_epochs(svc: ServiceProcess) -> None:
    """Tables show 'started 1s ago' / 'in 4m59s'; --json keeps the epoch seconds."""
    hold(svc, "times", 1)
    srv = f"127.0.0.1:{svc.port}"
    r = cli("profile", "list", "account", "times", "--server", srv)
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["CALL-ID", "FROM-TAG", "STATE"] and lines[-1] == "1 call(s)"
    assert re.search(r"times-0\s+t0\s+early\s+times\s+.*\s(now|\d+s ago)\s+in 4m5\ds\s", lines[1]), lines[1]
    data = orjson.loads(cli("profile", "list", "account", "times", "--server", srv, "--json").stdout)
    [call] = data["calls"]
    assert isinstance(call["expires"], float) and abs(call["expires"] - (time.time() + 300)) < 30


def test_end_profile_asks_first(svc: ServiceProcess) -> None:
    """`end --profile P VALUE` releases every call in the key after a yes: refused without a
    terminal (no --yes), 'n' keeps them, 'y' on the terminal or --yes releases them."""
    hold(svc, "endp", 3)
    srv = f"127.0.0.1:{svc.port}"
    r = cli("end", "--profile", "account", "endp", "--server", srv)
    assert r.returncode == 1 and "add --yes" in r.stderr and size(svc, "account", "endp") == 3
    out, rc = on_terminal(["end", "--profile", "account", "endp", "--server", srv], answer="n")
    assert rc == 1 and "Release the 3 call(s) in account=endp?" in out and size(svc, "account", "endp") == 3
    out, rc = on_terminal(["end", "--profile", "account", "endp", "--server", srv], answer="y")
    assert rc == 0 and "released 3 call(s) in account=endp" in out and size(svc, "account", "endp") == 0
    hold(svc, "endq", 2)
    r = cli("end", "--profile", "account", "endq", "--yes", "--server", srv)
    assert r.returncode == 0 and r.stdout.strip() == "released 2 call(s) in account=endq"
    assert cli("end", "--profile", "account", "endq", "--server", srv).stdout.strip() == "nothing held in account=endq"
    hold(svc, "endt", 1)
    r = cli("end", "endt-0", "--from-tag", "t0", "--server", srv)
    assert r.stdout.strip() == "released" and size(svc, "account", "endt") == 0


def test_terminate_needs_a_proxy(svc: ServiceProcess) -> None:
    """Without evapi nodes nothing can end a call in a proxy: a clear error, nothing released."""
    hold(svc, "term", 1)
    srv = f"127.0.0.1:{svc.port}"
    r = cli("terminate", "term-0", "--server", srv)
    assert r.returncode == 1 and "error: unavailable: no proxy can end calls" in r.stderr
    r = cli("terminate", "--profile", "account", "term", "--yes", "--server", srv)
    assert r.returncode == 1 and "unavailable" in r.stderr and size(svc, "account", "term") == 1
    r = cli("terminate", "--server", srv)
    assert r.returncode == 2


def test_closed_pipe_exits_quietly(svc: ServiceProcess) -> None:
    """`callpolicy profile list total | head -1`: no traceback, exit 141 like a C tool."""
    c = svc.client()
    for i in range(3000):
        c.send({"op": "answer", "call_id": f"pipe-{i}", "account": "pipe", "create": True,
                "from": f"sip:p{i}@x", "to": "sip:1@x"})
    for _ in range(3000):
        assert c.recv()["ok"]
    c.close()
    proc = subprocess.Popen([sys.executable, "-m", "policy", "profile", "list", "total", "--server",
                             f"127.0.0.1:{svc.port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(30) == EXIT_PIPE
    assert first.startswith(b"CALL-ID") and err == b""
    r = subprocess.run(f"{sys.executable} -m policy stats --server 127.0.0.1:{svc.port} | head -1", shell=True,
                       capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
    assert r.stdout.startswith("dialog:active_dialogs = ") and r.stderr == ""


def test_new_ops_are_admin_ops(svc: ServiceProcess) -> None:
    """`top` and `terminate` read or change everything: admin ops, refused to a proxy."""
    from policy import protocol as P

    admin = {t.__struct_config__.tag for t in P.OPS if t.ROLE == "admin"}
    assert {"top", "terminate"} <= admin
    c = svc.client()
    try:
        r = c.call("terminate", call_id="x", profile="account")
        assert r["error"]["code"] == "bad_field"
        assert c.call("terminate")["error"]["code"] == "missing_field"
        assert c.call("top", limit=0)["error"]["code"] == "bad_field"
        assert c.call("terminate", call_id="x", wait=31)["error"]["code"] == "bad_field"
    finally:
        c.close()


# -- a pseudo-terminal ---------------------------------------------------------------------------------


def on_terminal(args: list[str], answer: str, timeout: float = 30.0) -> tuple[str, int]:
    """Run the CLI on a pseudo-terminal, type `answer` at its prompt; (everything it printed, exit status)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "policy", *args], stdin=slave, stdout=slave, stderr=slave,
                            cwd=ROOT, close_fds=True)
    os.close(slave)
    out = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if not answered and b"[y/N]" in out:
                    os.write(master, answer.encode() + b"\n")
                    answered = True
            elif proc.poll() is not None:
                break
        return out.decode(errors="replace"), proc.wait(10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


# -- terminate --profile asks first; profile list pages past one page --------------------------------


def test_terminate_profile_asks_first(svc: ServiceProcess) -> None:
    """`terminate --profile P VALUE` asks y/N before it asks any proxy: refused without a terminal
    (no --yes) with the hint, 'n' on the terminal shows the question and sends nothing; 'y' goes on
    to the request (here: no proxy, so the service's 'unavailable'). The calls stay held throughout."""
    hold(svc, "termask", 2)
    srv = f"127.0.0.1:{svc.port}"
    args = ["terminate", "--profile", "account", "termask", "--server", srv]
    r = cli(*args)
    assert r.returncode == 1 and "not confirmed (no terminal): add --yes" in r.stderr, r
    assert "unavailable" not in r.stderr and r.stdout == "" and size(svc, "account", "termask") == 2
    out, rc = on_terminal(args, answer="n")
    assert rc == 1, out
    assert "End the 2 call(s) in account=termask in the proxies (BYE or CANCEL to both sides)? [y/N]" in out
    assert "unavailable" not in out and "ended in their proxy" not in out  # no request was made
    assert size(svc, "account", "termask") == 2
    out, rc = on_terminal(args, answer="y")  # the yes reaches the service, which has no proxy to ask
    assert rc == 1 and "End the 2 call(s) in account=termask" in out and "unavailable" in out, out
    assert size(svc, "account", "termask") == 2


def test_profile_list_pages_past_one_page(svc: ServiceProcess) -> None:
    """`profile list account VALUE` prints every call though the service answers at most MAX_PAGE
    (1000) per request; `--limit N` stops at N, across a page boundary too; no call twice."""
    from policy.store.base import MAX_PAGE

    n = 3 * MAX_PAGE
    c = svc.client()
    for i in range(n):
        c.send({"op": "answer", "call_id": f"page-{i}", "account": "paged", "create": True,
                "from": f"sip:pg{i}@x", "to": "sip:1@x"})
    for _ in range(n):
        assert c.recv()["ok"]
    c.close()
    srv = f"127.0.0.1:{svc.port}"
    assert size(svc, "account", "paged") == n

    def listed(*extra: str) -> list[str]:
        r = cli("profile", "list", "account", "paged", "--server", srv, *extra)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split()[0] == "CALL-ID"
        ids = [ln.split()[0] for ln in lines[1:-1]]
        assert lines[-1] == f"{len(ids)} call(s)"
        return ids

    every = listed()
    assert len(every) == n and set(every) == {f"page-{i}" for i in range(n)}
    for limit in (1, MAX_PAGE, MAX_PAGE + 500):
        some = listed("--limit", str(limit))
        assert len(some) == limit and len(set(some)) == limit and set(some) <= set(every)
    data = orjson.loads(cli("profile", "list", "account", "paged", "--server", srv, "--json").stdout)
    assert len(data["calls"]) == n and len({call["call_id"] for call in data["calls"]}) == n
