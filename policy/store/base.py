"""The counter-store contract shared by the embedded and the Redis backend.

A store keeps dialog-profile counters the way Kamailio's dialog module does, as leases:
each profile key (profile, value) holds the calls in it, and each call has a record of the
keys it joined and the time its lease expires. Every operation is atomic with respect to
every other (one step per operation), so concurrent checks never admit a call over a limit,
and a call releases exactly the keys its record lists.

A call's identity is (Call-ID, From-tag) - the part of Kamailio's dialog id known at the
initial INVITE - spelled as one string by `call_uid` (Call-ID alone when there is no tag).
Each admission carries a token chosen by the caller of `reserve`: a repeated check of a held
call takes the admission over with its new token, and `answer`/`refresh`/`end` given a token
that is not the record's change nothing (they belong to an earlier attempt, e.g. the INVITE
a 407 challenged), so a late notice can never release a later admission.

Whole-profile sizes, per-value sizes and the dialog stats are counters kept with the
reservations: reading them never walks the calls. Listings are paged.

Call rates (`RateEntry`): a token bucket per (rule, value), checked in the same atomic step as
the limits: `burst` tokens at most, `rate` more each second of `now`; an admitted call takes one
token from each. So across every instance sharing a store, in any window of T seconds at most
`rate * T + burst` calls pass a rate. Only an admission takes tokens: a refused check (by a
limit or a rate) takes none (all or nothing, and a flood of refused attempts cannot starve the
calls that fit), a repeated check of a held call takes none (it is the same call), and a forced
reserve takes none (reconciliation adds calls that started earlier: they are not new calls
now). A bucket that is full again is forgotten (it would be recreated full): idle keys cost no
memory.

Times are passed in (`now`), never read inside a store, so tests drive them with a clock.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from policy.plan import PlanEntry as PlanEntry  # re-exported: stores take plans
from policy.plan import RateEntry as RateEntry

#: End reasons counted in `failed_dialogs` (the call never became an answered dialog).
FAILED_REASONS = frozenset({"cancel", "failed"})


def call_uid(call_id: str, from_tag: str = "") -> str:
    """The one-string identity of a call: Call-ID, a space, From-tag (neither holds a space
    in SIP); the Call-ID alone when there is no From-tag."""
    return f"{call_id} {from_tag}" if from_tag else call_id


class CallInfo(NamedTuple):
    """What a check tells the store about a call, kept in its record for listings."""

    call_id: str
    from_uri: str = ""
    to_uri: str = ""
    account: str = ""
    from_tag: str = ""
    node: str = ""  # who admitted it: an evapi node, a RADIUS client, or "" (reconciliation scope)
    vars: Mapping[str, str] | None = None  # the call's variables (like Kamailio's $dlg_var)

    @property
    def uid(self) -> str:
        """The call's identity as one string (see `call_uid`)."""
        return call_uid(self.call_id, self.from_tag)


