"""Reconciliation: each proxy's own dialog list against the store, and the repairs.

Notices get lost: Kamailio drops `dialog:end` while no service is connected, a Kamailio
restart forgets its dialogs without ending them, a call relayed fail-open during an outage
was never checked, a snapshot or a Redis node can lose calls. The proxy's dialog list is the
truth about which calls are up, so for each node (a `DialogSource`, e.g. an evapi connection
to one Kamailio) the `Reconciler`:

1. fetches the node's live dialogs (identity, state, start time - Kamailio's `dlg.briefing`);
2. pages through the calls the store holds for that node (`store.node_calls`) and
   - **releases** every call the node no longer has, once it is older than `grace` seconds
     counted back from the moment the list was fetched (a call checked just before the
     fetch may not have its dialog listed yet): `store.end(uid, now, "reconciled", token)`,
     logged `reconciled_released`, and `service.ended(...)` like any other end;
   - **answers** a call the store still holds as early while the node has it confirmed (its
     `answer` was lost): the answered-call lease from now, logged `reconciled_answered`;
3. **adds** every live dialog older than `grace` that the store holds nowhere (a call relayed
   during an outage, a lost snapshot): its fields come from the node (`DialogSource.dialog`,
   the check request the proxy kept with the dialog), the rules give its plan, and it is
   reserved with `force=True` - even over a cap, because the call is real - with the token the
   proxy holds for it (or a new one), answered if the dialog is confirmed; logged
   `reconciled_added` with the limits it exceeds.

A run never holds the event loop for long: the store is paged (`page` calls at a time) with a
yield between pages, and details are fetched `window` at a time. Every repair uses the
record's own token, so a later admission of the same identity is never touched. `dry_run`
reports what would be repaired and changes nothing. A run per node at a time; counters and
the last run of each node are in `info()` (the `reconcile` section of `stats`).

What is still possible: a call whose dialog the node lists but whose notices were lost stays
held until its dialog ends and the next run sees it gone (at most one interval late); a call
created in the `grace` window before a fetch is looked at by the next run; two nodes sharing a
node name would hide each other's calls (node names are the addresses in `[evapi] nodes`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import structlog

from policy import protocol as P
from policy.errors import PolicyError, RequestError, StoreError
from policy.store.base import MAX_PAGE, CallInfo, CallRecord, call_uid

if TYPE_CHECKING:
    from policy.service import PolicyService

log = structlog.get_logger("policy.reconcile")

#: How many repairs of each kind a run reports in full (the counters count them all).
REPORT_CALLS = 100


class DialogSourceError(PolicyError):
    """A node could not give its dialog list (not connected, timed out, refused)."""


class LiveDialog(NamedTuple):
    """One dialog as the node lists it."""

    call_id: str
    from_tag: str
    state: str  # "early" (not answered yet), "active" (confirmed) or "ended" (being deleted)
    init_ts: float  # when the node created it (the node's clock, seconds since the epoch)

    @property
    def uid(self) -> str:
        """The call's identity as the store spells it."""
        return call_uid(self.call_id, self.from_tag)


class DialogDetail(NamedTuple):
    """What the node knows about one dialog, enough to count it like its check would have."""

    call_id: str
    from_tag: str
    state: str
    init_ts: float
    request: dict[str, Any]  # the check's fields (from, to, ruri, src_ip, account, attrs)
    token: str = ""  # the admission token the node keeps with the dialog ("" if none)


class DialogSource(Protocol):
    """A proxy node whose dialog list can be read (the evapi connection to a Kamailio)."""

    name: str

    @property
    def connected(self) -> bool:
        """Whether the node can be asked now."""
        ...

    async def dialogs(self) -> list[LiveDialog]:
        """Every dialog the node holds (raises DialogSourceError)."""
        ...

    async def dialog(self, call_id: str, from_tag: str) -> DialogDetail | None:
        """One dialog in full, or None if the node no longer has it (raises DialogSourceError)."""
        ...


