"""The embedded store's snapshot file, its lock, and the compaction that folds the journal into it.

Files next to the snapshot `S` (all created 0600):

- `S`               the snapshot: held calls and counters, as of the end of journal segment
                    `journal_through` (version 2; version-1 files of earlier releases are read too)
- `S.journal.N`     journal segments (`policy/store/journal.py`), replayed in order after `S`
- `S.lock`          flock'ed by the one process that owns this state, for its whole life
- `S.tmp`           a snapshot being written (fsync, then renamed over `S`); never left behind
                    by a failed write, and removed at start after a crash

Compaction runs in a separate process (`python -m policy.store.snapshot compact S N PID`):
it reads `S`, replays the closed segments up to N onto it, writes the new `S` and deletes
the segments it folded. The service's memory is never read, and the service's event loop
only waits for the child's exit, so a snapshot never stalls the loop, however many calls
are held. This module imports nothing heavy, so the child starts quickly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from policy.errors import SnapshotError
from policy.store.base import CallRecord, call_uid

SNAPSHOT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FILE_MODE = 0o600

#: A call as one JSON array (snapshot v2 and journal `r` lines): the field order below.
ROW_FIELDS = ("call_id", "from_tag", "from", "to", "account", "node", "state", "init_ts", "start_ts",
              "timeout", "expires", "token", "profiles", "vars")
Row = list[Any]
R_CALL_ID, R_FROM_TAG, R_STATE, R_START, R_TIMEOUT, R_EXPIRES, R_TOKEN, R_VARS = 0, 1, 6, 8, 9, 10, 11, 13


def record_to_row(rec: CallRecord) -> tuple[Any, ...]:
    """A record as a row (a tuple: orjson writes it as an array)."""
    return (rec.call_id, rec.from_tag, rec.from_uri, rec.to_uri, rec.account, rec.node, rec.state,
            rec.init_ts, rec.start_ts, rec.timeout, rec.expires, rec.token, rec.profiles, rec.vars)


def row_to_record(row: Row) -> CallRecord:
    """Rebuild a record from a row (raises ValueError if malformed)."""
    try:
        (call_id, from_tag, from_uri, to_uri, account, node, state, init_ts, start_ts, timeout, expires,
         token, profiles, vars_) = row
        if state not in ("early", "active"):
            raise ValueError(f"state {state!r}")
        return CallRecord(
            str(call_id), str(from_uri), str(to_uri), str(account), state, float(init_ts),
            None if start_ts is None else float(start_ts), float(timeout), float(expires),
            [(str(p), None if v is None else str(v)) for p, v in profiles], str(from_tag), str(node),
            str(token), {str(k): str(v) for k, v in (vars_ or {}).items()})
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed call {str(row)[:120]}: {exc}") from None


def row_uid(row: Row) -> str:
    """The identity of the call a row holds."""
    return call_uid(row[R_CALL_ID], row[R_FROM_TAG])


def _v1_row(call: dict[str, Any]) -> Row:
    """A version-1 call (CallRecord.to_json) as a row."""
    rec = CallRecord.from_json(call)
    return list(record_to_row(rec))


@dataclass
class State:
    """Held calls (uid -> row, in admission order) and the dialog counters: what a snapshot holds."""

    calls: dict[str, Row] = field(default_factory=dict)
    processed: int = 0
    expired: int = 0
    failed: int = 0
    through: int = 0  # the last journal segment folded into this state
    version: int = SNAPSHOT_VERSION

    def encode(self) -> bytes:
        """The snapshot file's bytes."""
        return encode(list(self.calls.values()), self.processed, self.expired, self.failed, self.through)


def encode(calls: Sequence[Sequence[Any]], processed: int, expired: int, failed: int, through: int) -> bytes:
    """A version-2 snapshot of these calls (rows) and counters, covering journal segments up to `through`."""
    return orjson.dumps({
        "version": SNAPSHOT_VERSION,
        "written_at": time.time(),
        "journal_through": through,
        "stats": {"processed_dialogs": processed, "expired_dialogs": expired, "failed_dialogs": failed},
        "calls": calls,
    })


