"""The embedded store's journal and snapshots, on real files: replay, torn tails, compaction, locks, modes.

A "crash" here copies the state files as they are at that instant (everything the store has
written to the kernel, which is what a SIGKILL leaves) and starts a new store on the copy;
tests/test_process.py SIGKILLs a real `callpolicy serve`.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from policy.errors import SnapshotError
from policy.store import journal, snapshot
from policy.store.base import CallInfo, CallRecord, PlanEntry, call_uid
from policy.store.embedded import EmbeddedStore, StateInUseError

T0 = 1_800_000_000.0
TOTAL = PlanEntry("total", None, None, False, "count-all")


def acct(value: str, limit: int | None = None) -> PlanEntry:
    """An account plan entry."""
    return PlanEntry("account", value, limit, False, "account-cap")


def call(cid: str, tag: str = "", account: str = "acme", node: str = "",
         vars_: dict[str, str] | None = None) -> CallInfo:
    """A call with recognisable from/to."""
    return CallInfo(cid, f"sip:{cid}@example.com", "sip:100@example.com", account, tag, node, vars_)


class Clock:
    """A settable clock for the store's own reads (start-up drops)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(path: Path, clock: Clock | None = None, **kw: Any) -> EmbeddedStore:
    """A journaled store whose periodic loops stay out of the way unless asked for."""
    kw.setdefault("snapshot_interval", 0)
    kw.setdefault("fsync_interval", 3600)
    return EmbeddedStore(snapshot_path=path, clock=clock or Clock(), **kw)


def crash_copy(store: EmbeddedStore, src: Path, dst_dir: Path) -> Path:
    """The state files as a SIGKILL would leave them now (written lines, no final snapshot)."""
    assert store.flush_journal()
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        if f.name.startswith(src.name) and not f.name.endswith(".lock"):
            shutil.copy2(f, dst_dir / f.name)
    return dst_dir / src.name


def state_of(store: EmbeddedStore) -> dict[str, tuple[Any, ...]]:
    """Everything a record holds, by uid, for comparisons."""
    return {uid: (r.state, r.token, r.start_ts, r.timeout, r.expires, tuple(r.profiles), dict(r.vars), r.node,
                  r.account, r.from_uri, r.to_uri, r.init_ts)
            for uid, r in store._calls.items()}


def segments(path: Path) -> list[int]:
    """The journal segment numbers on disk."""
    return [seq for seq, _ in journal.list_segments(path)]


async def test_replay_reserve_answer_end_then_a_new_admission(tmp_path: Path) -> None:
    """reserve -> answer -> end -> a new reserve of the same identity: the new admission, early, wins."""
    path = tmp_path / "a" / "snap.json"
    s = make(path)
    await s.start()
    uid = call_uid("x", "t")
    plan = [TOTAL, acct("acme", 5)]
    assert (await s.reserve(call("x", "t"), plan, T0, 300, "k1")).admitted
    assert await s.answer(uid, T0 + 1, 3600, "k1") is not None
    assert await s.end(uid, T0 + 2, "bye", "k1") is not None
    assert (await s.reserve(call("x", "t", vars_={"a": "1"}), plan, T0 + 3, 300, "k2")).admitted
    await s.set_var(uid, "b", "2", T0 + 4)
    assert (await s.reserve(call("y"), plan, T0, 300, "ky")).admitted
    assert (await s.reserve(call("y"), plan, T0 + 5, 300, "ky2")).duplicate  # token takeover
    await s.refresh("y", T0 + 6, 900, "ky2")
    await s.end("y", T0 + 7, "bye", "ky")  # stale token: nothing happens, nothing journaled
    assert (await s.reserve(call("z"), plan, T0, 300, "kz")).admitted
    await s.end("z", T0 + 8, "cancel")
    copy = crash_copy(s, path, tmp_path / "b")
    await s.close()

    r = make(copy, Clock(T0 + 10))
    await r.start()
    x = await r.get_call(uid, T0 + 10)
    assert x is not None and (x.state, x.token, x.start_ts, x.expires) == ("early", "k2", None, T0 + 303)
    assert x.vars == {"a": "1", "b": "2"}
    y = await r.get_call("y", T0 + 10)
    assert y is not None and (y.token, y.timeout, y.expires) == ("ky2", 900, T0 + 906)
    assert await r.get_call("z", T0 + 10) is None
    assert await r.profile_size("account", "acme", T0 + 10) == 2
    st = await r.stats(T0 + 10)
    assert (st.processed_dialogs, st.failed_dialogs, st.early_dialogs, st.active_dialogs) == (4, 1, 2, 0)
    await r.close()


