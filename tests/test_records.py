"""Call records: every field for each way a call ends, the file sink, the webhook sink (down, back,
full, refused, stuck) and the spool across a SIGTERM - over real sockets and real processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from policy.clock import ManualClock
from policy.records import CallRecords, JsonLinesSink, WebhookSink, build_record, iso
from policy.server import Server
from policy.service import PolicyService
from policy.settings import Settings, load_settings
from policy.store.base import CallRecord
from tests.helpers import ROOT, LineClient, ServiceProcess, free_port
from tests.webhook import Receiver

T0 = 1_700_000_000.0


def ts(text: str) -> float:
    """An ISO-8601 record time back to epoch seconds."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class Running:
    """An in-process service writing records to a file, on a manual clock."""

    server: Server
    clock: ManualClock
    port: int
    path: Path

    @property
    def service(self) -> PolicyService:
        assert self.server.service is not None
        return self.server.service

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(orjson.dumps({"op": op, **fields}) + b"\n")
        await writer.drain()
        reply: dict[str, Any] = orjson.loads(await asyncio.wait_for(reader.readline(), 5))
        writer.close()
        return reply

    async def records(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until the file holds `n` records; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = [orjson.loads(x) for x in self.path.read_bytes().splitlines()] if self.path.exists() else []
            if len(got) >= n or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.01)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    port = free_port()
    settings = Settings(tcp=f"127.0.0.1:{port}", udp=None, unix=None, rules=str(rules), snapshot=None,
                        watch=False, metrics=None, base_dir=tmp_path, sweep_interval=0.01,
                        early_timeout=30.0, default_timeout=600.0, records_file="records/calls.jsonl")
    clock = ManualClock(T0)
    server = Server(settings, clock=clock)
    await server.start()
    yield Running(server, clock, port, tmp_path / "records" / "calls.jsonl")
    await server.stop()


def check(call_id: str, **extra: Any) -> dict[str, Any]:
    msg = {"call_id": call_id, "from_tag": "ft-" + call_id, "from": "sip:6001@example.com",
           "to": "sip:0049301234@example.com", "account": "acme"}
    msg.update(extra)
    return msg


# -- every field, for each way a call ends ----------------------------------------------------


async def test_answered_call_ended_by_bye(running: Running) -> None:
    """check (with vars) -> 2.5 s -> answer -> set_var -> 60 s -> bye: every field of the record."""
    r = await running.call("check", **check("r1", vars={"billing": "gold"}))
    assert r["decision"] == "allow", r
    running.clock.advance(2.5)
    assert (await running.call("answer", call_id="r1", from_tag="ft-r1", token=r["token"]))["found"]
    assert (await running.call("set_var", call_id="r1", from_tag="ft-r1", name="plan", value="x"))["found"]
    running.clock.advance(60.0)
    assert (await running.call("end", call_id="r1", from_tag="ft-r1", reason="bye"))["released"]
    [rec] = await running.records(1)
    assert len(rec.pop("record_id")) == 32
    assert rec == {
        "call_id": "r1", "from_tag": "ft-r1", "from": "sip:6001@example.com", "to": "sip:0049301234@example.com",
        "account": "acme", "type": "international", "node": "",
        "profiles": [{"profile": "total", "value": None}, {"profile": "type", "value": "international"},
                     {"profile": "international", "value": None}, {"profile": "account", "value": "acme"},
                     {"profile": "user", "value": "6001@example.com"}],
        "created": iso(T0), "answered": iso(T0 + 2.5), "ended": iso(T0 + 62.5),
        "setup_s": 2.5, "duration_s": 60.0, "reason": "bye", "vars": {"billing": "gold", "plan": "x"},
    }
    assert rec["created"] == "2023-11-14T22:13:20.000Z"
    assert running.path.stat().st_mode & 0o777 == 0o600


async def test_unanswered_call_cancelled(running: Running) -> None:
    """A call cancelled before the answer: setup runs to the end, duration is 0, answered is null."""
    await running.call("check", **check("r2", to="sip:6002@example.com"))
    running.clock.advance(4.25)
    await running.call("end", call_id="r2", from_tag="ft-r2", reason="cancel")
    [rec] = await running.records(1)
    assert (rec["answered"], rec["setup_s"], rec["duration_s"], rec["reason"], rec["type"]) == (
        None, 4.25, 0.0, "cancel", "local")
    assert ts(rec["ended"]) - ts(rec["created"]) == pytest.approx(4.25)


