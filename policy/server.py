"""`callpolicy serve`: start the listeners, the watchers, and stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from policy import sdnotify, supervise
from policy.auth import Allowlist, ListenerRefused, Tokens, UnixAccess, auth_summary, check_listeners, stream_role
from policy.clock import Clock, SystemClock
from policy.errors import SettingsError
from policy.looplag import LoopLagProbe
from policy.ratelimit_log import RateLimitedLog
from policy.records import CallRecords
from policy.service import Limits, PolicyService
from policy.settings import Settings, load_tokens, split_hostport, unix_uids
from policy.store.factory import make_store
from policy.transports.stream import ConnectionStats, StreamLimits, serve_tcp, serve_unix
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
        self.warn = RateLimitedLog(log, settings.warn_interval)
        self.conn_stats = ConnectionStats(settings.max_connections, settings.max_per_peer, settings.unix_reserve,
                                          warn=self.warn)
        self.task_restarts: Counter[str] = Counter()
        self.listening: dict[str, Any] = {}
        self.records: CallRecords | None = None

    def security(self) -> tuple[Tokens, Allowlist, list[str]]:
        """Tokens, the UDP allowlist and warnings to log; refuses (SettingsError) a listener that would
        be reachable beyond loopback without authentication."""
        s = self.settings
        tokens, warnings = load_tokens(s)
        allow = Allowlist(s.udp_allow)
        try:
            warnings += check_listeners(split_hostport(s.tcp)[0] if s.tcp else None,
                                        split_hostport(s.udp)[0] if s.udp else None, tokens, allow, s.insecure)
        except ListenerRefused as exc:
            raise SettingsError(s.source, exc.key, exc.message) from None
        return tokens, allow, warnings

    async def start(self) -> PolicyService:
        """Load rules, open the store and the listeners; log where it listens."""
        s = self.settings
        rules_path = s.path(s.rules)
        assert rules_path is not None
        tokens, allow, warnings = self.security()
        admin_uids, proxy_uids = unix_uids(s)
        for w in warnings:
            log.warning("security", warning=w)
        if s.source == "<defaults>":
            log.warning("no_config", message="no service.toml (--config, $CALLPOLICY_CONFIG or ./service.toml): "
                        "built-in defaults; `callpolicy init DIR` writes a commented one with example rules",
                        tcp=s.tcp, udp=s.udp, unix=str(s.path(s.unix)) if s.unix else None, rules=str(rules_path),
                        store=s.store, snapshot=str(s.path(s.snapshot)) if s.snapshot else None,
                        metrics=s.metrics)
        store = make_store(s, self.clock)
        service = PolicyService(rules_path, store, clock=self.clock,
                                early_timeout=s.early_timeout, default_timeout=s.default_timeout,
                                limits=Limits(max_field=s.max_field, max_vars=s.max_vars,
                                              max_timeout=s.dialog_max_timeout),
                                tokens=tokens)
        service.warnings.interval = s.warn_interval
        await store.start()
        self.service = service
        service.info_providers["connections"] = self.conn_stats.info
        service.info_providers["tasks"] = lambda: dict(self.task_restarts)
        limits = StreamLimits(max_message=s.max_message, partial_timeout=s.partial_timeout,
                              idle_timeout=s.idle_timeout, max_pending=s.max_pending)
        auth: dict[str, str] = {}
        records = CallRecords.from_settings(s, self.clock.now)
        if records is not None:
            await records.start()
            self.records = records
            service.on_call_end.append(records)
            service.info_providers["records"] = records.info
        if s.tcp:
            host, port = split_hostport(s.tcp)
            with _naming("tcp", s.tcp, s.reuse_port):
                srv = await serve_tcp(service, host, port, self.conn_stats, limits=limits, role=stream_role(tokens),
                                      reuse_port=s.reuse_port)
            self.servers.append(srv)
            sock = srv.sockets[0].getsockname()
            self.listening["tcp"] = f"{sock[0]}:{sock[1]}"
            auth["tcp"] = auth_summary(tokens, host, s.insecure)
        if s.udp:
            host, port = split_hostport(s.udp)
            if s.tcp and port == 0 and "tcp" in self.listening:
                port = int(self.listening["tcp"].rsplit(":", 1)[1])
            with _naming("udp", s.udp, s.reuse_port):
                transport, proto = await serve_udp(service, host, port, s.max_message, s.reuse_port, allow=allow,
                                                   warn=self.warn)
            self.closers.append(transport.close)
            service.info_providers["udp"] = proto.info
            sock = transport.get_extra_info("sockname")
            self.listening["udp"] = f"{sock[0]}:{sock[1]}"
            auth["udp"] = f"proxy ops from {allow}"
        if s.unix:
            path = s.path(s.unix)
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            access = UnixAccess(admin_uids, proxy_uids)
            try:
                srv = await serve_unix(service, str(path), self.conn_stats, limits=limits, access=access,
                                       mode=s.unix_mode, group=_gid(s))
            except PermissionError as exc:
                raise SettingsError(s.source, "listen.unix_group",
                                    f"cannot give {path} to group {s.unix_group!r}: {exc.strerror}") from None
            self.servers.append(srv)
            self.listening["unix"] = str(path)
            self.closers.append(lambda: _unlink(path))
            auth["unix"] = access.describe() + (", others by token" if tokens else "")
        await self._start_extras(service)
        if s.watch:
            self.supervise("watcher", lambda: service.watch(s.watch_interval))
        self.supervise("sweeper", lambda: service.sweep_loop(s.sweep_interval))
        self.supervise("notices", service.notices.run)
        probe = LoopLagProbe().start(register=True)
        self.closers.append(probe.stop)
        service.info_providers["loop"] = probe.read
        # Everything loaded so far lives as long as the process: keep the cyclic GC from
        # walking it again and again (its pauses showed up as p99.9 spikes in the bench).
        gc.collect()
        gc.freeze()
        self.supervise("gc_freeze", lambda: freeze_loop(GC_FREEZE_INTERVAL))
        log.info("listening", **self.listening, auth=auth, store=store.name, rules=len(service.ruleset.rules),
                 rules_version=service.ruleset.version, rules_dir=str(rules_path), pid=os.getpid())
        return service

    def supervise(self, name: str, factory: Callable[[], Any]) -> asyncio.Task[None]:
        """Run a background loop that logs its failures and restarts (counted in stats `tasks`)."""
        task = supervise.start(name, factory, self.task_restarts)
        self.tasks.append(task)
        return task

    async def _start_extras(self, service: PolicyService) -> None:
        """Optional front ends: Prometheus metrics, Kamailio evapi, RADIUS."""
        s = self.settings
        if s.metrics:
            from policy.metrics import start_metrics

            host, port = split_hostport(s.metrics, 9099)
            state, http = start_metrics(service, host, port, s)
            self.closers.append(http.close)
            self.closers.append(state.stop)
            self.listening["metrics"] = http.where
        if s.evapi_nodes:
            from policy.reconcile import Reconciler
            from policy.transports.evapi import start_evapi

            reconciler = Reconciler(service, grace=s.evapi_reconcile_grace)
            service.reconciler = reconciler
            service.info_providers["reconcile"] = reconciler.info
            if hasattr(service.store, "on_data_loss"):  # the Redis store: rebuild from the proxies
                setattr(service.store, "on_data_loss", reconciler.rebuild)  # noqa: B010
            self.closers.append(await start_evapi(service, s, spawn=self.supervise))
            self.closers.append(reconciler.close)
            self.supervise("reconcile", lambda: reconciler.loop(s.evapi_reconcile_interval))
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
            sdnotify.reloading()
            with contextlib.suppress(Exception):
                self.service.reload()
            sdnotify.ready(self.status())

    def status(self) -> str:
        """One line for `systemctl status`."""
        svc = self.service
        where = ", ".join(f"{k} {v}" for k, v in self.listening.items() if isinstance(v, str))
        rules = f"rules {svc.ruleset.version}" if svc is not None else "no rules"
        return f"{rules}; {where}"

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
            self.service.warnings.flush()
        self.warn.flush()
        if self.records is not None:
            await self.records.close(self.settings.records_stop_timeout)
        log.info("stopped")

    async def run(self) -> None:
        """Start, wait for a stop signal, stop."""
        await self.start()
        self.install_signals()
        sdnotify.ready(self.status())
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            self.tasks.append(asyncio.create_task(sdnotify.watchdog(interval)))
        await self.stop_event.wait()
        log.info("stopping")
        sdnotify.stopping()
        await self.stop()


def _gid(s: Settings) -> int | None:
    """The Unix socket's group as a gid (None: the process's own)."""
    if s.unix_group is None or isinstance(s.unix_group, int):
        return s.unix_group
    import grp

    try:
        return grp.getgrnam(s.unix_group).gr_gid
    except KeyError:
        raise SettingsError(s.source, "listen.unix_group", f"no such group {s.unix_group!r}") from None


#: Seconds between two gc.freeze() calls (see freeze_loop).
GC_FREEZE_INTERVAL = 1.0


async def freeze_loop(interval: float) -> None:
    """Move everything that outlived `interval` out of the cyclic GC's reach, again and again.

    Held calls live for minutes to hours; each is a few GC-tracked objects. Without this, a
    full collection walks all of them: 115 ms with 100k held calls here, a stall of every check
    in flight. After a freeze a full collection only walks what is younger than `interval`.
    What is frozen is still freed by reference counting when it dies; only cyclic garbage that
    was frozen first would stay, and the request path makes none (tests/test_gc.py).
    """
    while True:
        await asyncio.sleep(interval)
        gc.freeze()


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
    raise_fd_limit(settings.max_connections + settings.unix_reserve + 256)
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


@contextlib.contextmanager
def _naming(kind: str, address: str, reuse_port: bool) -> Iterator[None]:
    """A listener that cannot bind says which one, and what shares a port."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        hint = "" if reuse_port else " (another service on it? processes share a port with [listen] reuse_port = true)"
        raise OSError(exc.errno, f"[listen] {kind} {address}: address already in use{hint}") from None