def test_a_reserve_line_is_the_records_row(tmp_path: Path) -> None:
    """The journal writes a reserve as ["r", *record_to_row(rec)] (spelled out field by field on
    the hot path: this keeps the two in step)."""
    j = journal.Journal(tmp_path / "snap.json", 1)
    j.open()
    rec = CallRecord("c1", "sip:a@x", "sip:b@y", "acme", "early", T0, None, 300.0, T0 + 300, [("total", None)],
                     "ft", "node1", "tok", {"k": "v"})
    j.reserve(rec)
    j.close()
    assert orjson.loads(journal.segment_path(tmp_path / "snap.json", 1).read_bytes()) == \
        orjson.loads(orjson.dumps(["r", *snapshot.record_to_row(rec)]))


def test_apply_order_matters() -> None:
    """The fold itself: an end before the answer leaves nothing; an answer after a re-reserve applies."""
    rec = CallRecord("c", "f", "t", "acme", "early", T0, None, 300, T0 + 300, [("total", None)], "", "", "k1", {})
    row = list(snapshot.record_to_row(rec))
    st = snapshot.State()
    for op in (["r", *row], ["e", "c", "bye"], ["a", "c", T0 + 1, 60, T0 + 61]):
        journal.apply(st, orjson.loads(orjson.dumps(op)))
    assert st.calls == {} and st.processed == 1
    for op in (["r", *row], ["r", *row[:11], "k2", *row[12:]], ["a", "c", T0 + 1, 60, T0 + 61]):
        journal.apply(st, orjson.loads(orjson.dumps(op)))
    assert st.calls["c"][snapshot.R_TOKEN] == "k2" and st.calls["c"][snapshot.R_STATE] == "active"
    assert st.processed == 3 and st.expired == 1  # the replaced lease had ended unjournaled
    with pytest.raises(ValueError):
        journal.apply(st, ["q", "c"])


async def test_torn_tail_and_bad_lines_are_survived(tmp_path: Path) -> None:
    """A write cut by a crash (torn last line) and a garbled line are logged; every other line applies."""
    path = tmp_path / "a" / "snap.json"
    s = make(path)
    await s.start()
    for cid in ("a", "b", "c"):
        await s.reserve(call(cid), [TOTAL], T0, 300, "k")
    copy = crash_copy(s, path, tmp_path / "b")
    await s.close()
    [(seq, seg)] = journal.list_segments(copy)
    with open(seg, "ab") as fh:
        fh.write(b'["e","a","bye"]\n{not json}\n["e","b","bye"]\n["e","c","by')  # torn: no newline
    with capture_logs() as logs:
        r = make(copy, Clock(T0 + 1))
        await r.start()
    assert sorted(r._calls) == ["c"]  # a and b ended; c's end was torn, so c is still held
    torn = [e for e in logs if e["event"] == "journal_tail_torn"]
    assert torn and torn[0]["bytes"] == len(b'["e","c","by') and torn[0]["path"] == str(seg)
    bad = [e for e in logs if e["event"] == "journal_lines_skipped"]
    assert bad and bad[0]["count"] == 1 and "line 5" in bad[0]["first"]
    # the restart wrote a snapshot and dropped the replayed segment; new lines go to a new segment
    assert segments(copy) == [seq + 1]
    await r.end("c", T0 + 2, "bye")
    await r.close()
    r2 = make(copy, Clock(T0 + 3))
    await r2.start()
    assert r2._calls == {}
    await r2.close()