async def test_expiry_by_the_sweep(running: Running) -> None:
    """Never answered, never ended: the sweep expires it; `ended` is when the lease ran out."""
    await running.call("check", **check("r3"))
    running.clock.advance(30.0 + 7.0)  # early_timeout is 30 s; the sweep finds it 7 s late
    [rec] = await running.records(1)
    assert rec["reason"] == "timeout"
    assert rec["ended"] == iso(T0 + 30.0)
    assert (rec["answered"], rec["setup_s"], rec["duration_s"]) == (None, 30.0, 0.0)


async def test_answered_call_expires(running: Running) -> None:
    """An answered call whose refreshes stopped: duration runs to the end of its last lease."""
    r = await running.call("check", **check("r4"))
    running.clock.advance(1.0)
    await running.call("answer", call_id="r4", from_tag="ft-r4", token=r["token"], timeout=120)
    running.clock.advance(200.0)
    [rec] = await running.records(1)
    assert (rec["reason"], rec["setup_s"], rec["duration_s"]) == ("timeout", 1.0, 120.0)
    assert rec["answered"] == iso(T0 + 1.0) and rec["ended"] == iso(T0 + 121.0)


async def test_admin_release(running: Running) -> None:
    """An operator's release: one record with reason admin; a profile release: one per call."""
    for cid in ("r5", "r6", "r7"):
        await running.call("check", **check(cid, **{"from": f"sip:{cid}@example.com"}))
    running.clock.advance(3.0)
    assert (await running.call("release", call_id="r5", from_tag="ft-r5"))["released"] == 1
    assert (await running.call("release", profile="account", value="acme"))["released"] == 2
    recs = await running.records(3)
    assert sorted(r["call_id"] for r in recs) == ["r5", "r6", "r7"]
    assert {r["reason"] for r in recs} == {"admin"}
    assert all(r["setup_s"] == 3.0 and r["duration_s"] == 0.0 for r in recs)
    assert len({r["record_id"] for r in recs}) == 3


async def test_reconciliation_end_goes_through_the_same_listener(running: Running) -> None:
    """Whatever ends a call calls `service.ended` (reconciliation does too): one record, its reason."""
    await running.call("check", **check("r8"))
    rec = await running.service.store.end("r8 ft-r8", running.clock.now(), "reconciled")
    assert rec is not None
    running.service.ended(rec, "reconciled", running.clock.now())
    [out] = await running.records(1)
    assert (out["call_id"], out["reason"]) == ("r8", "reconciled")


def test_type_comes_from_the_type_profile() -> None:
    """`type` is the value the call held in the configured profile; '' when it held none."""
    rec = CallRecord("c", "f", "t", "a", "active", T0, T0 + 1, 60, T0 + 61,
                     [("total", None), ("kind", "mobile")])
    assert build_record(rec, "bye", T0 + 5, type_profile="kind")["type"] == "mobile"
    assert build_record(rec, "bye", T0 + 5)["type"] == ""
    assert build_record(rec, "bye", T0 + 5)["duration_s"] == 4.0


# -- the file ------------------------------------------------------------------------------


def _record(i: int) -> CallRecord:
    return CallRecord(f"call-{i}", "sip:a@x", "sip:b@x", "acme", "active", T0, T0 + 1, 60, T0 + 61,
                      [("total", None)], from_tag=f"t{i}")


async def test_file_rotates_by_size_and_loses_nothing(tmp_path: Path) -> None:
    """Past rotate_bytes the file is renamed NAME.<UTC time>; every record is in exactly one file."""
    path = tmp_path / "calls.jsonl"
    clock = ManualClock(T0)
    sink = JsonLinesSink(path, rotate_bytes=4000, clock=clock.now)
    records = CallRecords([sink])
    await records.start()
    for i in range(100):
        records(_record(i), "bye", T0 + 10)
        if i % 7 == 0:
            await asyncio.sleep(0)  # a few loop ticks: several writes
            clock.advance(1)
    await records.close(1.0)
    files = sorted(tmp_path.iterdir())
    assert len(files) >= 4, files
    seen = []
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600
        assert f == path or f.name.startswith("calls.jsonl.2023"), f
        data = f.read_bytes()
        assert len(data) <= 4000 or data.count(b"\n") == 1, (f, len(data))
        seen += [orjson.loads(x)["call_id"] for x in data.splitlines()]
    assert sorted(seen) == sorted(f"call-{i}" for i in range(100))
    assert sink.info()["rotations"] == len(files) - 1
    assert sink.info()["delivered"] == 100


