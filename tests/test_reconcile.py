"""The reconciler against a fake dialog source and the real embedded store, on a manual clock:
releases, adds over a cap, the grace period, answered-while-down, dry runs, paging, tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from policy.auth import Peer
from policy.clock import ManualClock
from policy.errors import RequestError
from policy.reconcile import DialogDetail, DialogSourceError, LiveDialog, Reconciler
from policy.service import PolicyService
from policy.store.base import CallRecord, Page
from policy.store.embedded import EmbeddedStore

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0
N1 = "127.0.0.1:8448"


class FakeSource:
    """A node whose dialog list the test writes; records what was asked."""

    def __init__(self, name: str = N1) -> None:
        self.name = name
        self.connected = True
        self.live: dict[tuple[str, str], DialogDetail] = {}
        self.asked: list[tuple[str, str]] = []
        self.fail: str | None = None

    def put(self, call_id: str, from_tag: str = "ft", *, state: str = "active", init_ts: float = T0,
            account: str | None = "acme", token: str = "", to: str = "sip:200@example.com",
            request: dict[str, Any] | None = None) -> None:
        req = request if request is not None else {
            "op": "check", "call_id": call_id, "from_tag": from_tag, "from": f"sip:{account or 'x'}@example.com",
            "to": to, "src_ip": "192.0.2.1", **({"account": account} if account else {})}
        self.live[(call_id, from_tag)] = DialogDetail(call_id, from_tag, state, init_ts, req, token)

    async def dialogs(self) -> list[LiveDialog]:
        if self.fail:
            raise DialogSourceError(self.fail)
        return [LiveDialog(d.call_id, d.from_tag, d.state, d.init_ts) for d in self.live.values()]

    async def dialog(self, call_id: str, from_tag: str) -> DialogDetail | None:
        self.asked.append((call_id, from_tag))
        return self.live.get((call_id, from_tag))


class PagingStore(EmbeddedStore):
    """The embedded store, counting node_calls pages; `old_tokens` makes listings show a stale token."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.pages = 0
        self.old_tokens = False

    async def node_calls(self, node: str, now: float, cursor: str = "", limit: int = 1000) -> Page:
        self.pages += 1
        page = await super().node_calls(node, now, cursor, limit)
        if self.old_tokens:
            page = Page([CallRecord(**{**_fields(r), "token": "an-earlier-attempt"}) for r in page.items], page.cursor)
        return page


def _fields(rec: CallRecord) -> dict[str, Any]:
    return {name: getattr(rec, name) for name in CallRecord.__dataclass_fields__}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def store(clock: ManualClock) -> PagingStore:
    return PagingStore(clock=clock.now)


@pytest.fixture
def service(store: PagingStore, clock: ManualClock) -> PolicyService:
    return PolicyService(ROOT / "rules", store, clock=clock)


def peer(node: str = N1) -> Peer:
    return Peer("evapi", node, "proxy", name=node, node=node)


async def check(svc: PolicyService, call_id: str, from_tag: str = "ft", account: str = "acme",
                node: str = N1, to: str = "sip:200@example.com") -> dict[str, Any]:
    r = await svc.handle({"op": "check", "call_id": call_id, "from_tag": from_tag, "account": account,
                          "from": f"sip:{account}@example.com", "to": to}, peer(node))
    assert r["ok"], r
    return r


async def size(svc: PolicyService, profile: str, value: str | None = None) -> int:
    return await svc.store.profile_size(profile, value, svc.clock.now())


def reconciler(svc: PolicyService, *sources: FakeSource, **kw: Any) -> Reconciler:
    rec = Reconciler(svc, **kw)
    for s in sources:
        rec.add_source(s)
    svc.reconciler = rec
    return rec


