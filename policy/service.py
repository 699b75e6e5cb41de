"""The policy service: ties rules, the counter store and the protocol's operations.

Transports hand every decoded request (a JSON object) to `PolicyService.handle` and send
back what it returns. `handle` never raises: every failure becomes an error reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from policy import logs
from policy.clock import Clock, SystemClock
from policy.errors import RequestError, RuleError, StoreError
from policy.rules import Ruleset, load_rules, rule_files
from policy.sip import split_uri
from policy.store.base import END_REASONS, CallInfo, CounterStore, DialogStats, PlanEntry, ReserveResult

log = structlog.get_logger("policy.service")

STORE_DOWN_CODE = 503
STORE_DOWN_REASON = "Call policy store unavailable"
_ECHO = ("id", "tindex", "tlabel")
_STR_FIELDS = ("from", "to", "ruri", "from_user", "from_domain", "to_user", "to_domain",
               "ruri_user", "ruri_domain", "account", "src_ip")
_STR_FIELD_SET = frozenset(_STR_FIELDS)
_URI_FIELDS = (("from", "from_user", "from_domain"), ("to", "to_user", "to_domain"),
               ("ruri", "ruri_user", "ruri_domain"))
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _str_field(msg: dict[str, Any], name: str, required: bool = False) -> str:
    val = msg.get(name)
    if val is None:
        if required:
            raise RequestError("missing_field", f"{name!r} is required")
        return ""
    if not isinstance(val, str):
        raise RequestError("bad_field", f"{name!r} must be a string, not {type(val).__name__}")
    if required and not val:
        raise RequestError("bad_field", f"{name!r} must not be empty")
    return val


def _num_field(msg: dict[str, Any], name: str) -> float | None:
    val = msg.get(name)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int | float) or not 0 < val < 10**8:
        raise RequestError("bad_field", f"{name!r} must be a positive number of seconds")
    return float(val)


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
    ) -> None:
        self.rules_path = Path(rules_path)
        self.store = store
        self.clock = clock or SystemClock()
        self.early_timeout = early_timeout
        self.default_timeout = default_timeout
        self.ruleset = ruleset if ruleset is not None else load_rules(self.rules_path)
        self.started = time.time()
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.totals: Counter[str] = Counter()
        self.reloads = 0
        self.reload_errors = 0
        self.last_reload_error: str | None = None
        self.info_providers: dict[str, Callable[[], Any]] = {}
        self.log_decision = logs.hot_event("policy.service", "decision")
        self.log_end = logs.hot_event("policy.service", "call_end", "debug")
        self.last_dialogs: DialogStats | None = None  # refreshed by the sweep loop, for /metrics
        self._watch_sig: tuple[tuple[str, int, int], ...] | None = None
        self._ops: dict[str, Handler] = {
            "check": self.op_check,
            "answer": self.op_answer,
            "refresh": self.op_refresh,
            "end": self.op_end,
            "stats": self.op_stats,
            "profile_size": self.op_profile_size,
            "profile_list": self.op_profile_list,
            "reload": self.op_reload,
            "ping": self.op_ping,
        }

    # -- entry point ----------------------------------------------------------------------

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Answer one request; never raises."""
        reply: dict[str, Any] = {}
        for key in _ECHO:
            if key in msg:
                reply[key] = msg[key]
        op = msg.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                if op is None:
                    raise RequestError("missing_field", "'op' is required")
                raise RequestError("unknown_op", f"unknown op {op!r} (known: {', '.join(self._ops)})")
            body = await handler(msg)
        except RequestError as exc:
            log.warning("bad_request", op=op, code=exc.code, error=exc.message)
            self.totals["bad_requests"] += 1
            return self.error_reply(reply, exc.code, exc.message)
        except StoreError as exc:
            log.warning("store_error", op=op, error=str(exc))
            return self.error_reply(reply, "store_error", str(exc))
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("internal_error", op=op)
            return self.error_reply(reply, "internal", f"internal error: {type(exc).__name__}")
        reply["ok"] = True
        reply.update(body)
        return reply

    @staticmethod
    def error_reply(reply: dict[str, Any], code: str, message: str) -> dict[str, Any]:
        """Fill an error reply."""
        reply["ok"] = False
        reply["error"] = {"code": code, "message": message}
        return reply

    # -- check ----------------------------------------------------------------------------

    def request_fields(self, msg: dict[str, Any]) -> dict[str, str]:
        """The rule-visible fields of a check: given ones, plus user/domain parsed from URIs."""
        call_id = msg.get("call_id")
        if type(call_id) is not str or not call_id:
            _str_field(msg, "call_id", required=True)  # raises the precise error
        req: dict[str, str] = {"call_id": call_id}  # type: ignore[dict-item]
        attrs = None
        for name, val in msg.items():
            if name in _STR_FIELD_SET:
                if type(val) is not str:
                    if val is None:
                        continue
                    raise RequestError("bad_field", f"{name!r} must be a string, not {type(val).__name__}")
                req[name] = val
            elif name == "attrs":
                attrs = val
        for uri, user_key, domain_key in _URI_FIELDS:
            value = req.get(uri)
            if value is not None and (user_key not in req or domain_key not in req):
                user, domain = split_uri(value)
                req.setdefault(user_key, user)
                req.setdefault(domain_key, domain)
        if attrs is not None:
            if not isinstance(attrs, dict):
                raise RequestError("bad_field", "'attrs' must be an object of strings")
            for k, v in attrs.items():
                if not isinstance(v, str):
                    raise RequestError("bad_field", f"attrs.{k} must be a string, not {type(v).__name__}")
                req["attrs." + k] = v
        return req

    async def op_check(self, msg: dict[str, Any]) -> dict[str, Any]:
        """May this call start? Reserve its slots, or say which limit has no room."""
        t0 = time.perf_counter()
        req = self.request_fields(msg)
        dry = msg.get("dry_run", False)
        if not isinstance(dry, bool):
            raise RequestError("bad_field", "'dry_run' must be a boolean")
        ruleset = self.ruleset
        ev = ruleset.evaluate(req, explain=dry, now=self.clock.now())
        plan = ev.plan
        call = CallInfo(req["call_id"], req.get("from", ""), req.get("to", ""), req.get("account", ""))
        now = self.clock.now()
        if dry:
            return await self._dry_run(call, ev.plan, ev.outcomes, ev.attrs, now)
        try:
            res = await self.store.reserve(call, plan, now, self.early_timeout)
        except StoreError as exc:
            return self._store_down(call.call_id, plan, ruleset, exc, t0)
        body = self._decide(res, plan, ruleset)
        outcome = body["decision"]
        self.totals[outcome] += 1
        self.log_decision(
            call_id=call.call_id,
            decision=outcome,
            rule=body.get("rule"),
            duplicate=res.duplicate,
            shadow=[s["rule"] for s in body["shadow"]] or None,
            latency_ms=round((time.perf_counter() - t0) * 1000, 3),
        )
        return body

    def _decide(self, res: ReserveResult, plan: list[PlanEntry], ruleset: Ruleset,
                record: bool = True) -> dict[str, Any]:
        """The reply body for a reservation; `record` counts and logs it (not for a dry run)."""
        profiles = []
        shadow = []
        joined = 1 if res.admitted else 0
        count = record and not res.duplicate
        for i, entry in enumerate(plan):
            size = res.sizes[i]
            item: dict[str, Any] = {"profile": entry.profile, "value": entry.value, "size": size,
                                    "rule": entry.rule}
            if entry.limit is not None:
                item["limit"] = entry.limit
                before = size - joined
                if entry.shadow:
                    item["shadow"] = True
                    if before >= entry.limit:
                        shadow.append({"rule": entry.rule, "profile": entry.profile, "value": entry.value,
                                       "size": before, "limit": entry.limit})
                        if count:
                            self.decisions[(entry.rule, "would_deny")] += 1
                    elif count:
                        self.decisions[(entry.rule, "allow")] += 1
                elif count:
                    self.decisions[(entry.rule, "deny" if res.blocked == i else "allow")] += 1
            profiles.append(item)
        body: dict[str, Any] = {"decision": "allow" if res.admitted else "deny"}
        if res.blocked is not None:
            entry = plan[res.blocked]
            rule = ruleset.by_name.get(entry.rule)
            body["code"] = rule.code if rule else 486
            body["reason"] = rule.reason if rule else "Call limit reached"
            body["rule"] = entry.rule
        if res.duplicate:
            body["duplicate"] = True
        body["profiles"] = profiles
        body["shadow"] = shadow
        if shadow and record:
            log.info("shadow_would_deny", rules=[s["rule"] for s in shadow])
        return body

    def _store_down(
        self, call_id: str, plan: list[PlanEntry], ruleset: Ruleset, exc: StoreError, t0: float
    ) -> dict[str, Any]:
        denier = None
        for entry in plan:
            rule = ruleset.by_name.get(entry.rule)
            if entry.limit is not None and not entry.shadow and rule and rule.on_store_error == "deny":
                denier = entry.rule
                break
        body: dict[str, Any] = {"decision": "deny" if denier else "allow", "store_error": str(exc),
                                "profiles": [], "shadow": []}
        if denier:
            body.update(code=STORE_DOWN_CODE, reason=STORE_DOWN_REASON, rule=denier)
        outcome = "store_" + body["decision"]
        self.totals[outcome] += 1
        self.decisions[(denier or "-", outcome)] += 1
        log.warning("decision", call_id=call_id, decision=body["decision"], rule=denier,
                    store_error=str(exc), latency_ms=round((time.perf_counter() - t0) * 1000, 3))
        return body

    async def _dry_run(self, call: CallInfo, plan: list[PlanEntry], outcomes: list[Any],
                       attrs: dict[str, str], now: float) -> dict[str, Any]:
        sizes = [await self.store.profile_size(e.profile, e.value, now) for e in plan]
        held = await self.store.get_call(call.call_id, now)
        blocked = None
        if held is None:
            for i, e in enumerate(plan):
                if e.limit is not None and not e.shadow and sizes[i] >= e.limit:
                    blocked = i
                    break
        res = ReserveResult(held is not None or blocked is None, held is not None, blocked,
                            [s + (1 if held is None and blocked is None else 0) for s in sizes], held)
        body = self._decide(res, plan, self.ruleset, record=False)  # a dry run is not a decision
        body["dry_run"] = True
        body["attrs"] = attrs
        body["explain"] = [o.as_dict(plan) for o in outcomes]  # rule, matched, why, entries, caps
        return body

    # -- call life ----------------------------------------------------------------------

    async def op_answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The call was answered (200 OK): it becomes active with the answered-call lease."""
        call_id = _str_field(msg, "call_id", required=True)
        timeout = _num_field(msg, "timeout") or self.default_timeout
        now = self.clock.now()
        rec = await self.store.answer(call_id, now, timeout)
        created = False
        if rec is None and msg.get("create") is True:
            # accounting-only platforms: count a call we never checked, without enforcing caps
            req = self.request_fields(msg)
            plan = [PlanEntry(e.profile, e.value, None, False, e.rule)
                    for e in self.ruleset.evaluate(req).plan]
            call = CallInfo(call_id, req.get("from", ""), req.get("to", ""), req.get("account", ""))
            await self.store.reserve(call, plan, now, timeout)
            rec = await self.store.answer(call_id, now, timeout)
            created = rec is not None
        if rec is None:
            return {"found": False}
        return {"found": True, "created": created, "state": rec.state, "expires": rec.expires}

    async def op_refresh(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Extend a call's lease (a re-INVITE, an interim update, a keepalive)."""
        call_id = _str_field(msg, "call_id", required=True)
        timeout = _num_field(msg, "timeout") or self.default_timeout
        rec = await self.store.refresh(call_id, self.clock.now(), timeout)
        if rec is None:
            return {"found": False}
        return {"found": True, "state": rec.state, "expires": rec.expires}

    async def op_end(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Release every slot the call holds; a no-op for an unknown or ended call."""
        call_id = _str_field(msg, "call_id", required=True)
        reason = _str_field(msg, "reason") or "bye"
        if reason not in END_REASONS:
            raise RequestError("bad_field", f"'reason' must be one of {', '.join(END_REASONS)}")
        rec = await self.store.end(call_id, self.clock.now(), reason)
        if rec is None:
            return {"released": False}
        self.log_end(call_id=call_id, reason=reason, state=rec.state)
        return {"released": True, "state": rec.state,
                "profiles": [{"profile": p, "value": v} for p, v in rec.profiles]}

    # -- admin ----------------------------------------------------------------------------

    def _profile_arg(self, msg: dict[str, Any]) -> tuple[str, str | None]:
        profile = _str_field(msg, "profile", required=True)
        value = msg.get("value")
        if value is not None and not isinstance(value, str):
            raise RequestError("bad_field", "'value' must be a string")
        rs = self.ruleset
        if profile not in rs.profiles:
            raise RequestError("unknown_profile", f"unknown profile {profile!r} "
                                                  f"(declared: {', '.join(sorted(rs.profiles))})")
        if value is not None and profile in rs.no_value:
            raise RequestError("bad_field", f"profile {profile!r} is declared without value")
        return profile, value

    async def op_profile_size(self, msg: dict[str, Any]) -> dict[str, Any]:
        """How many calls are in a profile (or one value of it), like dlg.profile_get_size."""
        profile, value = self._profile_arg(msg)
        size = await self.store.profile_size(profile, value, self.clock.now())
        return {"profile": profile, "value": value, "size": size}

    async def op_profile_list(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The calls in a profile (or one value of it), like dlg.profile_list."""
        profile, value = self._profile_arg(msg)
        calls = await self.store.profile_list(profile, value, self.clock.now())
        return {"profile": profile, "value": value, "calls": [c.to_json() for c in calls]}

    async def op_stats(self, msg: dict[str, Any]) -> dict[str, Any]:
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
            "uptime": round(time.time() - self.started, 3),
        }
        if self.last_reload_error:
            body["last_reload_error"] = self.last_reload_error
        for name, provider in self.info_providers.items():
            body[name] = provider()
        return body

    async def op_reload(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Reload the rules now; a broken file is refused and the old rules stay."""
        try:
            self.reload()
        except RuleError as exc:
            raise RequestError("rules_invalid", str(exc)) from None
        return {"rules_version": self.ruleset.version, "rules_loaded": len(self.ruleset.rules)}

    async def op_ping(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Liveness."""
        return {"pong": True, "rules_version": self.ruleset.version}

    # -- reload -----------------------------------------------------------------------------

    def reload(self) -> Ruleset:
        """Compile the rules and swap them in whole; on error keep the old ones and re-raise."""
        try:
            new = load_rules(self.rules_path)
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
        return new

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
            try:
                n = await self.store.sweep(self.clock.now())
                self.last_dialogs = await self.store.stats(self.clock.now())
            except StoreError as exc:
                log.warning("sweep_failed", error=str(exc))
                continue
            if n:
                log.info("calls_expired", count=n)