@dataclass(slots=True)
class CallRecord:
    """A call held by the store: its state, lease, token and the profile keys it joined."""

    call_id: str
    from_uri: str
    to_uri: str
    account: str
    state: str  # "early" (reserved, not answered) or "active" (answered)
    init_ts: float
    start_ts: float | None
    timeout: float  # length of the current lease in seconds
    expires: float  # absolute time the lease ends
    profiles: list[tuple[str, str | None]] = field(default_factory=list)
    from_tag: str = ""
    node: str = ""
    token: str = ""  # the admission that holds the call now
    vars: dict[str, str] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        """The call's identity as one string (see `call_uid`)."""
        return call_uid(self.call_id, self.from_tag)

    def same_call(self, call: CallInfo) -> bool:
        """Whether a repeated check describes this call (else it is a `call_conflict`)."""
        return (self.account, self.from_uri, self.to_uri) == (call.account, call.from_uri, call.to_uri)

    def to_json(self) -> dict[str, Any]:
        """The record as the protocol shows it."""
        return {
            "call_id": self.call_id,
            "from_tag": self.from_tag,
            "from": self.from_uri,
            "to": self.to_uri,
            "account": self.account,
            "node": self.node,
            "state": self.state,
            "init_ts": self.init_ts,
            "start_ts": self.start_ts,
            "timeout": self.timeout,
            "expires": self.expires,
            "token": self.token,
            "vars": self.vars,
            "profiles": [{"profile": p, "value": v} for p, v in self.profiles],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallRecord:
        """Rebuild a record from `to_json` output (raises KeyError/TypeError/ValueError if malformed)."""
        start = data["start_ts"]
        return cls(
            call_id=str(data["call_id"]),
            from_uri=str(data["from"]),
            to_uri=str(data["to"]),
            account=str(data["account"]),
            state=str(data["state"]),
            init_ts=float(data["init_ts"]),
            start_ts=None if start is None else float(start),
            timeout=float(data["timeout"]),
            expires=float(data["expires"]),
            profiles=[
                (str(p["profile"]), None if p["value"] is None else str(p["value"]))
                for p in data["profiles"]
            ],
            from_tag=str(data.get("from_tag", "")),
            node=str(data.get("node", "")),
            token=str(data.get("token", "")),
            vars={str(k): str(v) for k, v in (data.get("vars") or {}).items()},
        )


class ReserveResult(NamedTuple):
    """The outcome of `reserve`.

    `sizes[i]` is the size of `plan[i]`'s key after the operation: it includes the call
    when it was admitted. `blocked` is the index of the first enforced (non-shadow) limit
    that had no room, when the call was refused. `duplicate` says the call already held
    its slots (a repeated check): nothing was counted again and the admission now carries
    the new token. `conflict` says a call with this identity is held with another account,
    From or To: nothing changed, the call is not admitted, `record` is the held one.

    With rates: `rate_blocked` is the index (into `rates`) of the first enforced rate whose
    bucket had no whole token, when that refused the call (a refused call may have both
    `blocked` and `rate_blocked`); `tokens[j]` is what `rates[j]`'s bucket held at `now`,
    before this check took one (a shadow rate below 1 would have refused). Both are empty for
    a duplicate, a conflict and a forced reserve (no bucket is read).
    """

    admitted: bool
    duplicate: bool
    blocked: int | None
    sizes: list[int]
    record: CallRecord | None
    conflict: bool = False
    rate_blocked: int | None = None
    tokens: Sequence[float] = ()


@dataclass(frozen=True, slots=True)
class DialogStats:
    """The dialog module's statistics, by their Kamailio names."""

    active_dialogs: int = 0
    early_dialogs: int = 0
    processed_dialogs: int = 0
    expired_dialogs: int = 0
    failed_dialogs: int = 0

    def to_json(self) -> dict[str, int]:
        """The stats as a plain dict."""
        return {
            "active_dialogs": self.active_dialogs,
            "early_dialogs": self.early_dialogs,
            "processed_dialogs": self.processed_dialogs,
            "expired_dialogs": self.expired_dialogs,
            "failed_dialogs": self.failed_dialogs,
        }


class Page(NamedTuple):
    """One page of a listing; `cursor` continues it ("" when it is the last page)."""

    items: list[Any]
    cursor: str


#: The most items one page may hold (a bigger `limit` is cut to this).
MAX_PAGE = 1000


class CounterStore(abc.ABC):
    """Dialog-profile counters with leases; every method is one atomic step.

    Stores raise `policy.errors.StoreError` when they cannot answer; they never raise
    anything else on purpose. A token of None (or "") in answer/refresh/end means "whatever
    admission holds the call" (an operator's forced release, a client without tokens).
    """

    #: Short backend name for logs and stats ("embedded", "redis").
    name: str = "store"
    #: True when operations finish without ever suspending (no I/O): transports then run
    #: requests eagerly instead of giving each one a Task.
    answers_inline: bool = False
    #: Whether `reserve` takes call-rate buckets (`rates`); the service refuses rules with rates
    #: on a store that does not (at start and at every reload, naming the rule).
    supports_rates: bool = True

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect, restore state, start background work."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work, persist what must be persisted, disconnect."""

    def info(self) -> dict[str, Any]:
        """Backend health for `stats` and metrics (cheap, no I/O)."""
        return {}

    @abc.abstractmethod
    async def reserve(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float, token: str,
        force: bool = False, rates: Sequence[RateEntry] = (),
    ) -> ReserveResult:
        """Admit the call into every key of `plan` if every enforced limit has room and every
        enforced rate a token; else into none, and take no token.

        A call that is already held (same `call.uid`) answers admitted with `duplicate=True`,
        counts nothing again, takes no token and takes the admission over: the record's token
        becomes `token` (its lease is left as it is). If the held call has another account,
        From or To, the answer is `conflict=True` and nothing changes. An admitted call is
        `early` with a lease of `timeout` seconds and takes one token from each rate's bucket
        (a shadow rate's only if it has one). `force` admits it even over its limits and
        ignores `rates` (reconciliation adds calls the proxy really has).

        A bucket refills with the `now` of each check; a `now` earlier than the bucket's last
        one refills nothing (instances whose clocks differ slightly never mint tokens).
        """

    @abc.abstractmethod
    async def answer(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Mark the call answered (`active`) with a lease of `timeout` seconds; None if unknown.

        With a token that is not the record's, nothing changes and the held record is returned.
        """

    @abc.abstractmethod
    async def refresh(self, uid: str, now: float, timeout: float, token: str | None = None) -> CallRecord | None:
        """Extend the call's lease to `now + timeout`; None if unknown (token as in `answer`)."""

    @abc.abstractmethod
    async def end(self, uid: str, now: float, reason: str, token: str | None = None) -> CallRecord | None:
        """Release every key the call joined; the removed record, or None if it was not held.

        With a token that is not the record's, nothing is released and the held record is returned.
        """

    @abc.abstractmethod
    async def set_var(self, uid: str, name: str, value: str | None, now: float) -> CallRecord | None:
        """Set (or with None, delete) one of a held call's variables; None if unknown."""

    @abc.abstractmethod
    async def get_call(self, uid: str, now: float) -> CallRecord | None:
        """The record of a held call, or None."""

    @abc.abstractmethod
    async def profile_size(self, profile: str, value: str | None, now: float) -> int:
        """How many calls are in the key; with `value=None`, in any value of the profile. O(1)."""

    @abc.abstractmethod
    async def profile_list(self, profile: str, value: str | None, now: float,
                           cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls (CallRecord) in the key, or in any value of the profile."""

    @abc.abstractmethod
    async def profile_values(self, profile: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of (value, size) pairs of a with-value profile's non-empty keys."""

    @abc.abstractmethod
    async def node_calls(self, node: str, now: float, cursor: str = "", limit: int = MAX_PAGE) -> Page:
        """A page of the calls (CallRecord) admitted through `node` (reconciliation)."""

    @abc.abstractmethod
    async def stats(self, now: float) -> DialogStats:
        """The dialog statistics across everything this store covers. O(1)."""

    @abc.abstractmethod
    async def sweep(self, now: float) -> list[CallRecord]:
        """Drop every call whose lease ended by `now`; return the calls that expired.

        Every expired call is returned by exactly one sweep (also when an operation dropped
        its lease lazily before, and across every instance sharing the store), so each gets
        exactly one call record.
        """