async def test_version_1_snapshot_is_read(tmp_path: Path) -> None:
    """A snapshot of the previous release (version 1, records as objects) restores, then is rewritten as v2."""
    path = tmp_path / "snap.json"
    recs = [CallRecord(f"c{i}", "sip:a@x", "sip:b@x", "acme", "active" if i == 0 else "early", T0,
                       T0 if i == 0 else None, 300, T0 + 300, [("account", "acme"), ("total", None)])
            for i in range(3)]
    recs[2].expires = T0 - 1  # ended while the service was down
    path.write_bytes(orjson.dumps({"version": 1, "stats": {"processed_dialogs": 7, "expired_dialogs": 1,
                                                           "failed_dialogs": 2},
                                   "calls": [r.to_json() for r in recs]}))
    s = make(path, Clock(T0 + 1))
    await s.start()
    assert sorted(s._calls) == ["c0", "c1"] and s._calls["c0"].state == "active"
    st = await s.stats(T0 + 1)
    assert (st.processed_dialogs, st.expired_dialogs, st.failed_dialogs) == (7, 2, 2)
    assert orjson.loads(path.read_bytes())["version"] == snapshot.SNAPSHOT_VERSION
    await s.close()


async def test_corrupt_snapshot_is_set_aside_and_the_journal_still_replays(tmp_path: Path) -> None:
    """A corrupt snapshot is moved aside; the segments on disk are still replayed (best effort)."""
    path = tmp_path / "a" / "snap.json"
    s = make(path)
    await s.start()
    await s.reserve(call("a"), [TOTAL], T0, 300, "k")
    copy = crash_copy(s, path, tmp_path / "b")
    await s.close()
    copy.write_bytes(b'{"version": 2, "calls": [')
    with capture_logs() as logs:
        r = make(copy, Clock(T0 + 1))
        await r.start()
    assert [e for e in logs if e["event"] == "snapshot_unreadable"]
    assert list(copy.parent.glob("snap.json.corrupt-*"))
    assert sorted(r._calls) == ["a"]
    await r.close()


async def test_replay_matches_memory_under_random_operations(tmp_path: Path) -> None:
    """Whatever happens (expiries, re-admissions, takeovers, compactions), a crash copy restores memory exactly."""
    rng = random.Random(7)
    path = tmp_path / "live" / "snap.json"
    clock = Clock()
    s = make(path, clock)
    await s.start()
    uids = [(f"c{i}", f"t{i % 3}") for i in range(60)]
    tokens: dict[str, str] = {}
    now = T0
    for step in range(3000):
        now += rng.random() * 2
        cid, tag = rng.choice(uids)
        uid = call_uid(cid, tag)
        op = rng.random()
        if op < 0.35:
            tok = f"k{step}"
            r = await s.reserve(call(cid, tag, account=rng.choice(["a", "b"]), vars_={"s": str(step)}),
                                [TOTAL, acct("a", 30)], now, rng.choice([20, 60, 300]), tok,
                                force=rng.random() < 0.1)
            if r.admitted:
                tokens[uid] = tok
        elif op < 0.55:
            await s.answer(uid, now, rng.choice([30, 120]), tokens.get(uid) if rng.random() < 0.9 else "old")
        elif op < 0.65:
            await s.refresh(uid, now, rng.choice([30, 120]), tokens.get(uid))
        elif op < 0.85:
            await s.end(uid, now, rng.choice(["bye", "cancel", "failed", "timeout", "admin"]), tokens.get(uid))
        elif op < 0.95:
            await s.set_var(uid, rng.choice(["x", "y"]), rng.choice([None, str(step)]), now)
        else:
            await s.sweep(now)
        if step % 700 == 350:
            assert await s.compact()
        if step % 500 == 499:
            clock.now = now
            copy = crash_copy(s, path, tmp_path / f"crash{step}")
            r = make(copy, Clock(now))
            await r.start()
            await s.sweep(now)  # drop what ended by now, as the restart does
            assert state_of(r) == state_of(s)
            live, back = await s.stats(now), await r.stats(now)
            assert back == live
            await r.close()
    await s.close()