async def test_file_rotates_by_age(tmp_path: Path) -> None:
    """rotate_seconds after a file's first record (on the sink's clock) it is renamed; an empty file stays."""
    path = tmp_path / "calls.jsonl"
    clock = ManualClock(T0)
    sink = JsonLinesSink(path, rotate_seconds=3600, clock=clock.now)
    await sink.start()
    sink.check_rotation()
    clock.advance(7200)
    sink.check_rotation()  # empty: nothing to rotate
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.jsonl"]
    sink.put(b'{"n":1}')
    await asyncio.sleep(0)
    clock.advance(3599)
    sink.check_rotation()
    assert sink.info()["rotations"] == 0
    clock.advance(1)
    sink.put(b'{"n":2}')
    await asyncio.sleep(0)
    await sink.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["calls.jsonl", "calls.jsonl.20231115T011320Z"], names
    assert (tmp_path / names[1]).read_bytes() == b'{"n":1}\n'
    assert path.read_bytes() == b'{"n":2}\n'


async def test_full_disk_holds_records_within_the_bound(tmp_path: Path) -> None:
    """/dev/full (ENOSPC on every write): put never raises, records wait, past the bound they are dropped
    (counted, logged), and errors are counted."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    sink = JsonLinesSink("/dev/full", queue_max=5)
    with capture_logs() as logs:
        await sink.start()
        for i in range(8):
            sink.put(orjson.dumps({"i": i}))
        await asyncio.sleep(0)
        info = sink.info()
        await sink.close()
    assert (info["queued"], info["dropped"], info["delivered"]) == (5, 3, 0)
    assert info["errors"] >= 1
    events = [e["event"] for e in logs]
    assert "records_write_failed" in events and "records_dropped" in events and "records_lost" in events


# -- the webhook ----------------------------------------------------------------------------


def emitted_ids(path: Path) -> list[str]:
    return [orjson.loads(x)["record_id"] for x in path.read_bytes().splitlines()]


async def test_webhook_down_then_back_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """Nothing listens, then 503s, then 200s: every record arrives acknowledged exactly once, in order."""
    port = free_port()
    file_sink = JsonLinesSink(tmp_path / "calls.jsonl")
    hook = WebhookSink(f"http://127.0.0.1:{port}/cdr?src=test", batch=25, queue_max=1000, retry_max=0.2,
                       timeout=2.0, spool=tmp_path / "spool.jsonl", headers={"Authorization": "Bearer t0k"})
    records = CallRecords([file_sink, hook])
    await records.start()
    for i in range(300):
        records(_record(i), "bye", T0 + 10)
    await asyncio.sleep(0.5)
    assert hook.errors >= 1 and hook.delivered == 0 and len(hook.queue) == 300
    assert "ConnectionRefusedError" in (hook.last_error or "")
    rx = Receiver(port).start()
    try:
        rx.status = 503
        deadline = time.monotonic() + 10
        while rx.posts < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert rx.posts >= 3 and not rx.acked
        rx.status = 200
        assert await rx.until_acked(300) == 300
        await asyncio.sleep(0.2)
    finally:
        await records.close(1.0)
        rx.stop()
    ids = emitted_ids(tmp_path / "calls.jsonl")
    assert len(ids) == 300
    assert set(rx.acked) == set(ids) and max(rx.acked.values()) == 1
    assert [r["record_id"] for r in rx.records] == ids  # in order
    info = hook.info()
    assert (info["delivered"], info["dropped"], info["queued"], info["up"]) == (300, 0, 0, True)
    assert info["batches"] >= 300 // 25
    assert rx.paths[0] == "/cdr?src=test" and rx.headers[0]["Authorization"] == "Bearer t0k"
    assert not (tmp_path / "spool.jsonl").exists()


async def test_webhook_queue_bound_drops_newest_and_counts(tmp_path: Path) -> None:
    """While the webhook is down, past queue_max records are dropped (counted, logged once);
    everything kept arrives once the webhook is back."""
    port = free_port()
    file_sink = JsonLinesSink(tmp_path / "calls.jsonl")
    hook = WebhookSink(f"http://127.0.0.1:{port}/", batch=30, queue_max=100, retry_max=0.2, timeout=2.0)
    records = CallRecords([file_sink, hook])
    with capture_logs() as logs:
        await records.start()
        for i in range(150):
            records(_record(i), "bye", T0 + 10)
    assert hook.info()["dropped"] == 50
    assert [e["event"] for e in logs].count("records_dropped") == 1
    rx = Receiver(port).start()
    try:
        assert await rx.until_acked(100) == 100
    finally:
        await records.close(1.0)
        rx.stop()
    assert set(rx.acked) == set(emitted_ids(tmp_path / "calls.jsonl")[:100])
    assert max(rx.acked.values()) == 1


async def test_webhook_refusal_goes_to_dead_letter_not_retried(tmp_path: Path) -> None:
    """A 400 will never be accepted: those records go to SPOOL.rejected instead of blocking the queue."""
    rx = Receiver().start()
    rx.status = 400
    hook = WebhookSink(rx.url, batch=10, queue_max=100, retry_max=0.2, timeout=2.0, spool=tmp_path / "spool")
    records = CallRecords([hook])
    try:
        await records.start()
        for i in range(20):
            records(_record(i), "bye", T0 + 10)
        deadline = time.monotonic() + 10
        while hook.queue and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await records.close(1.0)
        rx.stop()
    assert rx.posts == 2 and hook.info()["rejected"] == 20
    dead = (tmp_path / "spool.rejected").read_bytes().splitlines()
    assert sorted(orjson.loads(x)["call_id"] for x in dead) == sorted(f"call-{i}" for i in range(20))
    assert (tmp_path / "spool.rejected").stat().st_mode & 0o777 == 0o600


async def test_webhook_close_spools_and_next_start_resends(tmp_path: Path) -> None:
    """Records still queued at close go to the spool (0600); the next sink sends them first, then drops
    the spool file."""
    port = free_port()
    spool = tmp_path / "spool.jsonl"
    hook = WebhookSink(f"http://127.0.0.1:{port}/", batch=7, retry_max=0.2, timeout=1.0, spool=spool)
    records = CallRecords([hook])
    await records.start()
    for i in range(20):
        records(_record(i), "bye", T0 + 10)
    await records.close(0.3)
    assert spool.stat().st_mode & 0o777 == 0o600
    kept = [orjson.loads(x) for x in spool.read_bytes().splitlines()]
    assert [r["call_id"] for r in kept] == [f"call-{i}" for i in range(20)]
    assert hook.info()["spooled"] == 20
    rx = Receiver(port).start()
    hook2 = WebhookSink(f"http://127.0.0.1:{port}/", batch=7, retry_max=0.2, timeout=1.0, spool=spool)
    records2 = CallRecords([hook2])
    try:
        await records2.start()
        assert hook2.info()["resent"] == 20
        records2(_record(99), "bye", T0 + 10)
        assert await rx.until_acked(21) == 21
        await asyncio.sleep(0.1)
    finally:
        await records2.close(1.0)
        rx.stop()
    assert set(rx.acked) == {r["record_id"] for r in kept} | {rx.records[-1]["record_id"]}
    assert max(rx.acked.values()) == 1
    assert rx.records[-1]["call_id"] == "call-99"
    assert not spool.exists()


async def test_stuck_webhook_never_stalls_the_loop(tmp_path: Path) -> None:
    """A webhook that takes the POST and never answers: the sink times out and retries; the loop's
    own timers stay on time meanwhile."""
    rx = Receiver().start()
    rx.hang = True
    hook = WebhookSink(rx.url, batch=50, retry_max=0.2, timeout=1.0)
    records = CallRecords([hook])
    await records.start()
    late = 0.0
    try:
        for i in range(200):
            records(_record(i), "bye", T0 + 10)
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            late = max(late, time.perf_counter() - t - 0.005)
        deadline = time.monotonic() + 10
        while hook.errors < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await records.close(0.1)
        rx.stop()
    assert hook.errors >= 2 and "TimeoutError" in (hook.last_error or "")
    assert late < 0.5, late  # a POST blocking the loop would show its 1 s timeout


# -- the real process ----------------------------------------------------------------------


def _config(tmp: Path, url: str, stop_timeout: float = 0.5, timeout: float = 1.0) -> Path:
    cfg = tmp / "service.toml"
    cfg.write_text(f"""