async def test_releases_calls_the_node_no_longer_has(service: PolicyService, clock: ManualClock) -> None:
    src = FakeSource()
    ended: list[tuple[str, str]] = []
    service.on_call_end.append(lambda rec, reason, now: ended.append((rec.call_id, reason)))
    await check(service, "up")
    await check(service, "gone")
    src.put("up", init_ts=T0)
    clock.advance(30)
    rec = reconciler(service, src, grace=10)
    with capture_logs() as logs:
        report = await rec.run()
    assert await size(service, "account", "acme") == 1
    assert await service.store.get_call("gone ft", clock.now()) is None
    assert ended == [("gone", "reconciled")]
    node = report["nodes"][N1]
    assert (node["dialogs"], node["held"], node["released"], node["added"]) == (1, 2, 1, 0)
    assert node["calls"]["released"][0]["call_id"] == "gone"
    released = [e for e in logs if e["event"] == "reconciled_released"]
    assert [(e["call_id"], e["from_tag"], e["account"], e["node"]) for e in released] == [("gone", "ft", "acme", N1)]
    info = rec.info()
    assert info["runs"] == 1 and info["reconciled_released"] == 1 and info["errors"] == 0
    assert info["nodes"][N1]["released"] == 1
    # a second run finds nothing to repair
    report = await rec.run()
    assert report["released"] == report["added"] == 0


async def test_grace_spares_calls_checked_just_before_the_fetch(service: PolicyService, clock: ManualClock) -> None:
    src = FakeSource()
    rec = reconciler(service, src, grace=10)
    await check(service, "old")
    clock.advance(8)
    await check(service, "new")  # its dialog may not be in a list fetched now
    clock.advance(3)  # old: 11 s, new: 3 s
    report = await rec.run()
    assert report["released"] == 1
    assert await service.store.get_call("new ft", clock.now()) is not None
    clock.advance(8)
    assert (await rec.run())["released"] == 1
    assert await size(service, "total") == 0


async def test_adds_live_dialogs_the_store_lacks_even_over_a_cap(service: PolicyService, clock: ManualClock) -> None:
    """acme (cap 3) holds 3 calls; the node also has a 4th relayed while the service was down:
    it is counted (4/3), so the next acme check is refused until the count is back under 3."""
    src = FakeSource()
    for i in range(3):
        await check(service, f"c{i}")
        src.put(f"c{i}")
    src.put("relayed", "t9", init_ts=T0, token="")
    src.put("ringing", "t8", state="early", init_ts=T0, account="bob")
    clock.advance(20)
    rec = reconciler(service, src, grace=10)
    with capture_logs() as logs:
        report = await rec.run()
    assert report["added"] == 2
    assert await size(service, "account", "acme") == 4
    relayed = await service.store.get_call("relayed t9", clock.now())
    assert relayed is not None and relayed.state == "active" and relayed.node == N1
    assert relayed.expires == clock.now() + service.default_timeout
    ringing = await service.store.get_call("ringing t8", clock.now())
    assert ringing is not None and ringing.state == "early"
    assert ringing.expires == clock.now() + service.early_timeout
    added = {e["call_id"]: e for e in logs if e["event"] == "reconciled_added"}
    assert added["relayed"]["over_limit"] == ["account-cap:account=acme 4/3"]
    assert added["relayed"]["account"] == "acme" and added["relayed"]["fields"] == "check"
    assert added["ringing"]["over_limit"] is None
    # the cap holds against new calls
    r = await check(service, "next", "t1")
    assert r["decision"] == "deny" and r["rule"] == "account-cap"
    # the added call ends normally: no token from the proxy means any admission of that identity
    r = await service.handle({"op": "end", "call_id": "relayed", "from_tag": "t9", "reason": "bye"}, peer())
    assert r["released"] is True
    assert await size(service, "account", "acme") == 3


async def test_added_call_keeps_the_proxys_token(service: PolicyService, clock: ManualClock) -> None:
    """A dialog the store lost (snapshot, Redis) still carries its admission token in the proxy:
    the re-added call takes it, so its own notices apply and an earlier attempt's do not."""
    src = FakeSource()
    src.put("lost", init_ts=T0, token="tok-42")
    clock.advance(20)
    await reconciler(service, src, grace=10).run()
    r = await service.handle({"op": "end", "call_id": "lost", "from_tag": "ft", "token": "tok-1",
                              "reason": "failed"}, peer())
    assert r == {"ok": True, "released": False, "stale": True}
    r = await service.handle({"op": "end", "call_id": "lost", "from_tag": "ft", "token": "tok-42",
                              "reason": "bye"}, peer())
    assert r["released"] is True


