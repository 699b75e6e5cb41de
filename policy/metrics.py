"""Prometheus metrics: the service's counters and the profile sizes, read without racing the loop.

Everything the metrics read lives on the event loop and changes there (counters are dicts
and ints the request path updates). The scrape runs on prometheus_client's HTTP thread, so
it never reads those objects directly:

- counters, the latency histogram, the store's and the notices' `info()` and every
  `service.info_providers` entry are copied *on the loop* when a scrape asks
  (`MetricsState.snapshot`: `call_soon_threadsafe` and a future; if the loop does not
  answer within `SNAPSHOT_TIMEOUT` the previous copy is served and
  `callpolicy_metrics_stale_scrapes_total` counts it);
- profile sizes need the store (Redis I/O), so a task on the loop samples them every
  `[metrics] refresh` seconds (`MetricsState.run`) and the scrape reads the last sample.

Per-value series are bounded: a with-value profile gets `callpolicy_profile_value_size`
only for the values named in the rules' overrides, the values at >= `near_limit` of their
limit, and the `top_n` biggest - at most `max_values` per profile. Every other value is
only in the profile's total (`callpolicy_profile_size`) and count (`callpolicy_profile_values`).
The `_limit` gauges are the caps in force at the sample (`policy.caps`: overrides, the
schedule window of the time, `max`).

Each family comes from what the service or a provider exposes; a provider that is not
there (no evapi nodes, no RADIUS, no loop-lag probe) yields nothing. docs/operations.md
lists every name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from policy import __version__
from policy.caps import ProfileCaps, profile_caps
from policy.errors import StoreError
from policy.latency import LatencyHistogram
from policy.store.base import MAX_PAGE, DialogStats

log = structlog.get_logger("policy.metrics")

SNAPSHOT_TIMEOUT = 2.0
CIRCUIT_STATES = ("closed", "half_open", "open")
DECISION_OUTCOMES = ("allow", "deny", "store_allow", "store_deny")


@dataclass(frozen=True)
class Snapshot:
    """The service's counters, copied on the loop."""

    taken: float
    totals: dict[str, int]
    decisions: dict[tuple[str, str], int]
    reloads: int
    reload_errors: int
    rules_loaded: int
    rules_version: str
    dialogs: DialogStats | None
    store: str
    store_info: dict[str, Any]
    notices: dict[str, Any]
    providers: dict[str, Any]
    latency: LatencyHistogram


@dataclass
class ProfileSample:
    """Profile sizes read from the store at `taken` (clock seconds)."""

    taken: float
    sizes: dict[str, int] = field(default_factory=dict)  # every profile's total
    limits: dict[str, tuple[int, bool]] = field(default_factory=dict)  # no-value profiles: (cap, shadow)
    values: dict[str, dict[str, tuple[int, int | None]]] = field(default_factory=dict)  # chosen values
    counts: dict[str, int] = field(default_factory=dict)  # with-value profiles: non-empty values


