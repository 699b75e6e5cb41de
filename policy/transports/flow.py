"""Back-pressure for one stream connection (uvicorn's `flow_control.py` idea).

A client that sends requests faster than it reads the replies must not make the service
buffer without bound, nor keep the event loop busy for everyone else. Two things pause
reading from such a client:

- the transport's write buffer passed its high-water mark (asyncio calls the protocol's
  `pause_writing`; `resume_writing` when it drained below the low-water mark);
- the connection holds `max_pending` replies not yet written (requests in flight on the
  store, or answered but behind one that is).

While reading is paused the kernel's socket buffers fill and TCP flow control slows the client
down. Reading resumes when both conditions clear. The connection's memory is thus bounded by
about `max_pending` replies plus the high-water mark plus one read (see docs/security.md).
"""

from __future__ import annotations

import asyncio

#: The transport's write buffer high-water mark (bytes); the low-water mark is a quarter of it.
HIGH_WATER = 64 * 1024


class FlowControl:
    """Read/write pause state of one connection."""

    __slots__ = ("pauses", "read_paused", "transport", "write_paused")

    def __init__(self, transport: asyncio.Transport, high_water: int = HIGH_WATER) -> None:
        self.transport = transport
        self.read_paused = False
        self.write_paused = False
        self.pauses = 0
        transport.set_write_buffer_limits(high=high_water, low=high_water // 4)

    def pause_reading(self) -> None:
        """Stop reading from the client (idempotent)."""
        if not self.read_paused:
            self.read_paused = True
            self.pauses += 1
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the client again (idempotent)."""
        if self.read_paused:
            self.read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        """The transport's buffer is over the high-water mark."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained below the low-water mark."""
        self.write_paused = False
