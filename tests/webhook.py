"""A real HTTP receiver for call records, on a loopback port, in a thread of its own."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson


class Receiver:
    """Accepts POSTed JSON arrays of records; `status` decides the answer (200, 503, 400...).

    `hang` makes it read the body and never answer (a stuck webhook). Every record_id that
    arrived in a batch it answered 2xx is counted in `acked`; every one that arrived at all
    in `seen`.
    """

    def __init__(self, port: int = 0) -> None:
        self.status = 200
        self.hang = False
        self.acked: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()
        self.records: list[dict[str, Any]] = []
        self.posts = 0
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                batch = orjson.loads(body)
                with receiver.lock:
                    receiver.posts += 1
                    receiver.paths.append(self.path)
                    receiver.headers.append(dict(self.headers))
                    for r in batch:
                        receiver.seen[r["record_id"]] += 1
                    status = receiver.status
                    hang = receiver.hang
                if hang:
                    receiver._release.wait(30)
                    return
                if 200 <= status < 300:
                    with receiver.lock:
                        for r in batch:
                            receiver.acked[r["record_id"]] += 1
                            receiver.records.append(r)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where to POST."""
        return f"http://127.0.0.1:{self.port}/cdr?src=test"

    def start(self) -> Receiver:
        """Serve."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (and let hung handlers go)."""
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def wait_acked(self, n: int, timeout: float = 20.0) -> int:
        """Wait until `n` distinct records were acknowledged; return how many were."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.acked) >= n:
                    return len(self.acked)
            time.sleep(0.02)
        with self.lock:
            return len(self.acked)

    async def until_acked(self, n: int, timeout: float = 20.0) -> int:
        """`wait_acked` for a test running on an event loop (sleeps without blocking it)."""
        import asyncio

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.acked) >= n:
                    return len(self.acked)
            await asyncio.sleep(0.02)
        with self.lock:
            return len(self.acked)
