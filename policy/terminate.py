"""Ending calls in the proxy: the `terminate` op asks the Kamailio that admitted a call to end it.

`callpolicy end` only releases counts; a call whose counts are released is still up in the
proxy. `terminate` cuts the call itself (an abusive account, a fraud pattern): the service
finds which node holds the dialog - the `node` of the call's record, or, when the store does
not hold it under the identity given (no From-tag given, a notice lost), every connected
node - and asks it to end the dialog (`DialogEnder.end_dialogs`; over evapi: `dlg.dlg_list`
to read the dialog, then `dlg.terminate_dlg` - a BYE to both sides - for a confirmed dialog,
`tm.cancel` - a CANCEL to the callee, a 487 to the caller - for an early one).

The counts are released by the node's own notices (`dialog:end` / `dialog:failed`), as for any
call that ends; `terminate` waits up to `wait` seconds for them and says which calls the
store no longer holds. One notice Kamailio 5.6 can skip: `dlg.terminate_dlg` sends the BYE
to the caller first, and when the caller's 200 comes back (handled by another process) before
the BYE to the callee is sent, the dialog is already deleted when `dlg_bye_all` would run
`event_route[dialog:end]`, so it does not (seen in about one run in 20 on loopback). So once the
node confirmed the BYEs, the service ends the call itself with the dialog's own token
(`store.end` is exactly-once: whichever of the notice and this comes second changes nothing).
An early call's release waits for its 487 (`dialog:failed`); a notice that never arrives is
repaired by the next reconciliation, like any lost notice.

For every call in a profile key, the store's listing is paged, each call's node asked
(`WINDOW` at a time), and calls admitted by something that cannot end a dialog (RADIUS, the
CLI) are counted in `skipped` - `callpolicy end --profile` releases those.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import structlog

from policy.errors import PolicyError, RequestError
from policy.store.base import MAX_PAGE, CallRecord, call_uid

if TYPE_CHECKING:
    from policy.service import PolicyService

log = structlog.get_logger("policy.terminate")

#: Calls asked to end at once when terminating a profile key.
WINDOW = 16
#: How many calls a reply lists in full (the counters count them all).
REPORT_CALLS = 100
#: How long a confirmed dialog's `dialog:end` notice is waited for before the service releases
#: the call itself (the notice is sent before the RPC's reply: it is normally already there).
NOTICE_GRACE = 0.5


class EndError(PolicyError):
    """A node could not be asked, or refused (not connected, timed out, RPC error)."""


class EndedDialog(NamedTuple):
    """One dialog a node was asked to end."""

    call_id: str
    from_tag: str
    state: str  # the dialog's state before: "early", "active" or "ended" (already ending)
    action: str  # "bye" (dlg.terminate_dlg), "cancel" (tm.cancel) or "none" (already ending)
    error: str = ""  # the node's error for this dialog ("" when it was asked successfully)
    token: str = ""  # the admission token the node keeps with the dialog ($dlg_var(cp_token))

    @property
    def uid(self) -> str:
        """The call's identity as the store spells it."""
        return call_uid(self.call_id, self.from_tag)


class DialogEnder(Protocol):
    """A proxy node that can end its dialogs (an evapi connection to a Kamailio)."""

    name: str

    @property
    def connected(self) -> bool:
        """Whether the node can be asked now."""
        ...

    async def end_dialogs(self, call_id: str, from_tag: str) -> list[EndedDialog]:
        """End the node's dialogs with this Call-ID (and From-tag, unless ""); [] when it has
        none. Raises `EndError` when the node cannot be asked."""
        ...


