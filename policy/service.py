"""The policy service: dispatches the protocol's operations to the rules, the decision and the store.

Transports hand every message to `handle_payload(payload, peer)` (or a decoded request to
`handle(req, peer)`) and send back the dict it returns. Neither ever raises: every failure
becomes an error reply. What a decision is lives in `policy.decision`; notices the store
refused wait in `policy.notices`; the repair against the proxies' dialog lists lives in
`policy.reconcile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import operator
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from policy import decision, logs
from policy import protocol as P
from policy.auth import LOCAL, Peer, Tokens
from policy.caps import ProfileCaps, profile_caps
from policy.clock import Clock, SystemClock
from policy.errors import RequestError, RuleError, StoreError
from policy.latency import LatencyHistogram
from policy.notices import Notice, NoticeQueue
from policy.plan import PlanEntry, RateEntry
from policy.preview import Preview, PreviewResult
from policy.ratelimit_log import RateLimitedLog
from policy.rules import REQUEST_FIELDS, Ruleset, load_rules, request_fields, rule_files
from policy.store.base import MAX_PAGE, CallInfo, CallRecord, CounterStore, DialogStats, ReserveResult, call_uid
from policy.terminate import Terminator

log = structlog.get_logger("policy.service")

#: The protocol's CallFields attributes of the rule fields `REQUEST_FIELDS`, in that order
#: (`from` is a keyword: the attribute is `from_`), read in one call.
_field_values = operator.attrgetter(*("from_" if name == "from" else name for name in REQUEST_FIELDS))
Handler = Callable[[Any, Peer], Awaitable[dict[str, Any]]]
#: Ends the proxy reports (BYE, CANCEL, a failure); any other reason is a release we decided.
PROXY_END_REASONS = frozenset({"bye", "cancel", "failed"})
#: `top`: most per-value sizes one refresh reads (over every with-value profile), and how long
#: a computed overview of the profiles is reused (several `top` screens cost one walk).
TOP_SCAN_MAX = 100_000
TOP_CACHE_SECONDS = 0.9
#: The reload preview's log line lists at most this many over-limit keys (most over first).
PREVIEW_LOG_ITEMS = 20


#: Request fields the `decision` line carries (when the check had them).
_LOG_FIELDS = ("from_user", "to_user", "src_ip")
_perf_counter = time.perf_counter


def _debug_enabled() -> bool:
    """Whether this process logs at debug level (structlog's filtering level, as configured now:
    a fresh logger, not the module's, which may have been bound before the configuration)."""
    try:
        return bool(structlog.get_logger("policy.service").is_enabled_for(logging.DEBUG))
    except AttributeError:  # a logger without levels: it logs everything
        return True


_decode = P.decode


def _reply(req: P.Request, body: dict[str, Any]) -> dict[str, Any]:
    """A success reply: the request's id/tindex/tlabel, `ok`, then the op's body."""
    if req.tindex is None and req.tlabel is None:
        if req.id is None:
            return {"ok": True, **body}
        return {"id": req.id, "ok": True, **body}
    reply = P.echo(req)
    reply["ok"] = True
    reply.update(body)
    return reply


class Limits:
    """Bounds on what a client may ask for (issue: nobody who reaches a socket changes the counts)."""

    def __init__(self, max_field: int = 1024, max_vars: int = 32, max_timeout: float = 43200.0) -> None:
        self.max_field = max_field
        self.max_vars = max_vars
        self.max_timeout = max_timeout


class PolicyService:
    """The service: rules, a store, stats, and the protocol's operations."""

    def __init__(
        self,
        rules_path: str | Path,
        store: CounterStore,
        *,
        clock: Clock | None = None,
        early_timeout: float = 300.0,
        default_timeout: float = 43200.0,
        ruleset: Ruleset | None = None,
        limits: Limits | None = None,
        tokens: Tokens | None = None,
    ) -> None:
        self.rules_path = Path(rules_path)
        self.store = store
        self.clock = clock or SystemClock()
        self.early_timeout = early_timeout
        self.default_timeout = default_timeout
        self.limits = limits or Limits(max_timeout=default_timeout)
        self.tokens = tokens or Tokens([])
        self.ruleset = self._fit(ruleset if ruleset is not None else load_rules(self.rules_path))
        self.started = time.time()
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.totals: Counter[str] = Counter()
        self.reloads = 0
        self.reload_errors = 0
        self.last_reload_error: str | None = None
        self.info_providers: dict[str, Callable[[], Any]] = {}
        self.log_decision = logs.hot_event("policy.service", "decision")
        #: Log `decision_explained` (every rule, whether it matched and why) for every check: only
        #: at debug level, decided once here, so the hot path pays one attribute test otherwise.
        self.explain_decisions = _debug_enabled()
        self.log_end = logs.hot_event("policy.service", "call_end", "debug")
        self.warnings = RateLimitedLog(log)  # what clients can cause: one line per interval, with a count
        self.last_dialogs: DialogStats | None = None  # refreshed by the sweep loop, for /metrics
        self.check_latency = LatencyHistogram()  # every check's service time (dry runs aside), for /metrics
        self.notices = NoticeQueue(store, self.clock.now, max_age=max(default_timeout, self.limits.max_timeout),
                                   on_end=self.ended)
        self.reconciler: Any = None  # policy.reconcile.Reconciler, when proxies can be asked
        self.terminator = Terminator(self)  # evapi nodes register with it: `terminate` ends calls in them
        self.last_preview: PreviewResult | None = None
        self._preview_task: asyncio.Task[PreviewResult | None] | None = None
        self._caps: tuple[tuple[str, float], dict[str, ProfileCaps]] | None = None
        self._top_cache: tuple[float, int, dict[str, Any]] | None = None
        self.on_call_end: list[Callable[[CallRecord, str, float], None]] = []
        self._watch_sig: tuple[tuple[str, int, int], ...] | None = None
        # admission tokens: unique per process start and per admission, short on the wire
        self._token_prefix = os.urandom(3).hex()
        self._token_seq = itertools.count(1)
        self._ops: dict[type, Handler] = {
            P.Check: self.op_check,
            P.Answer: self.op_answer,
            P.Refresh: self.op_refresh,
            P.End: self.op_end,
            P.SetVar: self.op_set_var,
            P.Ping: self.op_ping,
            P.Auth: self.op_auth,
            P.Stats: self.op_stats,
            P.ProfileSize: self.op_profile_size,
            P.ProfileList: self.op_profile_list,
            P.ProfileValues: self.op_profile_values,
            P.Release: self.op_release,
            P.Reload: self.op_reload,
            P.Reconcile: self.op_reconcile,
            P.Top: self.op_top,
            P.Terminate: self.op_terminate,
        }

    # -- entry points ---------------------------------------------------------------------

    async def handle_payload(self, payload: bytes, peer: Peer = LOCAL) -> dict[str, Any]:
        """Answer the bytes of one message; never raises.

        The path of every request: `handle`'s steps written out here (one coroutine less).
        """
        try:
            req = _decode(payload)
        except RequestError as exc:
            echoed = P.echo_of(payload)
            self.warnings.warning("bad_request", op=echoed.get("op"), code=exc.code, error=exc.message,
                        transport=peer.transport, peer=peer.address)
            self.totals["bad_requests"] += 1
            return P.error(exc.code, exc.message, echoed)
        try:
            role = peer.role
            if role != "admin" and (role is None or role != req.ROLE) and not isinstance(req, P.Auth):
                self._refuse(req, peer)
            body = await self._ops[type(req)](req, peer)
        except Exception as exc:
            return self._failed(req, peer, exc)
        return _reply(req, body)

    async def handle(self, req: P.Request | dict[str, Any], peer: Peer = LOCAL) -> dict[str, Any]:
        """Answer one request; never raises. A dict is decoded first (tests, adapters)."""
        if isinstance(req, dict):
            raw = req
            try:
                req = P.from_dict(raw)
            except RequestError as exc:
                self.totals["bad_requests"] += 1
                return P.error(exc.code, exc.message, raw)
        try:
            if not peer.may(req.ROLE) and not isinstance(req, P.Auth):
                self._refuse(req, peer)
            body = await self._ops[type(req)](req, peer)
        except Exception as exc:
            return self._failed(req, peer, exc)
        return _reply(req, body)

    @staticmethod
    def _refuse(req: P.Request, peer: Peer) -> None:
        """Raise the error for a request this peer's role may not send."""
        if peer.role is None:
            raise RequestError("unauthenticated", "send {\"op\":\"auth\",\"token\":...} first")
        if peer.transport == "udp":
            raise RequestError("forbidden", f"op {req.op!r} is not served over UDP (proxy ops only): "
                                            "ask over TCP or the Unix socket")
        raise RequestError("forbidden", f"op {req.op!r} needs the {req.ROLE} role "
                                        f"(this connection has {peer.role})")

    def _failed(self, req: P.Request, peer: Peer, exc: Exception) -> dict[str, Any]:
        """The error reply for a request whose op raised (logged: a bad request, the store, a bug)."""
        reply = P.echo(req)
        if isinstance(exc, RequestError):
            self.warnings.warning("bad_request", op=req.op, code=exc.code, error=exc.message,
                        transport=peer.transport, peer=peer.address)
            self.totals["bad_requests"] += 1
            return P.error(exc.code, exc.message, reply)
        if isinstance(exc, StoreError):
            log.warning("store_error", op=req.op, error=str(exc))
            return P.error("store_error", str(exc), reply)
        # a bug: answer, log, keep serving
        log.exception("internal_error", op=req.op)  # called inside the except: the traceback is there
        return P.error("internal", f"internal error: {type(exc).__name__}", reply)

    # -- check ----------------------------------------------------------------------------

    def _bounded(self, name: str, value: str) -> str:
        if len(value) > self.limits.max_field:
            raise RequestError("bad_field", f"{name!r} is longer than {self.limits.max_field} characters")
        return value

    def call_fields(self, req: P.CallFields, peer: Peer | None = None) -> dict[str, str]:
        """The rule-visible fields of a call (`policy.rules.request_fields`), lengths bounded;
        `node` is where it came from (the peer's node, else its token's name)."""
        if len(req.from_tag) > self.limits.max_field:
            self._bounded("from_tag", req.from_tag)
        node = (peer.node or peer.name) if peer is not None and peer is not LOCAL else ""
        return request_fields(req.call_id, zip(REQUEST_FIELDS, _field_values(req), strict=True), req.attrs,
                              self.limits.max_field, node)

    def _vars(self, given: dict[str, str] | None) -> dict[str, str] | None:
        if not given:
            return None
        if len(given) > self.limits.max_vars:
            raise RequestError("bad_field", f"'vars' holds more than {self.limits.max_vars} variables")
        for k, v in given.items():
            self._bounded(f"vars.{k}", k)
            self._bounded(f"vars.{k}", v)
        return given

    def new_token(self) -> str:
        """A token naming one admission (unique across restarts and instances)."""
        return f"{self._token_prefix}{next(self._token_seq):x}"

    def _timeout(self, given: float | None) -> float:
        if given is None:
            return self.default_timeout
        return min(given, self.limits.max_timeout)

    async def op_check(self, req: P.Check, peer: Peer) -> dict[str, Any]:
        """May this call start? Reserve its slots, or say which limit has no room."""
        t0 = _perf_counter()
        fields = self.call_fields(req, peer)
        ruleset = self.ruleset
        now = self.clock.now()
        get = fields.get
        call = CallInfo(req.call_id, get("from", ""), get("to", ""), get("account", ""),
                        req.from_tag, peer.node, self._vars(req.vars) if req.vars else None)
        if req.dry_run:
            return await self._dry_run(call, fields, ruleset, now)
        ev = ruleset.evaluate(fields, now=now)
        plan = ev.plan
        rates = ev.rates
        token = self.new_token()
        try:
            if rates:
                res = await self.store.reserve(call, plan, now, self.early_timeout, token, rates=rates)
            else:
                res = await self.store.reserve(call, plan, now, self.early_timeout, token)
        except StoreError as exc:
            return self._store_down(call, fields, plan, ruleset, exc, t0, rates, now)
        if res.conflict:
            held = res.record
            raise RequestError("call_conflict", "this Call-ID and From-tag are held by a call with another "
                               f"account, From or To (held: account={held.account if held else ''!r})")
        body, tallies = decision.decide(res, plan, ruleset, rates=rates)
        outcome = body["decision"]
        if res.admitted:
            body["token"] = token
        self.totals[outcome] += 1
        decisions = self.decisions
        for t in tallies:
            decisions[t] += 1
        elapsed = _perf_counter() - t0
        self.check_latency.observe(elapsed)
        # the `decision` line: only the fields with a value (docs/operations.md)
        line: dict[str, Any] = {"call_id": call.call_id}
        if call.from_tag:
            line["from_tag"] = call.from_tag
        if call.account:
            line["account"] = call.account
        for name in _LOG_FIELDS:
            value = get(name)
            if value is not None:
                line[name] = value
        if peer.node:
            line["node"] = peer.node
        line["decision"] = outcome
        if res.blocked is not None or res.rate_blocked is not None:
            line["code"] = body["code"]
            line["rule"] = body["rule"]
            limit = decision.limiting(res, plan)
            if limit is not None:
                line["limit"] = limit
            rate = decision.rate_limiting(res, rates) if rates else None
            if rate is not None:
                line["rate"] = rate
        if res.duplicate:
            line["duplicate"] = True
        shadow = body["shadow"]
        if shadow:
            rules = [s["rule"] for s in shadow]
            log.info("shadow_would_deny", call_id=call.call_id, from_tag=call.from_tag, rules=rules)
            line["shadow"] = rules
        line["latency_ms"] = int(elapsed * 1_000_000.0 + 0.5) / 1000.0
        self.log_decision(line)
        if self.explain_decisions:
            self._explain(call, fields, ruleset, now, body)
        return body

    def _explain(self, call: CallInfo, fields: dict[str, str], ruleset: Ruleset, now: float,
                 body: dict[str, Any]) -> None:
        """The `decision_explained` debug line: every rule, whether it matched and why, each cap
        and rate and where it came from (what `check --dry-run` shows), with the decision."""
        log.debug("decision_explained", call_id=call.call_id, from_tag=call.from_tag or None,
                  decision=body["decision"], code=body.get("code"), rule=body.get("rule"),
                  store_error=body.get("store_error"), explain=ruleset.explain(fields, now))

    def _store_down(self, call: CallInfo, fields: dict[str, str], plan: list[PlanEntry], ruleset: Ruleset,
                    exc: StoreError, t0: float, rates: Sequence[RateEntry] = (), now: float = 0.0) -> dict[str, Any]:
        body, tallies = decision.store_down(plan, ruleset, str(exc), rates)
        self.totals["store_" + body["decision"]] += 1
        for t in tallies:
            self.decisions[t] += 1
        elapsed = time.perf_counter() - t0
        self.check_latency.observe(elapsed)
        log.warning("decision", call_id=call.call_id, from_tag=call.from_tag or None,
                    account=call.account or None, from_user=fields.get("from_user"),
                    to_user=fields.get("to_user"), src_ip=fields.get("src_ip"), node=call.node or None,
                    decision=body["decision"], code=body.get("code"), rule=body.get("rule"),
                    store_error=str(exc), latency_ms=round(elapsed * 1000, 3))
        if self.explain_decisions:
            self._explain(call, fields, ruleset, now, body)
        return body

    async def _dry_run(self, call: CallInfo, fields: dict[str, str], ruleset: Ruleset, now: float) -> dict[str, Any]:
        ev = ruleset.evaluate(fields, explain=True, now=now)
        plan = ev.plan
        rates = ev.rates
        sizes = [await self.store.profile_size(e.profile, e.value, now) for e in plan]
        held = await self.store.get_call(call.uid, now)
        blocked = None
        if held is None:
            for i, e in enumerate(plan):
                if e.limit is not None and not e.shadow and sizes[i] >= e.limit:
                    blocked = i
                    break
        res = ReserveResult(held is not None or blocked is None, held is not None, blocked,
                            [s + (1 if held is None and blocked is None else 0) for s in sizes], held)
        return decision.dry_run(res, plan, ruleset, ev.outcomes, ev.attrs, rates)

    # -- call life ----------------------------------------------------------------------

    def _uid(self, call_id: str, from_tag: str) -> str:
        if not call_id:
            raise RequestError("bad_field", "'call_id' must not be empty")
        max_field = self.limits.max_field
        if len(call_id) > max_field or len(from_tag) > max_field:
            self._bounded("call_id", call_id)
            self._bounded("from_tag", from_tag)
        return call_uid(call_id, from_tag)

    def _queue(self, kind: str, uid: str, token: str | None, timeout: float, reason: str,
               exc: StoreError) -> dict[str, Any]:
        queued = self.notices.add(Notice(kind, uid, token, timeout, reason, self.clock.now()))
        log.warning("notice_queued" if queued else "notice_not_queued", kind=kind, call=uid, error=str(exc))
        if not queued:
            raise exc
        return {"queued": True}

    async def op_answer(self, req: P.Answer, peer: Peer) -> dict[str, Any]:
        """The call was answered (200 OK): it becomes active with the answered-call lease."""
        uid = self._uid(req.call_id, req.from_tag)
        timeout = self._timeout(req.timeout)
        token = req.token or None
        now = self.clock.now()
        try:
            rec = await self.store.answer(uid, now, timeout, token)
        except StoreError as exc:
            return self._queue("answer", uid, token, timeout, "", exc)
        created = False
        if rec is None and req.create:
            # accounting-only platforms: count a call we never checked, without enforcing caps
            fields = self.call_fields(req, peer)
            plan = self.ruleset.evaluate(fields, now=now).plan
            call = CallInfo(req.call_id, fields.get("from", ""), fields.get("to", ""), fields.get("account", ""),
                            req.from_tag, peer.node, self._vars(req.vars))
            token = token or self.new_token()
            await self.store.reserve(call, plan, now, timeout, token, force=True)
            rec = await self.store.answer(uid, now, timeout, token)
            created = rec is not None
        if rec is None:
            return {"found": False}
        if token is not None and rec.token != token:
            log.info("notice_stale", kind="answer", call=uid, token=token, holder=rec.token)
            return {"found": False, "stale": True}
        return {"found": True, "created": created, "state": rec.state, "expires": rec.expires}

    async def op_refresh(self, req: P.Refresh, peer: Peer) -> dict[str, Any]:
        """Extend a call's lease (a re-INVITE, an interim update, a keepalive)."""
        uid = self._uid(req.call_id, req.from_tag)
        timeout = self._timeout(req.timeout)
        token = req.token or None
        try:
            rec = await self.store.refresh(uid, self.clock.now(), timeout, token)
        except StoreError as exc:
            return self._queue("refresh", uid, token, timeout, "", exc)
        if rec is None:
            return {"found": False}
        if token is not None and rec.token != token:
            return {"found": False, "stale": True}
        return {"found": True, "state": rec.state, "expires": rec.expires}

    async def op_end(self, req: P.End, peer: Peer) -> dict[str, Any]:
        """Release every slot the call holds; a no-op for an unknown, ended or superseded call."""
        if req.reason not in P.END_REASONS:
            raise RequestError("bad_field", f"'reason' must be one of {', '.join(P.END_REASONS)}")
        uid = self._uid(req.call_id, req.from_tag)
        token = req.token or None
        now = self.clock.now()
        try:
            rec = await self.store.end(uid, now, req.reason, token)
        except StoreError as exc:
            return self._queue("end", uid, token, 0.0, req.reason, exc)
        if rec is None:
            return {"released": False}
        if token is not None and rec.token != token:
            log.info("end_ignored", call=uid, reason="superseded by a later attempt", token=token,
                     holder=rec.token)
            return {"released": False, "stale": True}
        self.ended(rec, req.reason, now)
        return {"released": True, "state": rec.state,
                "profiles": [{"profile": p, "value": v} for p, v in rec.profiles]}

    def ended(self, rec: CallRecord, reason: str, now: float, by: str | None = None) -> None:
        """A call left the store (end, expiry, reconciliation): log it and tell the listeners.

        Every end is a `call_end` line at debug; a release the proxy did not ask for (expiry,
        an operator, reconciliation) is also a `call_released` line at info with the reason.
        """
        log_end = self.log_end
        if log_end is not logs.nop:
            line = {"call_id": rec.call_id, "from_tag": rec.from_tag, "reason": reason, "state": rec.state}
            if not rec.from_tag:
                del line["from_tag"]
            log_end(line)
        if reason not in PROXY_END_REASONS:
            log.info("call_released", call_id=rec.call_id, from_tag=rec.from_tag or None,
                     account=rec.account or None, node=rec.node or None, state=rec.state, reason=reason,
                     by=by)
        for listener in self.on_call_end:
            try:
                listener(rec, reason, now)
            except Exception:
                log.exception("call_end_listener_failed")

    async def op_set_var(self, req: P.SetVar, peer: Peer) -> dict[str, Any]:
        """Set or delete one variable of a held call (Kamailio's `$dlg_var`)."""
        uid = self._uid(req.call_id, req.from_tag)
        self._bounded("name", req.name)
        if req.value is not None:
            self._bounded("value", req.value)
        rec = await self.store.get_call(uid, self.clock.now())
        if rec is not None and req.value is not None and req.name not in rec.vars \
                and len(rec.vars) >= self.limits.max_vars:
            raise RequestError("bad_field", f"the call already holds {self.limits.max_vars} variables")
        rec = await self.store.set_var(uid, req.name, req.value, self.clock.now())
        if rec is None:
            return {"found": False}
        return {"found": True, "vars": rec.vars}

    # -- admin ----------------------------------------------------------------------------

    def _profile_arg(self, profile: str, value: str | None, with_value: bool | None = None) -> None:
        rs = self.ruleset
        if profile not in rs.profiles:
            raise RequestError("unknown_profile", f"unknown profile {profile!r} "
                                                  f"(declared: {', '.join(sorted(rs.profiles))})")
        if value is not None and profile in rs.no_value:
            raise RequestError("bad_field", f"profile {profile!r} is declared without value")
        if with_value and profile in rs.no_value:
            raise RequestError("bad_field", f"profile {profile!r} is declared without value: it has no values")

    async def op_profile_size(self, req: P.ProfileSize, peer: Peer) -> dict[str, Any]:
        """How many calls are in a profile (or one value of it), like dlg.profile_get_size."""
        self._profile_arg(req.profile, req.value)
        size = await self.store.profile_size(req.profile, req.value, self.clock.now())
        return {"profile": req.profile, "value": req.value, "size": size}

    async def op_profile_list(self, req: P.ProfileList, peer: Peer) -> dict[str, Any]:
        """A page of the calls in a profile (or one value of it), like dlg.profile_list."""
        self._profile_arg(req.profile, req.value)
        page = await self.store.profile_list(req.profile, req.value, self.clock.now(), req.cursor,
                                             min(req.limit, MAX_PAGE))
        return {"profile": req.profile, "value": req.value, "calls": [c.to_json() for c in page.items],
                "cursor": page.cursor}

    async def op_profile_values(self, req: P.ProfileValues, peer: Peer) -> dict[str, Any]:
        """A page of a with-value profile's values and sizes (OpenSIPS `profile_get_values`)."""
        self._profile_arg(req.profile, None, with_value=True)
        page = await self.store.profile_values(req.profile, self.clock.now(), req.cursor, min(req.limit, MAX_PAGE))
        return {"profile": req.profile, "values": [{"value": v, "size": n} for v, n in page.items],
                "cursor": page.cursor}

    async def op_release(self, req: P.Release, peer: Peer) -> dict[str, Any]:
        """An operator's forced release: one call, or every call in a profile (key)."""
        now = self.clock.now()
        if req.call_id is not None:
            rec = await self.store.end(self._uid(req.call_id, req.from_tag), now, "admin")
            if rec is not None:
                self.ended(rec, "admin", now, by=peer.name)
            return {"released": 1 if rec is not None else 0}
        if req.profile is None:
            raise RequestError("missing_field", "'call_id' or 'profile' is required")
        self._profile_arg(req.profile, req.value)
        released = 0
        while True:  # always page from the start: released calls leave the listing
            page = await self.store.profile_list(req.profile, req.value, self.clock.now(), "", MAX_PAGE)
            if not page.items:
                break
            for rec in page.items:
                gone = await self.store.end(rec.uid, self.clock.now(), "admin")
                if gone is not None:
                    released += 1
                    self.ended(gone, "admin", now, by=peer.name)
            await asyncio.sleep(0)
        log.info("profile_released", profile=req.profile, value=req.value, calls=released, by=peer.name)
        return {"released": released}

    async def op_stats(self, req: P.Stats, peer: Peer) -> dict[str, Any]:
        """Dialog stats (Kamailio's names), decisions per rule and outcome, rules version."""
        dialogs = await self.store.stats(self.clock.now())
        self.last_dialogs = dialogs
        per_rule: dict[str, dict[str, int]] = {}
        for (rule, outcome), n in sorted(self.decisions.items()):
            per_rule.setdefault(rule, {})[outcome] = n
        body: dict[str, Any] = {
            "dialogs": dialogs.to_json(),
            "decisions": dict(sorted(self.totals.items())),
            "rules": per_rule,
            "rules_version": self.ruleset.version,
            "rules_loaded": len(self.ruleset.rules),
            "reloads": self.reloads,
            "reload_errors": self.reload_errors,
            "store": self.store.name,
            "store_info": self.store.info(),
            "notices": self.notices.info(),
            "uptime": round(time.time() - self.started, 3),
        }
        if self.last_reload_error:
            body["last_reload_error"] = self.last_reload_error
        for name, provider in self.info_providers.items():
            body[name] = provider()
        return body

    async def op_reload(self, req: P.Reload, peer: Peer) -> dict[str, Any]:
        """Reload the rules now; a broken file is refused and the old rules stay. The reply's
        `preview` lists the profile keys over their new caps (`policy.preview`)."""
        try:
            self.reload()
        except RuleError as exc:
            raise RequestError("rules_invalid", str(exc)) from None
        body: dict[str, Any] = {"rules_version": self.ruleset.version, "rules_loaded": len(self.ruleset.rules)}
        task = self._preview_task
        if task is not None:
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # this request was cancelled, not the preview
                result = None  # superseded by a later reload
            if result is not None:
                body["preview"] = result.to_json()
        return body

    async def op_top(self, req: P.Top, peer: Peer) -> dict[str, Any]:
        """One refresh of `callpolicy top`: counters, dialogs, health and the profile keys nearest
        their caps (the per-value walk is bounded and shared by refreshes within a second)."""
        now = self.clock.now()
        dialogs = await self.store.stats(now)
        self.last_dialogs = dialogs
        hist = self.check_latency
        body: dict[str, Any] = {
            "time": time.time(),
            "uptime": round(time.time() - self.started, 3),
            "rules_version": self.ruleset.version,
            "rules_loaded": len(self.ruleset.rules),
            "dialogs": dialogs.to_json(),
            "decisions": dict(sorted(self.totals.items())),
            "shadow": sum(n for (_rule, outcome), n in self.decisions.items() if outcome == "would_deny"),
            "latency": {"count": hist.count, "sum": hist.sum},
            "store": self.store.name,
            "store_info": self.store.info(),
            "notices": self.notices.info(),
        }
        for name, provider in self.info_providers.items():
            body[name] = provider()
        body.update(await self._overview(req.limit, now))
        return body

    def _caps_now(self, now: float) -> dict[str, ProfileCaps]:
        key = (self.ruleset.version, now // 60)  # the version hashes every rule and data file; windows are minutes
        if self._caps is None or self._caps[0] != key:
            self._caps = (key, profile_caps(self.ruleset, now))
        return self._caps[1]

    async def _overview(self, limit: int, now: float) -> dict[str, Any]:
        cached = self._top_cache
        mono = time.monotonic()
        if cached is not None and mono - cached[0] < TOP_CACHE_SECONDS and cached[1] >= limit:
            return {**cached[2], "nearest": cached[2]["nearest"][:limit]}
        rs, store = self.ruleset, self.store
        caps = self._caps_now(now)
        near: list[tuple[float, int, str, str, dict[str, Any]]] = []  # a min-heap of the `limit` nearest

        def offer(profile: str, value: str | None, size: int, pc: ProfileCaps | None) -> None:
            cap = pc.cap_for(value) if pc is not None else None
            if cap is None or size <= 0:
                return
            ratio = size / cap.limit if cap.limit else float("inf")
            item = (ratio, size, profile, value or "", {"profile": profile, "value": value, "size": size,
                                                         "limit": cap.limit, "rule": cap.rule, "shadow": cap.shadow})
            if len(near) < limit:
                heapq.heappush(near, item)
            elif item[:4] > near[0][:4]:
                heapq.heapreplace(near, item)

        profiles = []
        scanned = 0
        truncated = False
        for p in sorted(rs.profiles):
            size = await store.profile_size(p, None, now)
            pc = caps.get(p)
            entry: dict[str, Any] = {"profile": p, "size": size}
            if p in rs.no_value:
                if pc is not None and pc.cap is not None:
                    entry.update(limit=pc.cap.limit, shadow=pc.cap.shadow)
                offer(p, None, size, pc)
            elif pc is not None:  # a limited with-value profile: walk its values, bounded
                if pc.cap is not None:
                    entry["limit_each"] = pc.cap.limit  # a value without an override
                values = 0
                cursor = ""
                while scanned < TOP_SCAN_MAX:
                    page = await store.profile_values(p, now, cursor, min(MAX_PAGE, TOP_SCAN_MAX - scanned))
                    for value, vsize in page.items:
                        offer(p, value, vsize, pc)
                    values += len(page.items)
                    scanned += len(page.items)
                    if not page.cursor:
                        break
                    cursor = page.cursor
                    await asyncio.sleep(0)
                else:
                    truncated = True
                entry["values"] = values
            profiles.append(entry)
        over = {"profiles": profiles, "values_scanned": scanned, "scan_truncated": truncated,
                "nearest": [e[4] for e in sorted(near, key=lambda e: e[:4], reverse=True)]}
        self._top_cache = (mono, limit, over)
        return over

    async def op_terminate(self, req: P.Terminate, peer: Peer) -> dict[str, Any]:
        """End a call (or every call in a profile key) in the proxy that holds it (`policy.terminate`)."""
        if req.call_id is not None:
            if req.profile is not None:
                raise RequestError("bad_field", "give 'call_id' or 'profile', not both")
            self._uid(req.call_id, req.from_tag or "")  # bounds the fields
            return await self.terminator.call(req.call_id, req.from_tag, req.wait, peer.name)
        if req.profile is None:
            raise RequestError("missing_field", "'call_id' or 'profile' is required")
        self._profile_arg(req.profile, req.value)
        return await self.terminator.key(req.profile, req.value, req.wait, peer.name)

    async def op_reconcile(self, req: P.Reconcile, peer: Peer) -> dict[str, Any]:
        """Compare the store with the proxies' dialog lists now and repair (or only report) it."""
        if self.reconciler is None:
            raise RequestError("unavailable", "no proxy to reconcile with (no [evapi] nodes configured)")
        result: dict[str, Any] = await self.reconciler.run(node=req.node, dry_run=req.dry_run)
        return result

    async def op_ping(self, req: P.Ping, peer: Peer) -> dict[str, Any]:
        """Liveness."""
        return {"pong": True, "rules_version": self.ruleset.version}

    async def op_auth(self, req: P.Auth, peer: Peer) -> dict[str, Any]:
        """Present a token: the connection takes its role."""
        if peer.transport == "udp":
            raise RequestError("forbidden", "UDP cannot authenticate (every datagram stands alone): use TCP or "
                                            "the Unix socket")
        tok = self.tokens.check(req.token)
        if tok is None:
            self.warnings.warning("auth_failed", transport=peer.transport, peer=peer.address)
            raise RequestError("auth_failed", "unknown token")
        peer.role = tok.role
        peer.name = tok.name
        return {"role": tok.role, "name": tok.name}

    # -- reload -----------------------------------------------------------------------------

    def reload(self) -> Ruleset:
        """Compile the rules and swap them in whole; on error keep the old ones and re-raise."""
        try:
            new = self._fit(load_rules(self.rules_path))
        except RuleError as exc:
            self.reload_errors += 1
            self.last_reload_error = str(exc)
            log.error("reload_failed", error=str(exc), file=exc.file, rule=exc.rule, key=exc.key,
                      kept_version=self.ruleset.version)
            raise
        old = self.ruleset.version
        self.ruleset = new
        self.reloads += 1
        self.last_reload_error = None
        log.info("rules_reloaded", version=new.version, previous=old, rules=len(new.rules),
                 files=[Path(f).name for f in new.files])
        self._start_preview(new)
        return new

    def _start_preview(self, ruleset: Ruleset) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # reloaded outside the loop (a synchronous caller): no sizes to compare with
        if self._preview_task is not None and not self._preview_task.done():
            self._preview_task.cancel()  # superseded by this reload
        self._preview_task = loop.create_task(self._log_preview(ruleset), name="reload preview")

    async def preview(self, ruleset: Ruleset, max_items: int = 50) -> PreviewResult:
        """The profile keys over `ruleset`'s caps now, from the store (paged, a page per loop turn)."""
        now = self.clock.now()
        pv = Preview(ruleset, now, max_items)
        store = self.store
        for p in pv.whole_profiles():
            pv.add(p, None, await store.profile_size(p, None, now))
        for p in pv.value_profiles():
            cursor = ""
            while True:
                page = await store.profile_values(p, now, cursor, MAX_PAGE)
                pv.add_values(p, page.items)
                if not page.cursor:
                    break
                cursor = page.cursor
                await asyncio.sleep(0)
        return pv.finish()

    async def _log_preview(self, ruleset: Ruleset) -> PreviewResult | None:
        """The `reload_preview` log line (warning when keys are over their caps)."""
        try:
            result = await self.preview(ruleset)
        except StoreError as exc:
            log.warning("reload_preview_failed", version=ruleset.version, error=str(exc))
            return None
        self.last_preview = result
        (log.warning if result.count else log.info)(
            "reload_preview", version=ruleset.version, over=result.count, calls_over=result.calls_over,
            keys=result.keys, over_limit=[o.to_json() for o in result.over[:PREVIEW_LOG_ITEMS]],
            truncated=result.count > PREVIEW_LOG_ITEMS or None)
        return result

    def _fit(self, rs: Ruleset) -> Ruleset:
        """The rules, if this store can carry them out (RuleError naming the rule otherwise)."""
        if rs.uses_rates and not self.store.supports_rates:
            rule = next(r for r in rs.rules if r.rate is not None)
            raise RuleError(rule.file, rule.name, "rate", f"call rates are not supported on the "
                            f"{self.store.name} store (use the embedded or a single Redis store)")
        return rs

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        sig = []
        for f in rule_files(self.rules_path):
            with contextlib.suppress(OSError):
                st = f.stat()
                sig.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def check_for_changes(self) -> bool:
        """Reload if a rule file changed since the last look; True if a reload was tried."""
        sig = self._signature()
        if self._watch_sig is None:
            self._watch_sig = sig
            return False
        if sig == self._watch_sig:
            return False
        self._watch_sig = sig
        with contextlib.suppress(RuleError):
            self.reload()
        return True

    async def watch(self, interval: float) -> None:
        """Poll the rules directory and reload on change (runs until cancelled)."""
        self._watch_sig = self._signature()
        while True:
            await asyncio.sleep(interval)
            self.check_for_changes()

    async def sweep_loop(self, interval: float) -> None:
        """Drop expired leases now and then, so idle keys do not linger (until cancelled)."""
        while True:
            await asyncio.sleep(interval)
            now = self.clock.now()
            try:
                expired = await self.store.sweep(now)
                self.last_dialogs = await self.store.stats(now)
            except StoreError as exc:
                log.warning("sweep_failed", error=str(exc))
                continue
            for rec in expired:
                self.ended(rec, "timeout", now)
            if expired:
                log.info("calls_expired", count=len(expired))
