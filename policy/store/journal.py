"""The embedded store's append-only journal: one compact JSON line per state change.

Lines (JSON arrays, one per line; `row` is a whole call, see `snapshot.ROW_FIELDS`):

    ["r", *row]                          reserve: a new admission (replaces an ended lease of the uid)
    ["t", uid, token]                    a repeated check took the admission over
    ["a", uid, start_ts, timeout, expires]   answer (state becomes active)
    ["f", uid, timeout, expires]         refresh
    ["e", uid, reason]                   end
    ["v", uid, name, value|null]         set_var
    ["x", uid]                           dropped as expired at a start (only when that start
                                         could not write its snapshot)

Lease expiries are not journaled: a replayed lease that has ended is dropped at the start
that replays it, and counted as expired then.

Writing: the event loop appends lines to a buffer and writes the buffer with one `write()`
per loop iteration (or sooner when it passes `flush_bytes`). What reached the kernel survives
a SIGKILL of the service. A thread `fsync`s the segment every `fsync_interval` seconds, so
a power loss or kernel crash loses at most that interval. The journal is split into
segments (`S.journal.N`); `rotate` closes the current one (O(1): an `open`), so compaction
(`snapshot.compact`) can fold closed segments into the snapshot while the loop writes on.

Replay tolerates a torn last line (a write cut by a crash) and skips malformed lines,
reporting both.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from policy.store.base import FAILED_REASONS, CallRecord
from policy.store.snapshot import (
    FILE_MODE,
    R_EXPIRES,
    R_START,
    R_STATE,
    R_TIMEOUT,
    R_TOKEN,
    R_VARS,
    ROW_FIELDS,
    State,
    fsync_dir,
    row_uid,
)

_dumps = orjson.dumps
_NL = orjson.OPT_APPEND_NEWLINE


def segment_path(snapshot: Path, seq: int) -> Path:
    """The path of journal segment `seq` of the snapshot at `snapshot`."""
    return snapshot.with_name(f"{snapshot.name}.journal.{seq:08d}")


def list_segments(snapshot: Path) -> list[tuple[int, Path]]:
    """The journal segments next to `snapshot`, oldest first."""
    prefix = f"{snapshot.name}.journal."
    out = []
    try:
        names = os.listdir(snapshot.parent)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            out.append((int(name[len(prefix):]), snapshot.parent / name))
    out.sort()
    return out


# -- replay --------------------------------------------------------------------------------

def apply(state: State, op: list[Any]) -> None:
    """Apply one journal line to `state` (ValueError/TypeError/IndexError/KeyError if malformed).

    An operation on a call the state does not hold is ignored (its reserve was in a
    snapshot that was set aside as corrupt).
    """
    kind = op[0]
    calls = state.calls
    if kind == "r":
        new = op[1:]
        if len(new) != len(ROW_FIELDS) or not isinstance(new[12], list):
            raise ValueError("reserve with a malformed call")
        uid = row_uid(new)
        if calls.pop(uid, None) is not None:
            state.expired += 1  # a lease of this identity ended unjournaled before the new admission
        calls[uid] = new
        state.processed += 1
        return
    row = calls.get(op[1])
    if kind == "e":
        reason = op[2]
        if not isinstance(reason, str):
            raise ValueError("end without a reason")
        if row is not None:
            del calls[op[1]]
            if reason in FAILED_REASONS:
                state.failed += 1
            elif reason == "timeout":
                state.expired += 1
    elif kind == "a":
        start, timeout, expires = float(op[2]), float(op[3]), float(op[4])
        if row is not None:
            row[R_STATE] = "active"
            row[R_START] = start
            row[R_TIMEOUT] = timeout
            row[R_EXPIRES] = expires
    elif kind == "f":
        timeout, expires = float(op[2]), float(op[3])
        if row is not None:
            row[R_TIMEOUT] = timeout
            row[R_EXPIRES] = expires
    elif kind == "t":
        token = op[2]
        if not isinstance(token, str):
            raise ValueError("token is not a string")
        if row is not None:
            row[R_TOKEN] = token
    elif kind == "v":
        name, value = op[2], op[3]
        if not isinstance(name, str) or not (value is None or isinstance(value, str)):
            raise ValueError("variable name/value are not strings")
        if row is not None:
            if row[R_VARS] is None:
                row[R_VARS] = {}
            if value is None:
                row[R_VARS].pop(name, None)
            else:
                row[R_VARS][name] = value
    elif kind == "x":
        if calls.pop(op[1], None) is not None:
            state.expired += 1
    else:
        raise ValueError(f"unknown journal operation {kind!r}")


@dataclass
class ReplayReport:
    """What replaying one segment found."""

    path: Path
    lines: int = 0  # lines applied
    torn_bytes: int = 0  # an unterminated last line (a write cut by a crash), ignored
    bad_lines: int = 0  # complete lines that were not valid operations, skipped
    first_bad: str = ""  # "line N: error" of the first bad line


def replay(path: Path, state: State) -> ReplayReport:
    """Apply every line of the segment at `path` to `state`, in order."""
    report = ReplayReport(path)
    with open(path, "rb") as fh:
        data = fh.read()
    end = data.rfind(b"\n") + 1
    report.torn_bytes = len(data) - end
    lineno = 0
    for line in data[:end].split(b"\n")[:-1]:
        lineno += 1
        try:
            op = orjson.loads(line)
            if not isinstance(op, list) or not op:
                raise ValueError("not a JSON array")
            apply(state, op)
        except (orjson.JSONDecodeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            report.bad_lines += 1
            if not report.first_bad:
                report.first_bad = f"line {lineno}: {exc!r}"[:300]
            continue
        report.lines += 1
    return report


# -- writing -------------------------------------------------------------------------------

class Journal:
    """The segment being written: a buffer flushed once per loop iteration, fsync'ed by a thread.

    `append` and the operation helpers run on the event loop; `sync` runs in a thread (it
    never blocks the loop, which never waits for it); `rotate` and `flush` run on the loop.
    """

    def __init__(self, snapshot: Path, seq: int, *, flush_bytes: int = 1 << 20,
                 on_write_error: Callable[[OSError, int], None] | None = None,
                 on_write_recovered: Callable[[int], None] | None = None) -> None:
        self.snapshot = snapshot
        self.seq = seq
        self.flush_bytes = flush_bytes
        self.on_write_error = on_write_error
        self.on_write_recovered = on_write_recovered
        self._fd = -1
        self._buf: list[bytes] = []
        self._buffered = 0
        self._scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retired: collections.deque[int] = collections.deque()  # closed segments' fds to fsync+close
        self._dir_dirty = False
        self._lock = threading.Lock()  # held by `sync` while it uses the fds (never taken by the loop)
        # figures
        self.segment_bytes = 0  # bytes written to the current segment
        self.written_bytes = 0  # bytes written since open
        self.synced_bytes = 0  # bytes known durable (fsync'ed)
        self.write_errors = 0
        self.last_write_error = ""
        self.failing = False
        self.fsyncs = 0
        self.last_fsync_s = 0.0
        self._unsynced_since: float | None = None  # monotonic time of the oldest unsynced write

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Create the segment file (0600) and bind to the running loop (if any)."""
        self._fd = self._open_segment(self.seq)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def _open_segment(self, seq: int) -> int:
        fd = os.open(segment_path(self.snapshot, seq),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
        self._dir_dirty = True
        return fd

    def close(self) -> bool:
        """Write what is buffered, fsync and close every segment; True if nothing was left unwritten."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        ok = self.flush()
        self.sync()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        return ok

    @property
    def unwritten_bytes(self) -> int:
        """Bytes appended but not yet written to the kernel (a write is failing, or this tick's)."""
        return self._buffered

    # -- appending (event loop) -----------------------------------------------------------

    def append(self, line: bytes) -> None:
        """Queue one line; it is written at the end of this loop iteration."""
        self._buf.append(line)
        self._buffered += len(line)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._flush_soon()
            else:
                self._loop.call_soon(self._flush_soon)
        elif self._buffered >= self.flush_bytes and not self.failing:
            self.flush()

    def reserve(self, rec: CallRecord) -> None:
        """A new admission (the whole record)."""
        self.append(_dumps(("r", rec.call_id, rec.from_tag, rec.from_uri, rec.to_uri, rec.account, rec.node,
                            rec.state, rec.init_ts, rec.start_ts, rec.timeout, rec.expires, rec.token,
                            rec.profiles, rec.vars), option=_NL))  # record_to_row's order, in one tuple

    def token(self, uid: str, token: str) -> None:
        """A repeated check took the admission over."""
        self.append(_dumps(("t", uid, token), option=_NL))

    def answer(self, uid: str, rec: CallRecord) -> None:
        """The call is answered, with its new lease."""
        self.append(_dumps(("a", uid, rec.start_ts, rec.timeout, rec.expires), option=_NL))

    def refresh(self, uid: str, rec: CallRecord) -> None:
        """The call's lease was extended."""
        self.append(_dumps(("f", uid, rec.timeout, rec.expires), option=_NL))

    def end(self, uid: str, reason: str) -> None:
        """The call was released."""
        self.append(_dumps(("e", uid, reason), option=_NL))

    def set_var(self, uid: str, name: str, value: str | None) -> None:
        """One of the call's variables was set (None: deleted)."""
        self.append(_dumps(("v", uid, name, value), option=_NL))

    def expire(self, uid: str) -> None:
        """The call was dropped as expired (journaled only at a start that wrote no snapshot)."""
        self.append(_dumps(("x", uid), option=_NL))

    def _flush_soon(self) -> None:
        self._scheduled = False
        if not self.failing:  # while writes fail, only the retry timer tries (once a second)
            self.flush()

    def flush(self) -> bool:
        """Write the buffer now (one `write()`); True when nothing is left unwritten."""
        if not self._buf:
            return True
        data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                self._account(n)
                view = view[n:]
        except OSError as exc:
            rest = bytes(view)
            self._buf = [rest]
            self._buffered = len(rest)
            self.write_errors += 1
            self.last_write_error = str(exc)
            if not self.failing:
                self.failing = True
                if self.on_write_error is not None:
                    self.on_write_error(exc, self._buffered)
            if self._loop is not None and self._retry is None:
                self._retry = self._loop.call_later(1.0, self._retry_flush)
            return False
        self._buf = []
        self._buffered = 0
        if self.failing:
            self.failing = False
            if self.on_write_recovered is not None:
                self.on_write_recovered(self.write_errors)
        return True

    def _retry_flush(self) -> None:
        self._retry = None
        self.flush()

    def _account(self, n: int) -> None:
        self.segment_bytes += n
        self.written_bytes += n
        if self._unsynced_since is None and n:
            self._unsynced_since = time.monotonic()

    def rotate(self) -> int | None:
        """Close the current segment and start the next; the closed segment's number.

        None (nothing changed) when the buffer cannot be written or the new file cannot be
        created: a segment is never closed with lines still waiting for it.
        """
        if not self.flush():
            return None
        try:
            fd = self._open_segment(self.seq + 1)
        except OSError as exc:
            self.write_errors += 1
            self.last_write_error = str(exc)
            return None
        self._retired.append(self._fd)
        self._fd = fd
        self.seq += 1
        self.segment_bytes = 0
        return self.seq - 1

    # -- durability (a thread) ------------------------------------------------------------

    def sync(self) -> None:
        """fsync the current segment, fsync and close the closed ones, fsync the directory."""
        with self._lock:
            t0 = time.monotonic()
            written = self.written_bytes
            if self._fd >= 0:
                os.fsync(self._fd)
            while self._retired:
                fd = self._retired.popleft()
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if self._dir_dirty:
                self._dir_dirty = False
                fsync_dir(self.snapshot.parent)
            self.synced_bytes = written
            if self.written_bytes == written:
                self._unsynced_since = None
            else:  # lines written during the fsync: at most this old
                self._unsynced_since = t0
            self.fsyncs += 1
            self.last_fsync_s = time.monotonic() - t0

    @property
    def unsynced(self) -> bool:
        """Whether bytes were written since the last fsync (or a closed segment awaits one)."""
        return self._unsynced_since is not None or bool(self._retired) or self._dir_dirty

    def fsync_lag(self) -> float:
        """Age in seconds of the oldest written byte not yet fsync'ed (0 when all are)."""
        since = self._unsynced_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def info(self) -> dict[str, Any]:
        """Figures for stats and metrics."""
        return {
            "journal_segment": self.seq,
            "journal_segment_bytes": self.segment_bytes,
            "journal_written_bytes": self.written_bytes,
            "journal_unwritten_bytes": self._buffered,
            "journal_write_errors": self.write_errors,
            "journal_last_write_error": self.last_write_error,
            "journal_fsyncs": self.fsyncs,
            "journal_fsync_lag_s": round(self.fsync_lag(), 3),
            "journal_last_fsync_s": round(self.last_fsync_s, 6),
        }