class MetricsState:
    """Copies of the service's figures, made on the loop for the scrape thread."""

    def __init__(self, service: Any, *, refresh: float = 10.0, top_n: int = 10, near_limit: float = 0.8,
                 max_values: int = 1000) -> None:
        self.service = service
        self.refresh = refresh
        self.top_n = top_n
        self.near_limit = near_limit
        self.max_values = max_values
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.last: Snapshot | None = None
        self.profiles: ProfileSample | None = None
        self.stale_scrapes = 0
        self.sample_errors = 0
        self.task: asyncio.Task[None] | None = None

    # -- on the loop -----------------------------------------------------------------------

    def bind(self) -> None:
        """Remember the running loop (call on it) and take a first copy."""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.take()

    def take(self) -> Snapshot:
        """Copy every figure now (on the loop thread)."""
        s = self.service
        providers: dict[str, Any] = {}
        for name, provider in list(s.info_providers.items()):
            try:
                providers[name] = provider()
            except Exception:  # a provider's bug must not break every scrape
                log.exception("metrics_provider_failed", provider=name)
        snap = Snapshot(
            taken=time.time(),
            totals=dict(s.totals),
            decisions=dict(s.decisions),
            reloads=s.reloads,
            reload_errors=s.reload_errors,
            rules_loaded=len(s.ruleset.rules),
            rules_version=s.ruleset.version,
            dialogs=s.last_dialogs,
            store=s.store.name,
            store_info=dict(s.store.info()),
            notices=dict(s.notices.info()),
            providers=providers,
            latency=s.check_latency.copy(),
        )
        self.last = snap
        return snap

    async def sample_profiles(self) -> ProfileSample:
        """Read every profile's size, and the bounded set of per-value sizes, from the store."""
        svc = self.service
        store = svc.store
        rs = svc.ruleset
        now = svc.clock.now()
        sample = ProfileSample(time.time())
        caps = profile_caps(rs, now)
        for p in sorted(rs.profiles):
            sample.sizes[p] = await store.profile_size(p, None, now)
        for p in sorted(rs.no_value):
            cap = caps.get(p)
            if cap is not None and cap.default is not None:
                sample.limits[p] = (cap.default, cap.shadow)
        for p in sorted(rs.with_value):
            await self._sample_values(p, caps.get(p), now, sample)
        self.profiles = sample
        return sample

    async def _sample_values(self, profile: str, cap: ProfileCaps | None, now: float, sample: ProfileSample) -> None:
        store = self.service.store
        named: dict[str, int] = dict.fromkeys(cap.overrides, 0) if cap else {}
        near: list[tuple[float, str, int]] = []  # min-heaps, bounded
        top: list[tuple[int, str]] = []
        count = 0
        cursor = ""
        while True:
            page = await store.profile_values(profile, now, cursor, MAX_PAGE)
            for value, size in page.items:
                count += 1
                if value in named:
                    named[value] = size
                limit = cap.limit_for(value) if cap else None
                if limit is not None and size >= self.near_limit * limit:
                    item = (size / limit if limit else float("inf"), value, size)
                    if len(near) < self.max_values:
                        heapq.heappush(near, item)
                    elif item > near[0]:
                        heapq.heapreplace(near, item)
                if self.top_n:
                    if len(top) < self.top_n:
                        heapq.heappush(top, (size, value))
                    elif (size, value) > top[0]:
                        heapq.heapreplace(top, (size, value))
            if not page.cursor:
                break
            cursor = page.cursor
            await asyncio.sleep(0)  # a big profile is walked a page per loop turn
        chosen: dict[str, tuple[int, int | None]] = {}
        budget = self.max_values

        def add(value: str, size: int) -> None:
            if value not in chosen and len(chosen) < budget:
                chosen[value] = (size, cap.limit_for(value) if cap else None)

        for _ratio, value, size in sorted(near, reverse=True):
            add(value, size)
        for value, size in sorted(named.items()):
            add(value, size)
        for size, value in sorted(top, reverse=True):
            add(value, size)
        sample.values[profile] = chosen
        sample.counts[profile] = count

    async def run(self) -> None:
        """Sample the profile sizes every `refresh` seconds (until cancelled)."""
        while True:
            try:
                await self.sample_profiles()
            except StoreError as exc:
                self.sample_errors += 1
                log.warning("metrics_sample_failed", error=str(exc))
            except Exception:
                self.sample_errors += 1
                log.exception("metrics_sample_failed")
            await asyncio.sleep(self.refresh)

    def start(self) -> None:
        """Bind to the running loop and start the sampler task."""
        self.bind()
        self.task = asyncio.create_task(self.run(), name="metrics sampler")

    async def stop(self) -> None:
        """Stop the sampler."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    # -- from any thread -------------------------------------------------------------------

    def snapshot(self, timeout: float = SNAPSHOT_TIMEOUT) -> Snapshot | None:
        """A fresh copy made on the loop; the previous one if the loop does not answer in time."""
        loop = self.loop
        if loop is None or threading.get_ident() == self.loop_thread:
            return self.take() if loop is not None else self.last
        fut: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def fill() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self.take())
                except Exception as exc:
                    fut.set_exception(exc)

        try:
            loop.call_soon_threadsafe(fill)
            return fut.result(timeout)
        except (RuntimeError, concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            fut.cancel()
            self.stale_scrapes += 1
            return self.last


# -- families --------------------------------------------------------------------------------


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _generic(prefix: str, body: Mapping[str, Any], known: set[str], labels: dict[str, str] | None = None
             ) -> Iterator[UnknownMetricFamily]:
    """Numbers a provider shows that this module has no name for: `PREFIX_KEY`, untyped."""
    for key, value in sorted(body.items()):
        if key in known or not _num(value) or not key.replace("_", "").isalnum():
            continue
        fam = UnknownMetricFamily(f"{prefix}_{key}", f"{prefix.removeprefix('callpolicy_')} {key} "
                                  "(as the stats op shows it)", labels=list(labels or {}))
        fam.add_metric(list((labels or {}).values()), value)
        yield fam


class ServiceCollector(Collector):
    """Every callpolicy_* family, from a `MetricsState`."""

    def __init__(self, state: MetricsState) -> None:
        self.state = state

    def describe(self) -> list[Any]:
        """Nothing up front: registering must not run a scrape (it would wait for the loop)."""
        return []

    def collect(self) -> Iterator[Any]:
        """Yield the metric families."""
        st = self.state
        snap = st.snapshot()
        if snap is not None:
            yield from self._service(snap)
            yield from self._store(snap)
            yield from self._notices(snap.notices)
            yield from self._providers(snap.providers)
        if st.profiles is not None:
            yield from self._profiles(st.profiles)
        yield _counter("callpolicy_metrics_stale_scrapes", "Scrapes served the previous copy: the event loop "
                       f"did not answer within {SNAPSHOT_TIMEOUT} s", st.stale_scrapes)
        yield _counter("callpolicy_metrics_sample_errors", "Profile-size samples that failed", st.sample_errors)

    # each group ------------------------------------------------------------------------------

    def _service(self, s: Snapshot) -> Iterator[Any]:
        info = GaugeMetricFamily("callpolicy_build_info", "Version of callpolicy and of the rules in force",
                                 labels=["version", "rules_version"])
        info.add_metric([__version__, s.rules_version], 1)
        yield info
        dec = CounterMetricFamily("callpolicy_decisions", "Check decisions by outcome", labels=["outcome"])
        totals = {o: 0 for o in DECISION_OUTCOMES}
        totals.update((k, v) for k, v in s.totals.items() if k != "bad_requests")
        for outcome, n in sorted(totals.items()):
            dec.add_metric([outcome], n)
        yield dec
        yield _counter("callpolicy_bad_requests", "Requests answered with an error (bad field, unknown op, "
                       "forbidden...)", s.totals.get("bad_requests", 0))
        per = CounterMetricFamily("callpolicy_rule_decisions", "Limit outcomes per rule (allow, deny, "
                                  "would_deny for shadow rules, store_allow/store_deny)", labels=["rule", "outcome"])
        for (rule, outcome), n in sorted(s.decisions.items()):
            per.add_metric([rule, outcome], n)
        yield per
        yield _counter("callpolicy_reloads", "Successful rule reloads", s.reloads)
        yield _counter("callpolicy_reload_errors", "Refused rule reloads", s.reload_errors)
        yield GaugeMetricFamily("callpolicy_rules_loaded", "Rules in force", value=s.rules_loaded)
        hist = HistogramMetricFamily("callpolicy_check_duration_seconds", "Time to answer a check, in the "
                                     "service (dry runs aside)", labels=["store"])
        hist.add_metric([s.store], s.latency.cumulative(), s.latency.sum)
        yield hist
        if s.dialogs is not None:
            for name, value in s.dialogs.to_json().items():
                if name in ("active_dialogs", "early_dialogs"):
                    yield GaugeMetricFamily(f"callpolicy_dialog_{name}", f"Kamailio-style dialog statistic {name} "
                                            "(as of the last sweep)", value=value)
                else:
                    yield CounterMetricFamily(f"callpolicy_dialog_{name}", f"Kamailio-style dialog statistic "
                                              f"{name} (as of the last sweep)", value=value)

    def _store(self, s: Snapshot) -> Iterator[Any]:
        info = s.store_info
        labels = ["store"]
        up = info.get("up", True)
        fam = GaugeMetricFamily("callpolicy_store_up", "1 if the counter store answers", labels=labels)
        fam.add_metric([s.store], 1 if up else 0)
        yield fam
        for key, doc in (("errors", "Store operations that failed"),
                         ("timeouts", "Store operations that ran out of time")):
            c = CounterMetricFamily(f"callpolicy_store_{key}", doc + " (0 for a store that cannot fail so)",
                                    labels=labels)
            c.add_metric([s.store], info.get(key, 0) if _num(info.get(key, 0)) else 0)
            yield c
        circuit = str(info.get("circuit") or ("closed" if up else "open"))
        cs = GaugeMetricFamily("callpolicy_store_circuit_state", "The store client's circuit breaker: 1 for "
                               "the state it is in (closed = calls go to the store)", labels=["store", "state"])
        for state in sorted({*CIRCUIT_STATES, circuit}):
            cs.add_metric([s.store, state], 1 if state == circuit else 0)
        yield cs
        yield from _generic("callpolicy_store", info, {"up", "errors", "timeouts", "circuit"}, {"store": s.store})

    def _notices(self, n: Mapping[str, Any]) -> Iterator[Any]:
        if not n:
            return
        yield GaugeMetricFamily("callpolicy_notices_pending", "answer/refresh/end notices waiting for the store",
                                value=n.get("pending", 0))
        docs = {"queued": "Notices the store refused, queued for a retry",
                "retried": "Tries to apply a queued notice",
                "applied_late": "Queued notices applied after a retry",
                "dropped": "Notices dropped because the queue was full",
                "gave_up": "Queued notices given up (older than any lease they concern)"}
        for key, doc in docs.items():
            if key in n:
                yield _counter(f"callpolicy_notices_{key}", doc, n[key])
        yield from _generic("callpolicy_notices", n, {"pending", *docs})

    def _providers(self, providers: Mapping[str, Any]) -> Iterator[Any]:
        for name, body in sorted(providers.items()):
            if not isinstance(body, Mapping):
                continue
            if name == "connections":
                yield from self._connections(body)
            elif name == "evapi":
                yield from self._evapi(body)
            elif name == "radius":
                yield from self._radius(body)
            elif name == "records":
                yield from self._records(body)
            elif name == "loop":
                yield from self._loop(body)
            elif name == "tasks":
                restarts = CounterMetricFamily("callpolicy_task_restarts", "Background task failures (each "
                                               "restarted)", labels=["task"])
                for task, n in sorted(body.items()):
                    restarts.add_metric([task], n)
                yield restarts
            else:
                yield from _generic(f"callpolicy_{name}", body, set())

    def _connections(self, c: Mapping[str, Any]) -> Iterator[Any]:
        if "open" in c:
            yield GaugeMetricFamily("callpolicy_connections_open", "Open stream connections", value=c["open"])
        if "accepted" in c:
            yield _counter("callpolicy_connections_accepted", "Stream connections accepted", c["accepted"])
        if "refused" in c:
            yield _counter("callpolicy_connections_refused", "Stream connections refused (max_connections)",
                           c["refused"])
        if "protocol_errors" in c:
            yield _counter("callpolicy_protocol_errors", "Connections closed for a framing error",
                           c["protocol_errors"])
        yield from _generic("callpolicy_connections", c, {"open", "accepted", "refused", "protocol_errors"})

    _EVAPI = {"connects": ("callpolicy_evapi_connects", "Connections made to the node"),
              "received": ("callpolicy_evapi_messages_received", "Messages received from the node"),
              "replied": ("callpolicy_evapi_messages_replied", "Replies sent to the node"),
              "bad_messages": ("callpolicy_evapi_bad_messages", "Messages from the node that were not valid"),
              "protocol_errors": ("callpolicy_evapi_protocol_errors", "Framing errors on the node's connection")}

    def _evapi(self, e: Mapping[str, Any]) -> Iterator[Any]:
        nodes = e.get("nodes") or {}
        yield GaugeMetricFamily("callpolicy_evapi_nodes", "Kamailio evapi nodes configured", value=len(nodes))
        yield GaugeMetricFamily("callpolicy_evapi_nodes_connected", "Kamailio evapi nodes connected",
                                value=e.get("connected", sum(1 for n in nodes.values() if n.get("connected"))))
        up = GaugeMetricFamily("callpolicy_evapi_node_up", "1 while the node's evapi connection is up",
                               labels=["node"])
        fams = {k: CounterMetricFamily(name, doc, labels=["node"]) for k, (name, doc) in self._EVAPI.items()}
        extra: list[Any] = []
        for node, body in sorted(nodes.items()):
            up.add_metric([node], 1 if body.get("connected") else 0)
            for key, fam in fams.items():
                if _num(body.get(key)):
                    fam.add_metric([node], body[key])
            extra.extend(_generic("callpolicy_evapi_node", body, {"connected", "since", *self._EVAPI},
                                  {"node": node}))
        yield up
        yield from fams.values()
        yield from _merge(extra)
        yield from _generic("callpolicy_evapi", e, {"connected"})

    def _radius(self, r: Mapping[str, Any]) -> Iterator[Any]:
        if _num(r.get("received")):
            yield _counter("callpolicy_radius_received", "RADIUS packets received", r["received"])
        req = CounterMetricFamily("callpolicy_radius_requests", "RADIUS packets by outcome (answered, "
                                  "access_accept, access_reject, acct_start, dropped, duplicates...)",
                                  labels=["outcome"])
        for key, value in sorted(r.items()):
            if key != "received" and _num(value):
                req.add_metric([key], value)
        yield req
        reasons = r.get("drop_reasons")
        if isinstance(reasons, Mapping):
            drops = CounterMetricFamily("callpolicy_radius_drops", "RADIUS packets dropped, by reason",
                                        labels=["reason"])
            for reason, n in sorted(reasons.items()):
                drops.add_metric([str(reason)], n)
            yield drops

    def _records(self, r: Mapping[str, Any]) -> Iterator[Any]:
        if _num(r.get("emitted")):
            yield _counter("callpolicy_records_emitted", "Call records made (one per ended call)", r["emitted"])
        sinks = r.get("sinks") or {}
        queued = GaugeMetricFamily("callpolicy_records_queued", "Records held by a sink, not yet delivered",
                                   labels=["sink"])
        docs = {"delivered": "Records written (file) or acknowledged with a 2xx (webhook)",
                "dropped": "Records dropped because the sink's queue was full",
                "errors": "Failed writes (file) or failed POSTs (webhook)",
                "rotations": "Record files rotated",
                "batches": "Batches the webhook acknowledged",
                "rejected": "Records the webhook refused with a 4xx (kept in the dead-letter file)",
                "spooled": "Records written to the spool file at a stop",
                "resent": "Records loaded from the spool file at a start"}
        fams = {k: CounterMetricFamily(f"callpolicy_records_{k}", doc, labels=["sink"]) for k, doc in docs.items()}
        up = GaugeMetricFamily("callpolicy_records_sink_up", "0 while a sink's last write or POST failed",
                               labels=["sink"])
        for sink, body in sorted(sinks.items()):
            if _num(body.get("queued")):
                queued.add_metric([sink], body["queued"])
            for key, fam in fams.items():
                if _num(body.get(key)):
                    fam.add_metric([sink], body[key])
            if "up" in body:
                up.add_metric([sink], 1 if body["up"] else 0)
        yield queued
        yield up
        for fam in fams.values():
            if fam.samples:
                yield fam

    def _loop(self, lp: Mapping[str, Any]) -> Iterator[Any]:
        if _num(lp.get("lag_seconds")):
            yield GaugeMetricFamily("callpolicy_loop_lag_seconds", "Event-loop lag at the last probe",
                                    value=lp["lag_seconds"])
        if _num(lp.get("lag_max_seconds")):
            yield GaugeMetricFamily("callpolicy_loop_lag_max_seconds", "Largest event-loop lag in the probe's "
                                    "window", value=lp["lag_max_seconds"])
        if _num(lp.get("stalls")):
            yield _counter("callpolicy_loop_stalls", "Probes that found the loop late by more than the "
                           "stall threshold", lp["stalls"])
        if _num(lp.get("busy_max_ms")):  # the probe's figures for people are in ms; metrics in seconds
            yield GaugeMetricFamily("callpolicy_loop_busy_max_seconds", "Most CPU the loop's thread spent "
                                    "between two probes, since start", value=lp["busy_max_ms"] / 1000.0)

    def _profiles(self, p: ProfileSample) -> Iterator[Any]:
        size = GaugeMetricFamily("callpolicy_profile_size", "Calls in a profile (all its values)",
                                 labels=["profile"])
        for name, n in sorted(p.sizes.items()):
            size.add_metric([name], n)
        yield size
        limit = GaugeMetricFamily("callpolicy_profile_limit", "The smallest cap the rules put on a no-value "
                                  "profile (shadow=\"true\" when only shadow rules cap it)",
                                  labels=["profile", "shadow"])
        for name, (cap, shadow) in sorted(p.limits.items()):
            limit.add_metric([name, "true" if shadow else "false"], cap)
        yield limit
        values = GaugeMetricFamily("callpolicy_profile_values", "Non-empty values of a with-value profile",
                                   labels=["profile"])
        for name, n in sorted(p.counts.items()):
            values.add_metric([name], n)
        yield values
        vsize = GaugeMetricFamily("callpolicy_profile_value_size", "Calls in one value of a profile (only "
                                  "values named in overrides, near their limit, or among the top N)",
                                  labels=["profile", "value"])
        vlimit = GaugeMetricFamily("callpolicy_profile_value_limit", "The cap of one value of a profile "
                                   "(for the values callpolicy_profile_value_size shows)",
                                   labels=["profile", "value"])
        for name, chosen in sorted(p.values.items()):
            for value, (vn, vcap) in sorted(chosen.items()):
                vsize.add_metric([name, value], vn)
                if vcap is not None:
                    vlimit.add_metric([name, value], vcap)
        yield vsize
        yield vlimit
        yield GaugeMetricFamily("callpolicy_profile_sample_timestamp_seconds", "When the profile sizes were "
                                "read from the store (unix time)", value=p.taken)


def _merge(families: list[Any]) -> Iterator[Any]:
    """Families of one name from several label sets (per node) as one family each."""
    by_name: dict[str, Any] = {}
    for fam in families:
        have = by_name.get(fam.name)
        if have is None:
            by_name[fam.name] = fam
        else:
            have.samples.extend(fam.samples)
    yield from by_name.values()


class MetricsServer:
    """/metrics on a thread of its own, with the process, platform and GC collectors."""

    def __init__(self, state: MetricsState, host: str, port: int) -> None:
        from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

        self.state = state
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(ServiceCollector(state))
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.where = f"{host}:{self.server.server_port}"

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def start_metrics(service: Any, host: str, port: int, settings: Any = None) -> tuple[MetricsState, MetricsServer]:
    """Start the sampler (on the running loop) and serve /metrics on HOST:PORT."""
    kw: dict[str, Any] = {}
    if settings is not None:
        kw = {"refresh": settings.metrics_refresh, "top_n": settings.metrics_top_n,
              "near_limit": settings.metrics_near_limit, "max_values": settings.metrics_max_values}
    state = MetricsState(service, **kw)
    state.start()
    return state, MetricsServer(state, host, port)

