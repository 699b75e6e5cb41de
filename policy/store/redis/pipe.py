"""The batching pipe: every operation queued in one event-loop tick goes to Redis in ONE write
on the one connection, replies come back in order, and nothing waits longer than its deadline.

- **Batching.** `call` queues a packed command and schedules one flush for the tick; the flush
  writes everything queued (up to `MAX_INFLIGHT` unanswered commands) in one write. Commands
  of the next tick go out at once too, without waiting for the previous replies (RESP
  pipelining: replies are matched to commands by order).
- **Deadlines.** Each operation has a deadline (`timeout` after it was queued). One timer,
  set for the earliest deadline, fails an operation when its deadline has passed *and Redis
  is late*: the oldest unanswered command was written more than `timeout` ago and no reply
  bytes wait in the socket. A busy event loop (replies that arrived in time but were not read
  yet) is not a slow Redis. An operation queued `MAX_QUEUE_WAIT` in our own queue fails
  regardless (we are overloaded). A late Redis makes the circuit ``suspect``: new operations
  fail at once, those already waiting keep their own deadline (a Redis stall a little longer
  than `timeout`, common on a loaded machine, then fails only what really waited that long);
  no reply for `hang_timeout` drops the connection (``down``).
- **Undo.** A reserve that was written but whose caller never saw the answer (its deadline
  passed first, or the connection died) may still have admitted the call in Redis, while the
  service decided it without the store. Its (uid, token) is kept, and undo.lua takes back
  exactly what that reserve did, keyed by its token: never an admission a later check took
  over and confirmed. Late replies that say "admitted" are undone at once; reserves whose
  replies were lost with the connection are undone after the reconnect (bounded list).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
from collections.abc import Callable
from typing import Any

from policy.errors import StoreError
from policy.store.redis.connection import Circuit, ReplyError, RespConnection

#: Unanswered commands on the connection at most (about 10-30 ms of Redis time); more wait
#: in our queue, where their time is ours, not Redis's.
MAX_INFLIGHT = 1024
#: An operation waiting this long in our own queue fails even though Redis is answering.
MAX_QUEUE_WAIT = 1.0
#: Reserves whose outcome is unknown, kept for undo after a reconnect (the oldest beyond are
#: dropped; their leases still end).
MAX_PENDING_UNDO = 100_000
#: Undos sent per flush, so a backlog never delays the operations of a tick by much.
UNDO_PER_FLUSH = 64
#: Deadline of an undo (not a caller's operation: it may take longer), and the pause before
#: a failed one is sent again.
UNDO_TIMEOUT = 2.0
UNDO_RETRY = 0.2
#: Past this many entries, answered operations leave the deadline heap as new ones arrive.
PRUNE_AT = 4096


class Op:
    """One command on its way: packed bytes, the caller's future, its deadline."""

    __slots__ = ("born", "data", "deadline", "fut", "retried", "undo", "write_no", "written")

    def __init__(self, data: bytes, fut: asyncio.Future[Any], born: float, deadline: float,
                 undo: tuple[str, str] | None) -> None:
        self.data = data
        self.fut = fut
        self.born = born
        self.deadline = deadline
        self.undo = undo  # a reserve's (uid, token): what undo.lua takes back if need be
        self.written = 0.0
        self.write_no = -1
        self.retried = False


#: Seconds an operation keeps of its `timeout` for the service to answer after giving up.
ANSWER_MARGIN = 0.004


def budget_of(timeout: float) -> float:
    """How long an operation (every round trip of it) may wait for Redis: a little less than
    `timeout`, so the service's answer (which follows on_store_error) still leaves within
    `store.timeout` of the request."""
    return timeout - min(ANSWER_MARGIN, timeout * 0.1)