[metrics]
listen = false
[records]
file = "records/calls.jsonl"
webhook = "{url}"
retry_max = 0.2
timeout = {timeout}
spool = "run/spool.jsonl"
stop_timeout = {stop_timeout}
""")
    load_settings(cfg)  # the file is valid
    return cfg


def _pairs(c: LineClient, start: int, n: int) -> None:
    for i in range(start, start + n):
        r = c.call("check", call_id=f"p{i}", account=f"acct{i}", **{"from": f"sip:u{i}@x", "to": "sip:6002@x"})
        assert r["decision"] == "allow", r
        assert c.call("end", call_id=f"p{i}", token=r["token"])["released"]


def test_sigterm_spools_queued_records_and_restart_sends_them(tmp_path: Path) -> None:
    """The webhook is down; SIGTERM spools the queue; the next start sends it once the webhook is up:
    every record arrives, once."""
    port = free_port()
    cfg = _config(tmp_path, f"http://127.0.0.1:{port}/cdr")
    svc = ServiceProcess(workdir=tmp_path, config=cfg).start()
    c = svc.client()
    _pairs(c, 0, 40)
    c.close()
    assert svc.stop(signal.SIGTERM) == 0
    spool = tmp_path / "run" / "spool.jsonl"
    spooled = [orjson.loads(x)["record_id"] for x in spool.read_bytes().splitlines()]
    assert len(spooled) == 40
    assert any(e["event"] == "records_spooled" and e["records"] == 40 for e in svc.log_events())
    rx = Receiver(port).start()
    try:
        svc2 = ServiceProcess(workdir=tmp_path, config=cfg, port=svc.port).start()
        try:
            c = svc2.client()
            _pairs(c, 40, 10)
            c.close()
            assert rx.wait_acked(50) == 50
            deadline = time.monotonic() + 5
            while spool.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not spool.exists()
        finally:
            assert svc2.stop(signal.SIGTERM) == 0
    finally:
        rx.stop()
    file_ids = [orjson.loads(x)["record_id"] for x in (tmp_path / "records" / "calls.jsonl").read_bytes().splitlines()]
    assert len(file_ids) == 50 and set(spooled) <= set(file_ids)
    assert set(rx.acked) == set(file_ids) and max(rx.acked.values()) == 1


def test_dead_webhook_does_not_slow_decisions(tmp_path: Path) -> None:
    """A webhook that accepts and never answers: checks still answer at their usual speed."""
    rx = Receiver().start()
    rx.hang = True
    cfg = _config(tmp_path, rx.url, stop_timeout=0.2, timeout=3.0)
    try:
        with ServiceProcess(workdir=tmp_path, config=cfg) as svc:
            c = svc.client()
            _pairs(c, 0, 50)  # records pile up behind the stuck POST
            worst = 0.0
            for i in range(50, 250):
                t = time.perf_counter()
                _pairs(c, i, 1)
                worst = max(worst, time.perf_counter() - t)
            c.close()
            stats = LineClient(port=svc.port).call("stats")
        assert rx.posts >= 1
        assert stats["records"]["sinks"]["webhook"]["queued"] > 0
        assert stats["records"]["emitted"] == 250
        assert worst < 1.0, worst  # the POST timeout is 3 s: a loop blocked by it would show it
    finally:
        rx.stop()


def test_records_settings_are_checked(tmp_path: Path) -> None:
    """Bad [records] values are refused naming the key."""
    from policy.errors import SettingsError

    for body, key in (('webhook = "ftp://x"', "records.webhook"), ("batch = 0", "records.batch"),
                      ("queue_max = 5\nbatch = 10", "records.queue_max"), ("rotate_bytes = -1", "records.rotate_bytes"),
                      ('headers = { "X-A" = "b\\nc" }', "records.headers.X-A")):
        cfg = tmp_path / "s.toml"
        cfg.write_text(f"[records]\n{body}\n")
        with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
            load_settings(cfg)