async def test_answer_lost_while_down_is_repaired(service: PolicyService, clock: ManualClock) -> None:
    """Checked, then answered while the service was down: the store still says early and would
    release a call that is up after early_timeout; the run answers it."""
    src = FakeSource()
    await check(service, "a")
    src.put("a", state="active", init_ts=T0)
    clock.advance(60)
    report = await reconciler(service, src).run()
    assert report["answered"] == 1
    rec = await service.store.get_call("a ft", clock.now())
    assert rec is not None and rec.state == "active" and rec.expires == clock.now() + service.default_timeout
    clock.advance(service.early_timeout + 1)
    assert await size(service, "account", "acme") == 1


async def test_dry_run_changes_nothing(service: PolicyService, clock: ManualClock) -> None:
    src = FakeSource()
    await check(service, "gone")
    await check(service, "early")
    src.put("early", state="active")
    src.put("relayed", "t9")
    clock.advance(30)
    rec = reconciler(service, src)
    report = await rec.run(dry_run=True)
    assert report["dry_run"] is True
    assert (report["released"], report["added"], report["answered"]) == (1, 1, 1)
    assert report["nodes"][N1]["calls"]["added"][0]["over_limit"] == []
    assert await size(service, "account", "acme") == 2
    assert await service.store.get_call("relayed t9", clock.now()) is None
    still = await service.store.get_call("early ft", clock.now())
    assert still is not None and still.state == "early"
    info = rec.info()
    assert info["runs"] == 0 and info["dry_runs"] == 1
    assert info["reconciled_released"] == info["reconciled_added"] == info["reconciled_answered"] == 0
    assert info["nodes"][N1] is None  # the last real run


async def test_pages_through_the_store(service: PolicyService, store: PagingStore, clock: ManualClock) -> None:
    src = FakeSource()
    for i in range(7):
        await check(service, f"gone{i}", account=f"a{i}")
    for i in range(3):
        await check(service, f"up{i}", account=f"b{i}")
        src.put(f"up{i}", account=f"b{i}")
    clock.advance(30)
    store.pages = 0
    report = await reconciler(service, src, page=2).run()
    assert report["released"] == 7 and report["nodes"][N1]["held"] == 10
    assert store.pages >= 5
    assert await size(service, "total") == 3


async def test_only_this_nodes_calls_are_released(service: PolicyService, clock: ManualClock) -> None:
    n1, n2 = FakeSource(N1), FakeSource("127.0.0.1:9448")
    await check(service, "on-n2", node=n2.name)
    n1.put("on-n2")  # and listed by n1 too: not added again (held through another node)
    clock.advance(30)
    rec = reconciler(service, n1, n2)
    report = await rec.run(node=N1)
    assert (report["released"], report["added"]) == (0, 0)
    assert await size(service, "total") == 1
    report = await rec.run(node=n2.name)
    assert report["released"] == 1


async def test_a_later_admission_is_never_released(service: PolicyService, store: PagingStore,
                                                   clock: ManualClock) -> None:
    """The run releases with the record's own token: if a later attempt took the call over, nothing
    is released (here the listing shows an earlier attempt's token)."""
    src = FakeSource()
    await check(service, "c")
    clock.advance(30)
    store.old_tokens = True
    report = await reconciler(service, src).run()
    assert report["released"] == 0
    assert await size(service, "total") == 1


async def test_dialog_without_the_check_request(service: PolicyService, clock: ManualClock) -> None:
    """A dialog created by a config that does not keep the check: counted from its From/To."""
    src = FakeSource()
    src.put("bare", "t1", request={"from": "sip:carol@example.com", "to": "sip:0301234@example.com"})
    src.put("junk", "t2", request={"from": 42, "attrs": "nope"})
    clock.advance(30)
    with capture_logs() as logs:
        report = await reconciler(service, src).run()
    assert report["added"] == 2
    assert await size(service, "user", "carol@example.com") == 1
    assert await size(service, "type", "domestic") == 1
    assert await size(service, "account") == 0
    assert {e["fields"] for e in logs if e["event"] == "reconciled_added"} == {"dialog"}