class Pipe:
    """Operations to Redis over one connection: batched, bounded in time, undone when lost."""

    def __init__(self, circuit: Circuit, *, timeout: float, hang_timeout: float,
                 undo_command: Callable[[str, str], bytes], reload_commands: Callable[[], list[bytes]],
                 on_undone: Callable[[str, int], None], on_broken: Callable[[], None] | None = None) -> None:
        self.circuit = circuit
        self.timeout = timeout
        self.budget = budget_of(timeout)
        self.hang_timeout = hang_timeout
        self._undo_command = undo_command
        self._reload_commands = reload_commands
        self._on_undone = on_undone
        self._on_broken = on_broken
        self.conn: RespConnection | None = None
        self._queue: list[Op] = []
        self._inflight: collections.deque[Op] = collections.deque()
        # operations by deadline: almost all arrive in deadline order (queued time + timeout) and
        # wait in the deque; one with an earlier deadline than the last (a retry) in the heap
        self._waiting: collections.deque[Op] = collections.deque()
        self._odd: list[tuple[float, int, Op]] = []
        self._seq = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None  # set on the first attach
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._writes = 0
        self._reload_write_no = -1
        self.undo_parked: collections.deque[tuple[str, str]] = collections.deque(maxlen=MAX_PENDING_UNDO)
        self.closed = False
        # counters
        self.batches = 0
        self.ops = 0
        self.errors = 0
        self.late_replies = 0

    # -- the connection --------------------------------------------------------------------

    def attach(self, conn: RespConnection) -> None:
        """Use this (ready) connection from now on."""
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        conn.on_reply = self._on_reply
        conn.on_lost = self._on_lost
        if self.undo_parked:
            self._schedule_flush()

    def _on_lost(self, exc: Exception | None) -> None:
        self.broken(f"connection lost: {exc}" if exc else "connection lost")

    def broken(self, reason: str) -> None:
        """Drop the connection; fail what waits on it (keeping its reserves for undo)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.on_reply = _ignore
            conn.on_lost = _ignore
            conn.abort()
        err = StoreError(f"redis ({self.circuit.where}) unavailable: {reason}")
        for op in self._inflight:
            if op.undo is not None:
                self.undo_parked.append(op.undo)
            if not op.fut.done():
                self.errors += 1
                op.fut.set_exception(err)
        self._inflight.clear()
        self._fail_queue(err)
        if not self.closed:
            self.circuit.broken(reason)
            if self._on_broken is not None:
                self._on_broken()

    def _fail_queue(self, err: StoreError) -> None:
        for op in self._queue:
            if not op.fut.done():
                self.errors += 1
                op.fut.set_exception(err)
        self._queue = []

    def close(self) -> None:
        """Fail everything, drop the connection."""
        self.closed = True
        err = StoreError("redis store closed")
        ops = [*self._inflight, *self._queue]
        for op in self._inflight:
            if not op.fut.done():
                op.fut.set_exception(err)
        self._inflight.clear()
        self._fail_queue(err)
        for op in ops:
            # A closing store fails replies nobody waits for any more (a caller that gave up, a
            # pipelined step whose batch already failed): marked seen, so asyncio does not log
            # "Future exception was never retrieved" for each. A waiting caller still gets it.
            if not op.fut.cancelled():
                op.fut.exception()
        self._waiting.clear()
        self._odd.clear()
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.on_reply = _ignore
            conn.on_lost = _ignore
            conn.abort()

    # -- sending -----------------------------------------------------------------------------

    def call(self, data: bytes, deadline: float | None = None,
             undo: tuple[str, str] | None = None) -> asyncio.Future[Any]:
        """Queue one packed command for this tick's write; its reply (a future), or StoreError
        at once when Redis is known to be unusable (the circuit is not ``up``)."""
        loop = self.loop
        if self.circuit.state != "up" or self.closed or loop is None:
            self.errors += 1
            raise self.circuit.error()
        fut: asyncio.Future[Any] = loop.create_future()
        now = loop.time()
        if deadline is None:
            deadline = now + self.budget
        op = Op(data, fut, now, deadline, undo)
        self._queue.append(op)
        self._track(op)
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return fut

    def _track(self, op: Op) -> None:
        """Watch the op's deadline."""
        waiting = self._waiting
        if len(waiting) > PRUNE_AT:  # answered operations wait here for their deadline: drop them now
            while waiting and waiting[0].fut.done():
                waiting.popleft()
        deadline = op.deadline
        if not waiting or deadline >= waiting[-1].deadline:
            waiting.append(op)
        else:
            heapq.heappush(self._odd, (deadline, next(self._seq), op))
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self.closed and self.loop is not None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        conn = self.conn
        if conn is None or self.closed:
            if self._queue:
                self._fail_queue(self.circuit.error())
            return
        if self.undo_parked and self.circuit.state == "up":
            for _ in range(min(UNDO_PER_FLUSH, len(self.undo_parked))):
                self._send_undo(self.undo_parked.popleft())
            # (_send_undo scheduled the next flush: the rest go a batch per tick)
        room = MAX_INFLIGHT - len(self._inflight)
        queue = self._queue
        if room <= 0 or not queue:
            return
        if len(queue) <= room:
            batch, self._queue = queue, []
        else:
            batch, self._queue = queue[:room], queue[room:]
        batch = [op for op in batch if not op.fut.done()]
        if batch:
            self._write(conn, batch)

    def _write(self, conn: RespConnection, batch: list[Op]) -> None:
        assert self.loop is not None
        now = self.loop.time()
        write_no = self._writes
        self._writes += 1
        for op in batch:
            op.written = now
            op.write_no = write_no
        was_idle = not self._inflight
        self._inflight.extend(batch)
        self.batches += 1
        self.ops += len(batch)
        try:
            conn.write(b"".join([op.data for op in batch]))
        except (ConnectionError, OSError, RuntimeError) as exc:
            self.broken(f"write failed: {exc}")
            return
        if was_idle:
            at = now + self.hang_timeout
            if self._timer is None or at < self._timer_at:
                self._arm(at)

    def _send_undo(self, undo: tuple[str, str]) -> None:
        """Queue undo.lua for one reserve (internal: no caller waits)."""
        loop = self.loop
        if loop is None:
            return
        fut: asyncio.Future[Any] = loop.create_future()
        now = loop.time()
        op = Op(self._undo_command(*undo), fut, now, now + UNDO_TIMEOUT, None)

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                if not self.closed:
                    self.undo_parked.append(undo)  # try again once Redis answers, even if idle
                    loop.call_later(UNDO_RETRY, self._schedule_flush)
                return
            result = f.result()
            if isinstance(result, int) and result:
                self._on_undone(undo[0], result)

        fut.add_done_callback(done)
        self._queue.append(op)
        self._track(op)
        self._schedule_flush()

    # -- receiving ---------------------------------------------------------------------------

    def _on_reply(self, reply: Any) -> None:
        inflight = self._inflight
        if not inflight:  # cannot happen: a reply to nothing we sent
            self.broken("a reply to no command")
            return
        op = inflight.popleft()
        circuit = self.circuit
        if circuit.state == "suspect":
            circuit.answering()
        fut = op.fut
        if isinstance(reply, ReplyError):
            code = reply.code
            if code == "NOSCRIPT" and not op.retried:
                self._resend_after_reload(op)
                return
        op.data = b""  # answered: the bytes are not needed any more (the op may wait in the heap)
        if isinstance(reply, ReplyError):
            code = reply.code
            if not fut.done():
                self.errors += 1
                err = StoreError(f"redis ({circuit.where}) refused: {reply}")
                err.__cause__ = reply  # the reply itself (a cluster client reads MOVED/ASK from it)
                fut.set_exception(err)
            if code == "READONLY":  # a failover demoted this server: find the primary again
                self.broken(f"the server is read-only now ({reply})")
                return
        elif not fut.done():
            fut.set_result(reply)
        else:
            self.late_replies += 1
            undo = op.undo
            if undo is not None and isinstance(reply, list) and reply and reply[0] in (1, 2):
                self._send_undo(undo)
        if self._queue and self._flush_handle is None and len(inflight) < MAX_INFLIGHT:
            self._schedule_flush()

    def _resend_after_reload(self, op: Op) -> None:
        """Redis lost its scripts (restart, SCRIPT FLUSH): load them again, send `op` once more."""
        conn = self.conn
        if conn is None:
            return
        op.retried = True
        if op.fut.done():
            return  # its caller gave up and it never ran: nothing to send or undo
        batch = []
        if op.write_no > self._reload_write_no:  # no reload was written after it: write one now
            loop = asyncio.get_running_loop()
            for data in self._reload_commands():
                reload = Op(data, loop.create_future(), loop.time(), op.deadline, None)
                reload.fut.add_done_callback(_consume)
                batch.append(reload)
            self._reload_write_no = self._writes
            self.circuit.log.info("redis_scripts_reloaded", where=self.circuit.where)
        batch.append(op)
        self._write(conn, batch)

    # -- deadlines ---------------------------------------------------------------------------

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        loop = self.loop or asyncio.get_running_loop()
        self._timer = loop.call_at(at, self._watch)

    def _next_due(self) -> Op | None:
        """The waiting operation with the earliest deadline (answered ones are dropped)."""
        waiting, odd = self._waiting, self._odd
        while waiting and waiting[0].fut.done():
            waiting.popleft()
        while odd and odd[0][2].fut.done():
            heapq.heappop(odd)
        if odd and (not waiting or odd[0][0] < waiting[0].deadline):
            return odd[0][2]
        return waiting[0] if waiting else None

    def _watch(self) -> None:
        self._timer = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        inflight = self._inflight
        conn = self.conn
        late: bool | None = None  # judged at most once per look
        unread = False
        while (op := self._next_due()) is not None and op.deadline <= now:
            if now - op.born >= MAX_QUEUE_WAIT:
                self.errors += 1
                op.fut.set_exception(StoreError(f"redis store overloaded: queued {now - op.born:.3f} s"))
                continue
            if late is None:
                head = inflight[0] if inflight else None
                late = head is not None and now - head.written >= self.budget
                if late and conn is not None and conn.unread():
                    late, unread = False, True  # replies wait for us: our loop was busy
            if not late:
                break
            self.errors += 1
            op.fut.set_exception(StoreError(f"redis ({self.circuit.where}) did not answer within "
                                            f"{self.timeout * 1000:.0f} ms"))
            self.circuit.suspect(f"no reply within {self.timeout * 1000:.0f} ms")
        head = inflight[0] if inflight else None
        if head is not None and now - head.written >= self.hang_timeout and not unread \
                and not (conn is not None and conn.unread()):
            self.broken(f"no reply for {now - head.written:.3f} s: connection dropped")
            head = None
            op = self._next_due()
        # when to look again
        at = None
        if op is not None:
            if op.deadline > now:
                at = op.deadline
            elif unread:
                at = now + 0.001
            elif head is not None:
                at = max(head.written + self.budget, now + 0.001)
            else:
                at = now + self.timeout / 5
        if head is not None:
            hang_at = head.written + self.hang_timeout
            at = hang_at if at is None else min(at, hang_at)
        if at is not None:
            self._arm(max(at, now + 0.0005))


def _ignore(_: Any) -> None:
    return None


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