class Reconciler:
    """Repairs the store from the proxies' dialog lists; see the module docstring."""

    def __init__(self, service: PolicyService, *, grace: float = 10.0, page: int = MAX_PAGE,
                 window: int = 32) -> None:
        self.service = service
        self.grace = grace
        self.page = max(1, min(page, MAX_PAGE))
        self.window = max(1, window)
        self.sources: dict[str, DialogSource] = {}
        self.counters: Counter[str] = Counter()
        self.last: dict[str, dict[str, Any]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- nodes ----------------------------------------------------------------------------

    def add_source(self, source: DialogSource) -> None:
        """Reconcile this node from now on."""
        self.sources[source.name] = source
        self._locks.setdefault(source.name, asyncio.Lock())

    def trigger(self, name: str) -> None:
        """Start a run of one node in the background (e.g. right after it (re)connected)."""
        task = asyncio.get_running_loop().create_task(self._quiet(name), name=f"reconcile {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quiet(self, name: str) -> None:
        source = self.sources.get(name)
        if source is not None:
            await self.run_node(source)

    # -- runs -----------------------------------------------------------------------------

    async def run(self, node: str | None = None, dry_run: bool = False) -> dict[str, Any]:
        """Reconcile one node, or every node; the report of each (the `reconcile` op's reply)."""
        if node is not None:
            source = self.sources.get(node)
            if source is None:
                raise RequestError("unknown_node", f"unknown node {node!r} (known: {', '.join(self.sources)})")
            chosen: Iterable[DialogSource] = [source]
        else:
            chosen = list(self.sources.values())
        reports = await asyncio.gather(*(self.run_node(s, dry_run) for s in chosen))
        totals: Counter[str] = Counter()
        for r in reports:
            for k in ("released", "added", "answered"):
                totals[k] += r.get(k, 0)
        return {"dry_run": dry_run, "nodes": {r["node"]: r for r in reports},
                "released": totals["released"], "added": totals["added"], "answered": totals["answered"],
                "errors": sum(1 for r in reports if "error" in r)}

    async def rebuild(self) -> None:
        """Reconcile every connected node now (the store lost data: `store.on_data_loss`)."""
        connected = [s for s in self.sources.values() if s.connected]
        log.warning("reconcile_rebuild", nodes=[s.name for s in connected])
        await asyncio.gather(*(self.run_node(s) for s in connected))

    async def loop(self, interval: float) -> None:
        """Reconcile every connected node every `interval` seconds (until cancelled); a node that
        is being reconciled already (e.g. it just reconnected) is left to that run."""
        while True:
            await asyncio.sleep(interval)
            due = [s for name, s in list(self.sources.items())
                   if s.connected and not self._locks[name].locked()]
            await asyncio.gather(*(self.run_node(s) for s in due))

    async def close(self) -> None:
        """Cancel the runs started by `trigger`."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run_node(self, source: DialogSource, dry_run: bool = False) -> dict[str, Any]:
        """One run against one node; never raises (an error is logged, counted and reported)."""
        name = source.name
        async with self._locks.setdefault(name, asyncio.Lock()):
            report: dict[str, Any] = {"node": name, "dry_run": dry_run, "at": self.service.clock.now()}
            t0 = time.perf_counter()
            try:
                if not source.connected:
                    raise DialogSourceError("not connected")
                await self._run(source, dry_run, report)
            except (DialogSourceError, StoreError) as exc:
                report["error"] = str(exc) or type(exc).__name__
                self.counters["errors"] += 1
                log.warning("reconcile_failed", node=name, error=report["error"], dry_run=dry_run or None)
            except Exception as exc:  # a bug: report, log, keep the loop alive
                report["error"] = f"internal error: {type(exc).__name__}"
                self.counters["errors"] += 1
                log.exception("reconcile_failed", node=name)
            report["duration_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            self.counters["dry_runs" if dry_run else "runs"] += 1
            if not dry_run:
                self.last[name] = {k: v for k, v in report.items() if k not in ("calls",)}
            if "error" not in report and (report["released"] or report["added"] or report["answered"]):
                log.info("reconciled", node=name, dialogs=report["dialogs"], held=report["held"],
                         released=report["released"], added=report["added"], answered=report["answered"],
                         dry_run=dry_run or None, duration_ms=report["duration_ms"])
            return report

    async def _run(self, source: DialogSource, dry_run: bool, report: dict[str, Any]) -> None:
        svc = self.service
        store = svc.store
        node = source.name
        fetched_at = svc.clock.now()
        t0 = time.perf_counter()
        listed = await source.dialogs()
        report["fetch_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        live: dict[str, LiveDialog] = {}
        for d in listed:
            if d.state != "ended":
                live[d.uid] = d
        report.update(dialogs=len(live), held=0, released=0, added=0, answered=0,
                      calls={"released": [], "added": [], "answered": []})
        cutoff = fetched_at - self.grace
        held: set[str] = set()
        cursor = ""
        while True:
            now = svc.clock.now()
            page = await store.node_calls(node, now, cursor, self.page)
            for rec in page.items:
                held.add(rec.uid)
                found = live.get(rec.uid)
                if found is None:
                    if rec.init_ts <= cutoff:
                        await self._release(rec, node, dry_run, report)
                elif found.state == "active" and rec.state == "early":
                    await self._answer(rec, node, dry_run, report)
            report["held"] += len(page.items)
            if not page.cursor:
                break
            cursor = page.cursor
            await asyncio.sleep(0)
        missing = [d for uid, d in live.items() if uid not in held and d.init_ts <= cutoff]
        for i in range(0, len(missing), self.window):
            batch = missing[i:i + self.window]
            await asyncio.gather(*(self._add(source, d, dry_run, report) for d in batch))
            await asyncio.sleep(0)

    # -- repairs --------------------------------------------------------------------------

    def _note(self, report: dict[str, Any], kind: str, entry: dict[str, Any], dry_run: bool) -> None:
        report[kind] += 1
        if len(report["calls"][kind]) < REPORT_CALLS:
            report["calls"][kind].append(entry)
        if not dry_run:
            self.counters["reconciled_" + kind] += 1

    async def _release(self, rec: CallRecord, node: str, dry_run: bool, report: dict[str, Any]) -> None:
        entry = {"call_id": rec.call_id, "from_tag": rec.from_tag, "account": rec.account, "state": rec.state}
        if not dry_run:
            now = self.service.clock.now()
            gone = await self.service.store.end(rec.uid, now, "reconciled", rec.token or None)
            if gone is None or (rec.token and gone.token != rec.token):
                return  # ended meanwhile, or taken over by a later admission: nothing to repair
            self.service.ended(gone, "reconciled", now)
        log.info("reconciled_released", node=node, call_id=rec.call_id, from_tag=rec.from_tag or None,
                 account=rec.account or None, state=rec.state, age=round(report["at"] - rec.init_ts, 1),
                 reason="the node no longer has this dialog", dry_run=dry_run or None)
        self._note(report, "released", entry, dry_run)

    async def _answer(self, rec: CallRecord, node: str, dry_run: bool, report: dict[str, Any]) -> None:
        svc = self.service
        if not dry_run:
            got = await svc.store.answer(rec.uid, svc.clock.now(), svc.default_timeout, rec.token or None)
            if got is None or got.state != "active":
                return
        log.info("reconciled_answered", node=node, call_id=rec.call_id, from_tag=rec.from_tag or None,
                 account=rec.account or None, reason="the node has this dialog confirmed",
                 dry_run=dry_run or None)
        self._note(report, "answered", {"call_id": rec.call_id, "from_tag": rec.from_tag,
                                        "account": rec.account}, dry_run)

    async def _add(self, source: DialogSource, d: LiveDialog, dry_run: bool, report: dict[str, Any]) -> None:
        svc = self.service
        store = svc.store
        if await store.get_call(d.uid, svc.clock.now()) is not None:
            return  # held, through another node or since the page was read
        detail = await source.dialog(d.call_id, d.from_tag)
        if detail is None or detail.state == "ended":
            return
        req = self._request(detail)
        try:
            fields = svc.call_fields(req)
            fields["node"] = source.name  # the node that really has the call
        except RequestError as exc:
            log.warning("reconcile_skipped", node=source.name, call_id=d.call_id, from_tag=d.from_tag or None,
                        error=exc.message)
            return
        plan = svc.ruleset.evaluate(fields).plan
        call = CallInfo(d.call_id, fields.get("from", ""), fields.get("to", ""), fields.get("account", ""),
                        d.from_tag, source.name, None)
        token = detail.token or svc.new_token()
        answered = detail.state == "active"
        sizes = [0] * len(plan)
        if not dry_run:
            now = svc.clock.now()
            timeout = svc.default_timeout if answered else svc.early_timeout
            res = await store.reserve(call, plan, now, timeout, token, force=True)
            if res.duplicate or res.conflict or not res.admitted:
                return  # someone counted it meanwhile
            sizes = res.sizes
            if answered:
                await store.answer(d.uid, now, svc.default_timeout, token)
        else:
            sizes = [await store.profile_size(e.profile, e.value, svc.clock.now()) + 1 for e in plan]
        over = [f"{e.rule}:{e.profile}{'=' + e.value if e.value is not None else ''} {sizes[i]}/{e.limit}"
                for i, e in enumerate(plan) if e.limit is not None and not e.shadow and sizes[i] > e.limit]
        log.info("reconciled_added", node=source.name, call_id=d.call_id, from_tag=d.from_tag or None,
                 account=call.account or None, state="active" if answered else "early",
                 fields="check" if detail.request.get("op") == "check" else "dialog",
                 over_limit=over or None, reason="the node has this dialog and the store did not",
                 dry_run=dry_run or None)
        self._note(report, "added", {"call_id": d.call_id, "from_tag": d.from_tag, "account": call.account,
                                     "state": "active" if answered else "early", "over_limit": over}, dry_run)

    @staticmethod
    def _request(detail: DialogDetail) -> P.Check:
        """The check the proxy kept with the dialog, held to the dialog's own identity."""
        data = {k: v for k, v in detail.request.items() if k in _CHECK_FIELDS and isinstance(v, str | dict)}
        data.update(op="check", call_id=detail.call_id, from_tag=detail.from_tag)
        try:
            req = P.from_dict(data)
        except RequestError:
            req = P.from_dict({"op": "check", "call_id": detail.call_id, "from_tag": detail.from_tag,
                               **{k: data[k] for k in ("from", "to") if isinstance(data.get(k), str)}})
        assert isinstance(req, P.Check)
        return req

    # -- reporting --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Counters and the last run of each node (for `stats`)."""
        return {"grace": self.grace,
                **{k: self.counters[k] for k in ("runs", "dry_runs", "errors", "reconciled_released",
                                                 "reconciled_added", "reconciled_answered")},
                "nodes": {name: self.last.get(name) for name in self.sources}}


_CHECK_FIELDS = frozenset({"from", "to", "ruri", "from_user", "from_domain", "to_user", "to_domain", "ruri_user",
                           "ruri_domain", "account", "src_ip", "attrs"})


def data_loss_hook(reconciler: Reconciler) -> Callable[[], Awaitable[None]]:
    """The callback a store calls when it lost its data (`store.on_data_loss`)."""
    return reconciler.rebuild
