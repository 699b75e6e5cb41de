"""The `terminate` op's own logic, in process, with proxy nodes that behave like the shipped Kamailio
config in its corner cases (the real thing end to end: tests/e2e/test_kamailio_terminate.py):
the dialog:end notice Kamailio 5.6 sometimes skips, calls admitted by no evapi node, a node error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from policy.errors import PolicyError
from policy.terminate import EndedDialog
from tests.inproc import serving


class Node:
    """A proxy node holding the service's calls admitted through it: ends a dialog like Kamailio
    (BYE when confirmed, CANCEL when early) and sends the end notice unless `skip_notice`."""

    def __init__(self, name: str, service: Any, *, skip_notice: bool = False, fail: bool = False) -> None:
        self.name = name
        self.service = service
        self.skip_notice = skip_notice
        self.fail = fail
        self.asked: list[tuple[str, str]] = []

    @property
    def connected(self) -> bool:
        return True

    async def end_dialogs(self, call_id: str, from_tag: str) -> list[EndedDialog]:
        self.asked.append((call_id, from_tag))
        if self.fail:
            raise PolicyError("dlg.dlg_list: no answer within 30 s")
        page = await self.service.store.node_calls(self.name, self.service.clock.now())
        found = [r for r in page.items if r.call_id == call_id and from_tag in ("", r.from_tag)]
        if not found:
            return []
        rec = found[0]
        action = "bye" if rec.state == "active" else "cancel"
        if not self.skip_notice:
            await self.service.handle({"op": "end", "call_id": call_id, "from_tag": rec.from_tag, "token": rec.token,
                                       "reason": "admin" if action == "bye" else "cancel"})
        return [EndedDialog(call_id, rec.from_tag, rec.state, action, "", rec.token)]


async def admit(svc: Any, node: str, call_id: str, account: str, answer: bool = True) -> None:
    from policy.auth import Peer

    peer = Peer("evapi", node, "proxy", name=node, node=node)
    r = await svc.handle({"op": "check", "call_id": call_id, "from_tag": "f", "account": account,
                          "from": f"sip:{call_id}@x", "to": "sip:1@x"}, peer)
    assert r["decision"] == "allow", r
    if answer:
        assert (await svc.handle({"op": "answer", "call_id": call_id, "from_tag": "f", "token": r["token"]},
                                 peer))["found"]


async def test_a_skipped_dialog_end_notice_is_released_with_the_dialog_token(tmp_path: Path) -> None:
    """Kamailio confirmed the BYEs but sent no dialog:end: the service releases the call itself
    (once, with the dialog's token); with the notice, it does nothing more."""
    async with serving(tmp_path) as srv:
        svc = srv.service
        quiet = Node("k1:8448", svc, skip_notice=True)
        svc.terminator.add_node(quiet)
        await admit(svc, "k1:8448", "c1", "acme")
        r = await svc.handle({"op": "terminate", "call_id": "c1"})
        assert r["ok"] and r["terminated"] == 1 and r["released"] == 1 and r["held"], r
        assert quiet.asked == [("c1", "")]
        assert await svc.store.profile_size("account", "acme", svc.clock.now()) == 0
        talking = Node("k2:8448", svc)
        svc.terminator.add_node(talking)
        await admit(svc, "k2:8448", "c2", "acme")
        r = await svc.handle({"op": "terminate", "call_id": "c2", "from_tag": "f"})
        assert r["released"] == 1 and talking.asked == [("c2", "f")]  # only the record's node is asked
        stats = await svc.store.stats(svc.clock.now())
        assert stats.active_dialogs == 0 and stats.processed_dialogs == 2


async def test_terminate_a_key_skips_calls_no_node_can_end_and_reports_errors(tmp_path: Path) -> None:
    """--profile: calls of evapi nodes are ended in them, a call checked over TCP (no node) is
    skipped (listed), a node that cannot be asked is an error; an early call is cancelled."""
    async with serving(tmp_path) as srv:
        svc = srv.service
        good, bad = Node("k1:8448", svc), Node("k2:8448", svc, fail=True)
        svc.terminator.add_node(good)
        svc.terminator.add_node(bad)
        for i in range(3):
            await admit(svc, "k1:8448", f"g{i}", "zeta", answer=i != 0)
        await admit(svc, "k2:8448", "b0", "zeta")
        r = await svc.handle({"op": "check", "call_id": "tcp0", "account": "zeta", "from": "sip:t@x", "to": "sip:1@x"})
        assert r["decision"] == "allow"
        r = await svc.handle({"op": "terminate", "profile": "account", "value": "zeta", "wait": 0.5})
        assert r["ok"], r
        assert (r["calls"], r["terminated"], r["released"], r["errors"], r["skipped"]) == (5, 3, 3, 1, 1), r
        assert r["skipped_calls"] == [{"call_id": "tcp0", "from_tag": "", "node": ""}]
        actions = sorted(d["action"] for res in r["results"] for d in res.get("dialogs", ()))
        assert actions == ["bye", "bye", "cancel"]
        assert [res["error"] for res in r["results"] if "error" in res] == ["dlg.dlg_list: no answer within 30 s"]
        assert await svc.store.profile_size("account", "zeta", svc.clock.now()) == 2  # b0 and tcp0 remain
