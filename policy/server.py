"""`callpolicy serve`: start the listeners, the watchers, and stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Callable
from typing import Any

import structlog

from policy.clock import Clock, SystemClock
from policy.service import PolicyService
from policy.settings import Settings, split_hostport
from policy.store.factory import make_store
from policy.transports.stream import ConnectionStats, serve_tcp, serve_unix
from policy.transports.udp import serve_udp

log = structlog.get_logger("policy.server")


class Server:
    """The running service and everything around it."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.service: PolicyService | None = None
        self.stop_event = asyncio.Event()
        self.servers: list[asyncio.AbstractServer] = []
        self.closers: list[Callable[[], Any]] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.conn_stats = ConnectionStats(settings.max_connections)
        self.listening: dict[str, Any] = {}

    async def start(self) -> PolicyService:
        """Load rules, open the store and the listeners; log where it listens."""
        s = self.settings
        rules_path = s.path(s.rules)
        assert rules_path is not None
        store = make_store(s, self.clock)
        service = PolicyService(rules_path, store, clock=self.clock,
                                early_timeout=s.early_timeout, default_timeout=s.default_timeout)
        await store.start()
        self.service = service
        service.info_providers["connections"] = lambda: {
            "open": self.conn_stats.open, "accepted": self.conn_stats.accepted,
            "refused": self.conn_stats.refused, "protocol_errors": self.conn_stats.protocol_errors}
        if s.tcp:
            host, port = split_hostport(s.tcp)
            srv = await serve_tcp(service, host, port, self.conn_stats, reuse_port=s.reuse_port,
                                  max_message=s.max_message, partial_timeout=s.partial_timeout)
            self.servers.append(srv)
            sock = srv.sockets[0].getsockname()
            self.listening["tcp"] = f"{sock[0]}:{sock[1]}"
        if s.udp:
            host, port = split_hostport(s.udp)
            if s.tcp and port == 0 and "tcp" in self.listening:
                port = int(self.listening["tcp"].rsplit(":", 1)[1])
            transport, _proto = await serve_udp(service, host, port, s.max_message, s.reuse_port)
            self.closers.append(transport.close)
            sock = transport.get_extra_info("sockname")
            self.listening["udp"] = f"{sock[0]}:{sock[1]}"
        if s.unix:
            path = s.path(s.unix)
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            srv = await serve_unix(service, str(path), self.conn_stats, max_message=s.max_message,
                                   partial_timeout=s.partial_timeout)
            self.servers.append(srv)
            self.listening["unix"] = str(path)
            self.closers.append(lambda: _unlink(path))
        await self._start_extras(service)
        if s.watch:
            self.tasks.append(asyncio.create_task(service.watch(s.watch_interval)))
        self.tasks.append(asyncio.create_task(service.sweep_loop(s.sweep_interval)))
        # Everything loaded so far lives as long as the process: keep the cyclic GC from
        # walking it again and again (its pauses showed up as p99.9 spikes in the bench).
        gc.collect()
        gc.freeze()
        log.info("listening", **self.listening, store=store.name, rules=len(service.ruleset.rules),
                 rules_version=service.ruleset.version, rules_dir=str(rules_path), pid=os.getpid())
        return service

    async def _start_extras(self, service: PolicyService) -> None:
        """Optional front ends: Prometheus metrics, Kamailio evapi, RADIUS."""
        s = self.settings
        if s.metrics:
            from policy.metrics import start_metrics

            host, port = split_hostport(s.metrics, 9099)
            self.listening["metrics"] = start_metrics(service, host, port)
        if s.evapi_nodes:
            from policy.reconcile import Reconciler
            from policy.transports.evapi import start_evapi

            reconciler = Reconciler(service, grace=s.evapi_reconcile_grace)
            service.reconciler = reconciler
            service.info_providers["reconcile"] = reconciler.info
            if hasattr(service.store, "on_data_loss"):  # the Redis store: rebuild from the proxies
                setattr(service.store, "on_data_loss", reconciler.rebuild)  # noqa: B010
            self.closers.append(await start_evapi(service, s))
            self.closers.append(reconciler.close)
            self.tasks.append(asyncio.create_task(reconciler.loop(s.evapi_reconcile_interval)))
            self.listening["evapi"] = list(dict.fromkeys(s.evapi_nodes))
        if s.radius_auth or s.radius_acct:
            from policy.transports.radius import start_radius

            closer, where = await start_radius(service, s)
            self.closers.append(closer)
            self.listening.update(where)

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop; SIGHUP reloads the rules."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

    def _sighup(self) -> None:
        log.info("sighup_reload")
        if self.service is not None:
            with contextlib.suppress(Exception):
                self.service.reload()

    async def stop(self) -> None:
        """Close listeners, stop tasks, close the store (the embedded store writes its snapshot)."""
        for srv in self.servers:
            srv.close()
        for close in self.closers:
            with contextlib.suppress(Exception):
                res = close()
                if asyncio.iscoroutine(res):
                    await res
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.service is not None:
            await self.service.store.close()
        log.info("stopped")

    async def run(self) -> None:
        """Start, wait for a stop signal, stop."""
        await self.start()
        self.install_signals()
        await self.stop_event.wait()
        log.info("stopping")
        await self.stop()


def _unlink(path: Any) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def raise_fd_limit(wanted: int) -> None:
    """Lift the soft open-files limit toward the hard one, so max_connections can be reached."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as exc:  # pragma: no cover - exotic platforms
        log.warning("fd_limit_unchanged", error=str(exc))


def run(settings: Settings) -> None:
    """Run the service until SIGTERM/SIGINT, on uvloop where available."""
    raise_fd_limit(settings.max_connections + 256)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    from policy import logs

    try:
        runner(Server(settings).run())
    finally:
        logs.flush()