async def test_compaction_folds_segments_and_leaves_the_current_one(tmp_path: Path) -> None:
    """A compaction writes the snapshot in a child process and deletes only the segments it folded."""
    path = tmp_path / "snap.json"
    s = make(path)
    await s.start()
    await s.reserve(call("a"), [TOTAL], T0, 300, "k")
    assert segments(path) == [1]
    assert await s.compact()
    assert segments(path) == [2]
    doc = orjson.loads(path.read_bytes())
    assert doc["journal_through"] == 1 and [c[0] for c in doc["calls"]] == ["a"]
    info = s.info()
    assert info["compactions"] == 1 and info["last_snapshot_calls"] == 1 and info["last_compaction_s"] > 0
    assert info["journal_segment"] == 2 and info["journal_segments"] == 1
    await s.reserve(call("b"), [TOTAL], T0, 300, "k")
    s.flush_journal()
    assert s.info()["journal_bytes"] > 0
    await s.close()
    assert segments(path) == []
    assert [c[0] for c in orjson.loads(path.read_bytes())["calls"]] == ["a", "b"]


async def test_failed_compaction_keeps_the_segments_and_the_next_one_folds_them(tmp_path: Path) -> None:
    """A compaction that cannot write (here: a directory sits where the temp file goes) loses nothing."""
    path = tmp_path / "snap.json"
    s = make(path)
    await s.start()
    await s.reserve(call("a"), [TOTAL], T0, 300, "k")
    snapshot.tmp_path(path).mkdir()
    with capture_logs() as logs:
        assert not await s.compact()
    [err] = [e for e in logs if e["event"] == "snapshot_write_failed"]
    assert err["path"] == str(path) and err["final"] is False
    assert s.info()["snapshot_failures"] == 1 and s.info()["journal_segments"] == 2
    await s.reserve(call("b"), [TOTAL], T0, 300, "k")
    snapshot.tmp_path(path).rmdir()
    assert await s.compact()
    assert segments(path) == [3]
    assert [c[0] for c in orjson.loads(path.read_bytes())["calls"]] == ["a", "b"]
    await s.close()


async def test_state_files_are_0600(tmp_path: Path) -> None:
    """Snapshot, journal segments and the lock file are created 0600, whatever the umask."""
    path = tmp_path / "snap.json"
    old = os.umask(0)
    try:
        s = make(path)
        await s.start()
        await s.reserve(call("a"), [TOTAL], T0, 300, "k")
        assert await s.compact()
        files = sorted(tmp_path.iterdir())
        await s.close()
    finally:
        os.umask(old)
    names = {f.name for f in files}
    assert {"snap.json", "snap.json.lock", "snap.json.journal.00000002"} <= names
    for f in [*files, path]:
        if f.exists():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


async def test_one_store_per_state(tmp_path: Path) -> None:
    """A second store on the same snapshot is refused, naming the path; after the first closes it may start."""
    path = tmp_path / "snap.json"
    a = make(path)
    await a.start()
    b = make(path)
    with pytest.raises(StateInUseError) as err:
        await b.start()
    assert str(path) in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    assert isinstance(err.value, OSError)
    await a.close()
    await b.start()
    await b.close()


async def test_start_removes_a_leftover_temp_file(tmp_path: Path) -> None:
    """A `.tmp` left by a crash mid-write is removed at the next start."""
    path = tmp_path / "snap.json"
    snapshot.tmp_path(path).write_bytes(b"half a snapshot")
    s = make(path)
    await s.start()
    assert not snapshot.tmp_path(path).exists()
    await s.close()


