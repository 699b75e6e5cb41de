"""Call records: one per ended call, to a JSON-lines file and/or an HTTP webhook.

When a call leaves the store - the proxy's `end`, a lease expiry found by the sweep, an
operator's release, a reconciliation repair - `PolicyService.ended` tells its listeners;
`CallRecords` is one. It turns the store's `CallRecord` into a flat record (see
`build_record` and docs/operations.md), serializes it once, and hands the bytes to each
sink. Handing over is an append to a buffer on the event loop: a slow disk or a slow or
dead webhook never makes a check wait.

Sinks:

- `JsonLinesSink`: appends one JSON object per line to a file created 0600, in one
  `write` per event-loop tick; rotates by size and/or age by renaming the file to
  `NAME.YYYYmmddTHHMMSSZ` and opening a new one. A write that fails (full disk) keeps the
  records buffered and is tried again a second later, up to `queue_max` records.
- `WebhookSink`: POSTs JSON arrays of up to `batch` records to a URL from a task, with
  exponential backoff between failed tries (capped at `retry_max` seconds) and a bounded
  in-memory queue (`queue_max`; past it a record is dropped, counted and logged). A batch
  leaves the queue only once the receiver answered 2xx, so it is never sent again after
  that; a batch refused with a 4xx other than 408/429 will never be accepted, so it goes
  to a dead-letter file (`SPOOL.rejected`) instead of blocking the queue. At shutdown the
  sink delivers what it can within `stop_timeout`, then writes the rest to a spool file
  that the next start loads and sends first. Delivery is at least once: each record has a
  random `record_id` for the receiver to drop a copy it already has (a copy happens only
  when an answer is lost - the process stopped or was killed while a POST was in flight).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
import structlog

from policy.store.base import CallRecord

log = structlog.get_logger("policy.records")

INITIAL_BACKOFF = 0.1
FILE_RETRY = 1.0
MAX_HEAD = 64 * 1024
LOG_EVERY = 10.0  # seconds between two log lines about the same repeated trouble


_minutes: dict[int, str] = {}


def iso(t: float) -> str:
    """Epoch seconds as ISO-8601 UTC with milliseconds (`2024-05-01T12:00:00.123Z`).

    Three per record: the `YYYY-MM-DDTHH:MM:` part is cached per minute (~0.4 us instead of
    ~3 us through datetime).
    """
    ms = round(t * 1000)
    sec, frac = divmod(ms, 1000)
    minute, s = divmod(sec, 60)
    prefix = _minutes.get(minute)
    if prefix is None:
        if len(_minutes) > 4096:
            _minutes.clear()
        prefix = _minutes[minute] = time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minute * 60))
    return f"{prefix}{s:02d}.{frac:03d}Z"


def build_record(rec: CallRecord, reason: str, now: float, type_profile: str = "type") -> dict[str, Any]:
    """The record of a call that ended at `now` for `reason`.

    `ended` is `now`, except for an expiry (`timeout`), where it is when the lease ran out.
    `setup_s` runs from the check to the answer (to the end for a call never answered);
    `duration_s` from the answer to the end (0 if never answered). `type` is the value
    the call held in the `type_profile` profile ("" when it held none).
    """
    created = rec.init_ts
    answered = rec.start_ts
    ended = min(now, rec.expires) if reason == "timeout" else now
    ended = max(ended, created, answered or created)
    setup = (answered if answered is not None else ended) - created
    duration = ended - answered if answered is not None else 0.0
    kind = ""
    for profile, value in rec.profiles:
        if profile == type_profile and value is not None:
            kind = value
            break
    return {
        "record_id": os.urandom(16).hex(),
        "call_id": rec.call_id,
        "from_tag": rec.from_tag,
        "from": rec.from_uri,
        "to": rec.to_uri,
        "account": rec.account,
        "type": kind,
        "node": rec.node,
        "profiles": [{"profile": p, "value": v} for p, v in rec.profiles],
        "created": iso(created),
        "answered": iso(answered) if answered is not None else None,
        "ended": iso(ended),
        "setup_s": round(max(setup, 0.0), 3),
        "duration_s": round(max(duration, 0.0), 3),
        "reason": reason,
        "vars": dict(rec.vars),
    }


class RecordSink(Protocol):
    """Where serialized records go. `put` is called on the loop and must not block."""

    name: str

    def put(self, data: bytes) -> None:
        """Take one record (its JSON bytes)."""

    async def start(self) -> None:
        """Open files, load a spool, start tasks."""

    async def close(self, timeout: float) -> None:
        """Deliver or persist what is held, within about `timeout` seconds."""

    def info(self) -> dict[str, Any]:
        """Counters: `queued` (held now) and monotonic counts."""
        ...


class _Throttle:
    """Log a repeated condition the first time and then at most every LOG_EVERY seconds."""

    def __init__(self) -> None:
        self.last = -LOG_EVERY
        self.suppressed = 0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last >= LOG_EVERY:
            self.last = now
            return True
        self.suppressed += 1
        return False

    def take(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class CallRecords:
    """The `on_call_end` listener: build each record once, hand it to every sink."""

    def __init__(self, sinks: Sequence[RecordSink], type_profile: str = "type") -> None:
        self.sinks = list(sinks)
        self.type_profile = type_profile
        self.emitted = 0

    def __call__(self, rec: CallRecord, reason: str, now: float) -> None:
        data = orjson.dumps(build_record(rec, reason, now, self.type_profile))
        self.emitted += 1
        for sink in self.sinks:
            sink.put(data)

    async def start(self) -> None:
        """Start every sink."""
        for sink in self.sinks:
            await sink.start()

    async def close(self, timeout: float) -> None:
        """Close every sink (in parallel, each within `timeout`)."""
        await asyncio.gather(*(s.close(timeout) for s in self.sinks), return_exceptions=True)

    def info(self) -> dict[str, Any]:
        """What `stats` and /metrics show."""
        return {"emitted": self.emitted, "sinks": {s.name: s.info() for s in self.sinks}}

    @classmethod
    def from_settings(cls, settings: Any, clock: Callable[[], float] = time.time) -> CallRecords | None:
        """The sinks `[records]` asks for; None when it asks for none."""
        s = settings
        sinks: list[RecordSink] = []
        if s.records_file:
            sinks.append(JsonLinesSink(s.path(s.records_file), rotate_bytes=s.records_rotate_bytes,
                                       rotate_seconds=s.records_rotate_seconds, queue_max=s.records_queue_max,
                                       clock=clock))
        if s.records_webhook:
            sinks.append(WebhookSink(s.records_webhook, batch=s.records_batch, queue_max=s.records_queue_max,
                                     retry_max=s.records_retry_max, timeout=s.records_timeout,
                                     spool=s.path(s.records_spool), headers=s.records_headers))
        return cls(sinks, s.records_type_profile) if sinks else None


# -- the file ------------------------------------------------------------------------------


class JsonLinesSink:
    """Records appended to a JSON-lines file, one write per loop tick, rotated by size/age."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str], *, rotate_bytes: int = 0, rotate_seconds: float = 0.0,
                 queue_max: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.queue_max = queue_max
        self.clock = clock
        self.fd = -1
        self.size = 0
        self.opened_at = 0.0
        self.out = bytearray()  # serialized records not yet written (a partial write leaves its tail)
        self.pending = 0  # records in `out`
        self.partial = False  # `out` starts in the middle of a line: no rotation until it is written
        self.scheduled = False
        self.retry: asyncio.TimerHandle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.delivered = 0
        self.dropped = 0
        self.errors = 0
        self.rotations = 0
        self.failing = False
        self._drop_log = _Throttle()
        self._error_log = _Throttle()

    async def start(self) -> None:
        """Open (create 0600) the file; start the age-rotation timer."""
        self.loop = asyncio.get_running_loop()
        self._open()
        if self.rotate_seconds > 0:
            self._arm_timer()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.opened_at = self.clock()

    def _arm_timer(self) -> None:
        assert self.loop is not None
        self.timer = self.loop.call_later(min(self.rotate_seconds, 1.0), self._tick)

    def _tick(self) -> None:
        self.timer = None
        self.check_rotation()
        self._arm_timer()

    def put(self, data: bytes) -> None:
        """Buffer one record; it is written at the end of this loop tick."""
        if self.pending >= self.queue_max:
            self.dropped += 1
            if self._drop_log.due():
                log.error("records_dropped", sink=self.name, path=str(self.path), reason="buffer full",
                          limit=self.queue_max, dropped=self.dropped, errors=self.errors)
            return
        self.out += data
        self.out += b"\n"
        self.pending += 1
        if not self.scheduled and self.retry is None and self.loop is not None:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def check_rotation(self) -> None:
        """Rotate now if the file's first record is older than `rotate_seconds`."""
        if self.rotate_seconds > 0 and self.fd >= 0 and self.size > 0 and not self.partial \
                and self.clock() - self.opened_at >= self.rotate_seconds:
            self.rotate()

    def rotate(self) -> None:
        """Rename the file to NAME.<UTC time> and open a new one."""
        if self.fd < 0:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
        try:
            os.fsync(self.fd)
            os.rename(self.path, target)
        except OSError as exc:
            self.errors += 1
            log.error("records_rotate_failed", path=str(self.path), error=str(exc))
            return
        os.close(self.fd)
        self.fd = -1
        self.rotations += 1
        try:
            self._open()
        except OSError as exc:
            self.errors += 1
            log.error("records_open_failed", path=str(self.path), error=str(exc))
            return
        log.info("records_rotated", path=str(self.path), to=str(target))

    def flush(self) -> None:
        """Write out what is buffered (one write; a failure keeps it for the retry)."""
        self.scheduled = False
        self.retry = None
        if not self.out:
            return
        if self.fd < 0:
            try:
                self._open()
            except OSError as exc:
                self._failed(exc)
                return
        if self.size == 0:
            self.opened_at = self.clock()  # a file's age counts from its first record
        if not self.partial:
            self.check_rotation()
            if self.rotate_bytes > 0 and self.size > 0 and self.size + len(self.out) > self.rotate_bytes:
                self.rotate()
        try:
            while self.out:
                n = os.write(self.fd, self.out)
                del self.out[:n]
                self.size += n
                self.partial = bool(self.out)
        except OSError as exc:
            self._failed(exc)
            return
        self.delivered += self.pending
        self.pending = 0
        if self.failing:
            self.failing = False
            log.info("records_write_recovered", path=str(self.path), errors=self.errors)

    def _failed(self, exc: OSError) -> None:
        self.errors += 1
        self.failing = True
        if self._error_log.due():
            log.error("records_write_failed", path=str(self.path), error=str(exc), held=self.pending,
                      retry_in=FILE_RETRY)
        if self.loop is not None and self.retry is None:
            self.retry = self.loop.call_later(FILE_RETRY, self.flush)

    async def close(self, timeout: float = 0.0) -> None:
        """Write what is buffered, sync and close."""
        for handle in (self.timer, self.retry):
            if handle is not None:
                handle.cancel()
        self.timer = self.retry = None
        self.flush()
        if self.out:
            log.error("records_lost", sink=self.name, path=str(self.path), records=self.pending,
                      reason="could not be written at shutdown")
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def info(self) -> dict[str, Any]:
        """Counters for stats and metrics."""
        return {"queued": self.pending, "delivered": self.delivered, "dropped": self.dropped,
                "errors": self.errors, "rotations": self.rotations}