async def test_ended_dialogs_and_vanished_details(service: PolicyService, clock: ManualClock) -> None:
    src = FakeSource()
    await check(service, "bye")
    src.put("bye", state="ended")  # dialog:end lost; Kamailio still lists it as deleted (state 5)
    src.put("vanishing", "t")
    clock.advance(30)

    async def gone(call_id: str, from_tag: str) -> DialogDetail | None:
        return None  # ended between the list and the detail

    src.dialog = gone  # type: ignore[method-assign]
    report = await reconciler(service, src).run()
    assert (report["released"], report["added"]) == (1, 0)


async def test_errors_are_reported_counted_and_never_raised(service: PolicyService) -> None:
    src = FakeSource()
    src.fail = "dlg.briefing: no answer within 30 s"
    rec = reconciler(service, src)
    with capture_logs() as logs:
        report = await rec.run()
    assert report["errors"] == 1 and "no answer" in report["nodes"][N1]["error"]
    assert rec.info()["errors"] == 1
    assert any(e["event"] == "reconcile_failed" for e in logs)
    src.fail = None
    src.connected = False
    report = await rec.run()
    assert report["nodes"][N1]["error"] == "not connected"
    with pytest.raises(RequestError):
        await rec.run(node="nowhere:1")


async def test_reconcile_op(service: PolicyService, clock: ManualClock) -> None:
    r = await service.handle({"op": "reconcile"})
    assert r["ok"] is False and r["error"]["code"] == "unavailable"
    src = FakeSource()
    await check(service, "gone")
    clock.advance(30)
    reconciler(service, src)
    r = await service.handle({"op": "reconcile", "dry_run": True, "node": N1})
    assert r["ok"] and r["released"] == 1 and r["dry_run"] is True
    r = await service.handle({"op": "reconcile", "node": "x:1"})
    assert r["ok"] is False and r["error"]["code"] == "unknown_node"
    r = await service.handle({"op": "reconcile"}, peer())
    assert r["ok"] is False and r["error"]["code"] == "forbidden"  # a proxy may not
    r = await service.handle({"op": "reconcile"})
    assert r["ok"] and r["released"] == 1


async def test_rebuild_after_data_loss(service: PolicyService, store: PagingStore, clock: ManualClock) -> None:
    """The store lost everything (a Redis restart): the rebuild counts every live dialog again."""
    up, down = FakeSource(N1), FakeSource("127.0.0.1:9448")
    down.connected = False
    for i in range(4):
        up.put(f"c{i}", f"t{i}", account="acme", token=f"tok{i}")
    clock.advance(30)
    rec = reconciler(service, up, down)
    with capture_logs() as logs:
        await rec.rebuild()
    assert await size(service, "account", "acme") == 4
    assert rec.info()["reconciled_added"] == 4 and rec.info()["errors"] == 0  # the down node is not asked
    assert [e["nodes"] for e in logs if e["event"] == "reconcile_rebuild"] == [[N1]]
    await rec.close()


async def test_loop_runs_connected_nodes_and_trigger_runs_one(service: PolicyService, clock: ManualClock) -> None:
    import asyncio

    up, down = FakeSource(N1), FakeSource("127.0.0.1:9448")
    down.connected = False
    rec = reconciler(service, up, down)
    task = asyncio.ensure_future(rec.loop(0.02))
    try:
        for _ in range(100):
            if rec.counters["runs"] >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert rec.counters["runs"] >= 3 and rec.counters["errors"] == 0  # the down node is skipped
    assert rec.info()["nodes"]["127.0.0.1:9448"] is None
    await check(service, "gone")
    clock.advance(30)
    rec.trigger(N1)
    for _ in range(100):
        if rec.counters["reconciled_released"]:
            break
        await asyncio.sleep(0.01)
    assert rec.counters["reconciled_released"] == 1