async def test_background_loop_failure_is_logged_and_restarted(tmp_path: Path) -> None:
    """A compactor that raises is logged with its traceback, restarted with backoff and counted."""
    path = tmp_path / "snap.json"
    s = make(path, snapshot_interval=0.02)
    failures = 0
    real = s.compact

    async def flaky() -> bool:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("injected compactor fault")
        return await real()

    s.compact = flaky  # type: ignore[method-assign]
    with capture_logs() as logs:
        await s.start()
        await s.reserve(call("a"), [TOTAL], T0, 300, "k")
        for _ in range(300):
            await asyncio.sleep(0.02)
            if s.info()["compactions"]:
                break
    assert s.info()["task_restarts"]["compactor"] == 2
    assert s.info()["compactions"] >= 1
    failed = [e for e in logs if e["event"] == "background_task_failed"]
    assert len(failed) == 2 and failed[0]["task"] == "compactor" and failed[0]["exc_info"] is True
    assert failed[1]["retry_in_s"] == 2 * failed[0]["retry_in_s"]
    await s.close()


async def test_fsync_loop_makes_the_journal_durable(tmp_path: Path) -> None:
    """The fsync thread runs every fsync_interval; info() reports the lag and the fsyncs."""
    path = tmp_path / "snap.json"
    s = make(path, fsync_interval=0.02)
    await s.start()
    await s.reserve(call("a"), [TOTAL], T0, 300, "k")
    await asyncio.sleep(0)
    assert s.info()["journal_written_bytes"] > 0
    for _ in range(200):
        await asyncio.sleep(0.02)
        if s.info()["journal_fsyncs"] and s.info()["journal_fsync_lag_s"] == 0:
            break
    info = s.info()
    assert info["journal_fsyncs"] >= 1 and info["journal_fsync_lag_s"] == 0.0
    await s.close()


async def test_without_a_snapshot_path_nothing_touches_the_disk(tmp_path: Path) -> None:
    """No snapshot path: no lock, no journal, no files (tests and dry setups)."""
    s = EmbeddedStore()
    await s.start()
    await s.reserve(call("a"), [TOTAL], T0, 300, "k")
    assert s.info() == {"calls": 1, "rate_buckets": 0, "task_restarts": {}}
    await s.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 64 KiB tmpfs (root only): a real full disk, real ENOSPC."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = os.system(f"mount -t tmpfs -o size=64k,mode=0700 tmpfs {mnt} 2>/dev/null")
    if r != 0:
        pytest.skip("cannot mount a tmpfs (needs root): the full-disk tests need a real small disk")
    try:
        yield mnt
    finally:
        os.system(f"umount {mnt}")