# -- the webhook ---------------------------------------------------------------------------


class HttpError(Exception):
    """The webhook answered something that is not HTTP."""


class WebhookSink:
    """Records POSTed as JSON arrays in batches, from a bounded queue, with retries and a spool."""

    name = "webhook"

    def __init__(self, url: str, *, batch: int = 100, queue_max: int = 100_000, retry_max: float = 30.0,
                 timeout: float = 5.0, spool: str | os.PathLike[str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"webhook URL must be http:// or https://, not {url!r}")
        self.url = url
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if u.scheme == "https" else None
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host_header = u.netloc.rsplit("@", 1)[-1]
        lines = [f"POST {target} HTTP/1.1", f"Host: {host_header}", "Content-Type: application/json",
                 "User-Agent: callpolicy-records", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self.batch = batch
        self.queue_max = queue_max
        self.retry_max = retry_max
        self.timeout = timeout
        self.spool = Path(spool) if spool is not None else None
        self.queue: collections.deque[bytes] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._spool_left = 0  # records at the head of the queue that came from the spool file
        self.delivered = 0
        self.batches = 0
        self.errors = 0  # failed tries
        self.dropped = 0
        self.rejected = 0
        self.spooled = 0
        self.resent = 0
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self._drop_log = _Throttle()
        self._error_log = _Throttle()

    # -- intake --------------------------------------------------------------------------

    def put(self, data: bytes) -> None:
        """Queue one record (dropped, counted and logged when the queue is full)."""
        if len(self.queue) >= self.queue_max:
            self.dropped += 1
            if self._drop_log.due():
                log.error("records_dropped", sink=self.name, url=self.url, reason="queue full",
                          limit=self.queue_max, dropped=self.dropped, last_error=self.last_error)
            return
        self.queue.append(data)
        if self._wake is not None:
            self._wake.set()

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the spool a previous stop left (sent first), start the sender task."""
        self._wake = asyncio.Event()
        self._load_spool()
        if self.queue:
            self._wake.set()
        self.task = asyncio.create_task(self.run(), name="records webhook")

    def _load_spool(self) -> None:
        if self.spool is None or not self.spool.exists():
            return
        try:
            raw = self.spool.read_bytes()
        except OSError as exc:
            log.error("records_spool_unreadable", path=str(self.spool), error=str(exc))
            return
        n = 0
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                log.error("records_spool_bad_line", path=str(self.spool), line=line[:200].decode("utf-8", "replace"))
                continue
            self.queue.append(bytes(line))
            n += 1
        self._spool_left = n
        self.resent += n
        log.info("records_spool_loaded", path=str(self.spool), records=n)
        if n == 0:
            with contextlib.suppress(OSError):
                self.spool.unlink()

    async def run(self) -> None:
        """Send batches while there are records; back off while the webhook fails."""
        assert self._wake is not None
        backoff = INITIAL_BACKOFF
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            n = min(self.batch, len(self.queue))
            items = [self.queue[i] for i in range(n)]
            body = b"[" + b",".join(items) + b"]"
            status: int | None = None
            try:
                status = await self.post(body)
            except (OSError, TimeoutError, HttpError, ValueError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if status is not None and 200 <= status < 300:
                self._done(n)
                self.delivered += n
                self.batches += 1
                if self.failing_since is not None:
                    log.info("records_webhook_recovered", url=self.url,
                             failed_for=round(time.monotonic() - self.failing_since, 3), errors=self.errors)
                    self.failing_since = None
                backoff = INITIAL_BACKOFF
                continue
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                self._reject(items, status)
                self._done(n)
                continue
            if status is not None:
                self.last_error = f"HTTP {status}"
            self.errors += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            if self._error_log.due():
                log.warning("records_webhook_failed", url=self.url, error=self.last_error, queued=len(self.queue),
                            retry_in=round(backoff, 3), errors=self.errors)
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self.retry_max)

    def _done(self, n: int) -> None:
        """The first `n` queued records are settled: drop them (and the spool, once it is all sent)."""
        for _ in range(n):
            self.queue.popleft()
        if self._spool_left:
            self._spool_left = max(0, self._spool_left - n)
            if self._spool_left == 0 and self.spool is not None:
                with contextlib.suppress(OSError):
                    self.spool.unlink()

    def _reject(self, items: list[bytes], status: int) -> None:
        self.rejected += len(items)
        where = self._dead_letter()
        log.error("records_rejected", url=self.url, status=status, records=len(items),
                  kept_in=str(where) if where else None)
        if where is not None:
            try:
                _append_private(where, b"".join(i + b"\n" for i in items))
            except OSError as exc:
                log.error("records_lost", sink=self.name, records=len(items), error=str(exc),
                          reason="rejected by the webhook and the dead-letter file is not writable")

    def _dead_letter(self) -> Path | None:
        return self.spool.with_name(self.spool.name + ".rejected") if self.spool is not None else None

    async def close(self, timeout: float) -> None:
        """Deliver the queue within `timeout` seconds, then spool what is left for the next start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.queue and self.task is not None and not self.task.done() and loop.time() < deadline:
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None
        if self.spool is None:
            if self.queue:
                log.error("records_lost", sink=self.name, records=len(self.queue), reason="no spool file")
            return
        if not self.queue:
            with contextlib.suppress(OSError):
                self.spool.unlink()
            return
        try:
            _write_private(self.spool, b"".join(i + b"\n" for i in self.queue))
        except OSError as exc:
            log.error("records_lost", sink=self.name, records=len(self.queue), path=str(self.spool),
                      error=str(exc), reason="the spool file is not writable")
            return
        self.spooled += len(self.queue)
        log.warning("records_spooled", path=str(self.spool), records=len(self.queue), url=self.url,
                    last_error=self.last_error)

    # -- HTTP ----------------------------------------------------------------------------

    async def post(self, body: bytes) -> int:
        """POST `body`; the HTTP status (raises OSError, TimeoutError, HttpError)."""
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None,
                limit=MAX_HEAD)
            try:
                writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
                while True:
                    status = _status(await reader.readline())
                    if status >= 200:
                        return status
                    while (await reader.readline()).strip():  # skip a 1xx answer's headers
                        pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    def info(self) -> dict[str, Any]:
        """Counters for stats and metrics."""
        return {"queued": len(self.queue), "delivered": self.delivered, "dropped": self.dropped,
                "errors": self.errors, "batches": self.batches, "rejected": self.rejected,
                "spooled": self.spooled, "resent": self.resent, "up": self.failing_since is None,
                "last_error": self.last_error}


def _status(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP status line: {line[:80]!r}")
    return int(parts[1])


def _write_private(path: Path, data: bytes) -> None:
    """Write a file atomically (temp file, fsync, rename), readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _append_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