class Terminator:
    """The `terminate` op: which node holds a call, asking it, waiting for the releases."""

    def __init__(self, service: PolicyService, *, window: int = WINDOW) -> None:
        self.service = service
        self.window = max(1, window)
        self.nodes: dict[str, DialogEnder] = {}
        self.counters = {"calls": 0, "dialogs": 0, "errors": 0}

    def add_node(self, node: DialogEnder) -> None:
        """Calls admitted through this node can be terminated from now on."""
        self.nodes[node.name] = node

    def remove_node(self, name: str) -> None:
        """Forget a node (its connector stopped)."""
        self.nodes.pop(name, None)

    def _require_nodes(self) -> None:
        if not self.nodes:
            raise RequestError("unavailable", "no proxy can end calls: terminate needs Kamailio nodes in "
                                              "[evapi] nodes (use `end` to release counts only)")

    async def _ask(self, name: str, call_id: str, from_tag: str, by: str | None = None) -> dict[str, Any]:
        node = self.nodes.get(name)
        if node is None:
            return {"node": name, "error": f"{name!r} is not an evapi node: it cannot end dialogs"}
        if not node.connected:
            return {"node": name, "error": "not connected"}
        try:
            dialogs = await node.end_dialogs(call_id, from_tag)
        except PolicyError as exc:
            self.counters["errors"] += 1
            return {"node": name, "error": str(exc)}
        self.counters["dialogs"] += sum(1 for d in dialogs if not d.error)
        for d in dialogs:
            if d.action == "bye" and not d.error:
                await self._bye_sent(d, name, by)
        return {"node": name, "dialogs": [{k: v for k, v in d._asdict().items() if k != "token"} for d in dialogs]}

    async def _bye_sent(self, d: EndedDialog, node: str, by: str | None) -> None:
        """The node sent BYE both ways: the call is over. Its `dialog:end` notice (sent before the
        RPC's reply) normally releases it at once; when Kamailio skipped that notice, end it here
        with the dialog's token."""
        if await self._released([d.uid], NOTICE_GRACE):
            return
        svc = self.service
        now = svc.clock.now()
        rec = await svc.store.end(d.uid, now, "admin", d.token or None)
        if rec is not None:
            log.info("terminate_released", call_id=d.call_id, from_tag=d.from_tag or None, node=node,
                     why=f"no dialog:end notice from the node within {NOTICE_GRACE:g} s")
            svc.ended(rec, "admin", now, by=by or None)

    async def _released(self, uids: list[str], wait: float) -> set[str]:
        """The uids the store no longer holds, waiting up to `wait` seconds for the rest."""
        store, clock = self.service.store, self.service.clock
        pending = list(dict.fromkeys(uids))
        gone: set[str] = set()
        deadline = time.monotonic() + wait
        while pending:
            still = []
            for uid in pending:
                if await store.get_call(uid, clock.now()) is None:
                    gone.add(uid)
                else:
                    still.append(uid)
            pending = still
            if not pending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        return gone

    async def call(self, call_id: str, from_tag: str | None, wait: float, by: str | None) -> dict[str, Any]:
        """End one call (with `from_tag` None: every dialog with this Call-ID) in its proxy."""
        self._require_nodes()
        self.counters["calls"] += 1
        now = self.service.clock.now()
        rec = await self.service.store.get_call(call_uid(call_id, from_tag or ""), now)
        if rec is not None and rec.node in self.nodes:
            names = [rec.node]
        else:
            # not held under that identity, or admitted by no evapi node: whoever has the dialog
            names = [n for n, node in self.nodes.items() if node.connected]
        reports = await asyncio.gather(*(self._ask(n, call_id, from_tag or "", by) for n in names))
        ended = [d for r in reports for d in r.get("dialogs", ()) if not d["error"]]
        uids = [call_uid(d["call_id"], d["from_tag"]) for d in ended]
        if rec is not None:
            uids.append(rec.uid)
        gone = await self._released(uids, wait) if ended else set()
        for r in reports:
            for d in r.get("dialogs", ()):
                d["released"] = call_uid(d["call_id"], d["from_tag"]) in gone
        held = rec is not None or bool(gone)
        body: dict[str, Any] = {"call_id": call_id, "held": held, "nodes": list(reports),
                                "terminated": len(ended), "released": len(gone)}
        if rec is not None and rec.node not in self.nodes:
            body["admitted_by"] = rec.node
        log.info("call_terminate", call_id=call_id, from_tag=from_tag, held=held, nodes=names,
                 terminated=len(ended), released=len(gone),
                 errors=[r["error"] for r in reports if "error" in r] or None, by=by or None)
        return body

    async def key(self, profile: str, value: str | None, wait: float, by: str | None) -> dict[str, Any]:
        """End every call in a profile key in its proxy."""
        self._require_nodes()
        store, clock = self.service.store, self.service.clock
        seen: set[str] = set()
        skipped: list[CallRecord] = []
        asked: list[dict[str, Any]] = []
        ended_uids: list[str] = []
        errors = 0
        sem = asyncio.Semaphore(self.window)

        async def one(rec: CallRecord) -> None:
            nonlocal errors
            async with sem:
                report = await self._ask(rec.node, rec.call_id, rec.from_tag, by)
            report.update(call_id=rec.call_id, from_tag=rec.from_tag)
            if "error" in report:
                errors += 1
            else:
                dialogs = report["dialogs"]
                if any(not d["error"] for d in dialogs):
                    ended_uids.append(rec.uid)
                elif not dialogs:
                    report["error"] = "the node has no such dialog (reconciliation releases it)"
                    errors += 1
            if len(asked) < REPORT_CALLS:
                asked.append(report)

        cursor = ""
        while True:
            page = await store.profile_list(profile, value, clock.now(), cursor, MAX_PAGE)
            todo: list[Awaitable[None]] = []
            for rec in page.items:
                if rec.uid in seen:
                    continue
                seen.add(rec.uid)
                if rec.node in self.nodes:
                    todo.append(one(rec))
                else:
                    skipped.append(rec)
            await asyncio.gather(*todo)
            if not page.cursor:
                break
            cursor = page.cursor
        gone = await self._released(ended_uids, wait) if ended_uids else set()
        self.counters["calls"] += len(seen)
        log.info("profile_terminate", profile=profile, value=value, calls=len(seen), terminated=len(ended_uids),
                 released=len(gone), skipped=len(skipped), errors=errors, by=by or None)
        return {"profile": profile, "value": value, "calls": len(seen), "terminated": len(ended_uids),
                "released": len(gone), "errors": errors, "skipped": len(skipped),
                "skipped_calls": [{"call_id": r.call_id, "from_tag": r.from_tag, "node": r.node}
                                  for r in skipped[:REPORT_CALLS]],
                "results": asked}

    def info(self) -> dict[str, Any]:
        """Counters for `stats`."""
        return {"nodes": sorted(self.nodes), **self.counters}