def fill(directory: Path) -> Path:
    """Fill the file system holding `directory` until ENOSPC; the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


async def test_full_disk_final_snapshot_keeps_the_journal(small_disk: Path) -> None:
    """A final snapshot that meets ENOSPC raises SnapshotError, leaves no .tmp, and the journal restores everything."""
    path = small_disk / "snap.json"
    s = make(path)
    await s.start()
    for cid in ("a", "b", "c"):
        await s.reserve(call(cid), [TOTAL], T0, 300, "k")
    await s.answer("a", T0 + 1, 3600)
    await s.end("b", T0 + 2, "bye")
    assert s.flush_journal()
    filler = fill(small_disk)
    with capture_logs() as logs, pytest.raises(SnapshotError) as err:
        await s.close()
    assert str(path) in str(err.value) and "No space left" in str(err.value) and "nothing is lost" in str(err.value)
    [e] = [x for x in logs if x["event"] == "snapshot_write_failed"]
    assert e["final"] is True and e["path"] == str(path) and e["journal_kept"]
    assert not snapshot.tmp_path(path).exists()
    filler.unlink()
    r = make(path, Clock(T0 + 3))
    await r.start()
    assert sorted(r._calls) == ["a", "c"] and r._calls["a"].state == "active"
    await r.close()


async def test_full_disk_journal_keeps_its_lines_until_it_can_write(small_disk: Path) -> None:
    """While writes fail the lines stay buffered (counted in info), and are written once space returns."""
    path = small_disk / "snap.json"
    s = make(path)
    await s.start()
    filler = fill(small_disk)
    with capture_logs() as logs:
        for i in range(60):  # more than the segment's last page holds
            await s.reserve(call(f"c{i}", vars_={"pad": "x" * 100}), [TOTAL], T0, 300, "k")
        assert not s.flush_journal()
    assert s.info()["journal_unwritten_bytes"] > 0 and s.info()["journal_write_errors"] >= 1
    assert [e for e in logs if e["event"] == "journal_write_failed"]
    filler.unlink()
    assert s.flush_journal() and s.info()["journal_unwritten_bytes"] == 0
    copy_calls = sorted(s._calls)
    s._journal.sync()  # type: ignore[union-attr]
    shutil.copytree(small_disk, small_disk.parent / "copy", ignore=shutil.ignore_patterns("*.lock"))
    await s.close()
    r = make(small_disk.parent / "copy" / "snap.json", Clock(T0 + 1))
    await r.start()
    assert sorted(r._calls) == copy_calls and len(copy_calls) == 60
    await r.close()


async def test_sigterm_saves_what_the_journal_could_not_write(tmp_path: Path) -> None:
    """The journal's device is full (its fd now points at /dev/full) but the snapshot's is not: the final
    snapshot, written from memory, holds every change the journal had to keep buffered."""
    path = tmp_path / "snap.json"
    s = make(path)
    await s.start()
    await s.reserve(call("a"), [TOTAL], T0, 300, "k")
    assert s.flush_journal()
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, s._journal._fd)  # type: ignore[union-attr]
    os.close(full)
    with capture_logs() as logs:
        await s.answer("a", T0 + 1, 3600)
        await s.reserve(call("b"), [TOTAL], T0 + 1, 300, "k")
        assert not s.flush_journal()
    [e] = [x for x in logs if x["event"] == "journal_write_failed"]
    assert "No space left" in e["error"] and e["unwritten_bytes"] > 0
    assert s.info()["journal_unwritten_bytes"] > 0
    await s.close()
    r = make(path, Clock(T0 + 2))
    await r.start()
    assert sorted(r._calls) == ["a", "b"] and r._calls["a"].state == "active"
    await r.close()


async def test_close_waits_for_a_running_compaction(tmp_path: Path) -> None:
    """SIGTERM during a compaction: the child finishes first, then the final snapshot; no .tmp, nothing lost."""
    path = tmp_path / "snap.json"
    s = make(path)
    await s.start()
    for i in range(2000):
        await s.reserve(call(f"c{i}"), [TOTAL], T0, 300, "k")
    task = asyncio.create_task(s.compact())
    for _ in range(500):
        await asyncio.sleep(0.002)
        if s._child is not None:
            break
    child = s._child
    assert child is not None and child.poll() is None  # the child is running
    await s.reserve(call("late"), [TOTAL], T0, 300, "k")
    task.cancel()  # as Server.stop cancels the store's tasks
    await s.close()
    assert child.returncode == 0  # it finished (and was reaped) before close() wrote the final snapshot
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not snapshot.tmp_path(path).exists() and segments(path) == []
    assert len(orjson.loads(path.read_bytes())["calls"]) == 2001


def test_fsync_interval_setting(tmp_path: Path) -> None:
    """`[store] fsync_interval` reaches the store; 0 or less is refused naming the key."""
    from policy.clock import SystemClock
    from policy.errors import SettingsError
    from policy.settings import load_settings
    from policy.store.factory import make_store

    cfg = tmp_path / "service.toml"
    cfg.write_text("[store]\nfsync_interval = 0.25\nsnapshot = \"snap.json\"\n")
    store = make_store(load_settings(cfg), SystemClock())
    assert isinstance(store, EmbeddedStore) and store._fsync_interval == 0.25
    assert store._snapshot_path == tmp_path / "snap.json"
    cfg.write_text("[store]\nfsync_interval = 0\n")
    with pytest.raises(SettingsError, match="fsync_interval"):
        load_settings(cfg)