def decode(data: bytes) -> State:
    """Parse a snapshot (version 1 or 2); SnapshotError if it is not one."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SnapshotError("snapshot is not a JSON object")
    version = doc.get("version")
    if version not in READABLE_VERSIONS:
        raise SnapshotError(f"unsupported snapshot (version {version!r})")
    try:
        stats = doc["stats"]
        state = State(processed=int(stats["processed_dialogs"]), expired=int(stats["expired_dialogs"]),
                      failed=int(stats["failed_dialogs"]), through=int(doc.get("journal_through", 0)),
                      version=int(version))
        calls = doc["calls"]
        if not isinstance(calls, list):
            raise TypeError("calls is not a list")
        for raw in calls:
            row = _v1_row(raw) if version == 1 else raw
            if not isinstance(row, list) or len(row) != len(ROW_FIELDS):
                raise ValueError(f"malformed call {str(raw)[:120]}")
            state.calls[row_uid(row)] = row
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"malformed snapshot: {exc!r}") from None
    return state


def read(path: Path) -> State:
    """Read the snapshot at `path` (OSError if unreadable, SnapshotError if corrupt)."""
    with open(path, "rb") as fh:
        return decode(fh.read())


def tmp_path(path: Path) -> Path:
    """Where a snapshot is written before it is renamed over `path`."""
    return path.with_name(path.name + ".tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (0600 temp file, fsync, rename, fsync dir).

    On any failure the temp file is removed and the previous `path` stays as it was.
    """
    tmp = tmp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # a leftover temp file may have had another mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateInUseError(OSError):
    """Another running process owns this snapshot and journal."""


class StateLock:
    """An exclusive flock on `S.lock`, held for the life of the process that owns the state."""

    def __init__(self, snapshot: Path) -> None:
        self.path = snapshot.with_name(snapshot.name + ".lock")
        self.snapshot = snapshot
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or raise StateInUseError naming the path (and the holder's pid)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise StateInUseError(
                f"snapshot {self.snapshot} is in use by a running service ({who} holds {self.path}); "
                "one process per snapshot") from None
        except BaseException:
            os.close(fd)
            raise
        os.fchmod(fd, FILE_MODE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let another process take the state (the lock file stays: removing it would race)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd >= 0


def compact(path: Path, through: int) -> dict[str, Any]:
    """Fold the snapshot at `path` and its journal segments up to `through` into a new snapshot.

    The segments folded are deleted once the new snapshot is durable. Returns a summary.
    """
    from policy.store import journal

    t0 = time.perf_counter()
    state = read(path) if path.exists() else State()
    lines = torn = bad = 0
    folded: list[Path] = []
    for seq, seg in journal.list_segments(path):
        if seq <= state.through:
            folded.append(seg)  # a fold whose deletion did not finish
        elif seq <= through:
            report = journal.replay(seg, state)
            lines += report.lines
            torn += report.torn_bytes
            bad += report.bad_lines
            folded.append(seg)
    state.through = max(state.through, through)
    data = state.encode()
    write_atomic(path, data)
    for seg in folded:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(seg)
    if folded:
        fsync_dir(path.parent)
    return {"ok": True, "calls": len(state.calls), "bytes": len(data), "segments": len(folded),
            "lines": lines, "torn_bytes": torn, "bad_lines": bad, "through": state.through,
            "duration_s": round(time.perf_counter() - t0, 6)}


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when the service dies (a SIGKILL'd service leaves no writer)."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(3)


def main(argv: list[str]) -> int:
    """`python -m policy.store.snapshot compact SNAPSHOT THROUGH PARENT_PID`: one JSON line out."""
    if len(argv) != 4 or argv[0] != "compact":
        print("usage: python -m policy.store.snapshot compact SNAPSHOT THROUGH PARENT_PID", file=sys.stderr)
        return 2
    import gc

    gc.disable()  # many short-lived containers: the collector would triple the time
    _die_with_parent(int(argv[3]))
    with contextlib.suppress(OSError):
        os.nice(19)  # background work: the service's own loop comes first on a busy machine
    try:
        summary = compact(Path(argv[1]), int(argv[2]))
    except (OSError, SnapshotError, ValueError) as exc:
        sys.stdout.buffer.write(orjson.dumps({"ok": False, "error": str(exc)}) + b"\n")
        return 1
    sys.stdout.buffer.write(orjson.dumps(summary) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
