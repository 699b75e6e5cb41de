"""The counter-store contract shared by the embedded and the Redis backend.

A store keeps dialog-profile counters the way Kamailio's dialog module does, as leases:
each profile key (profile, value) holds the Call-IDs of the calls in it, and each call has
a record of the keys it joined and the time its lease expires. Every operation is atomic
with respect to every other (one step per operation), so concurrent checks never admit a
call over a limit, and a call releases exactly the keys its record lists.

Times are passed in (`now`), never read inside a store, so tests drive them with a clock.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from policy.plan import PlanEntry as PlanEntry  # re-exported: stores take plans

#: Why a call ended, as the protocol spells it.
END_REASONS = ("bye", "cancel", "failed", "timeout", "admin")
#: End reasons counted in `failed_dialogs` (the call never became an answered dialog).
FAILED_REASONS = frozenset({"cancel", "failed"})


class CallInfo(NamedTuple):
    """What a check tells the store about a call, kept in its record for listings."""

    call_id: str
    from_uri: str = ""
    to_uri: str = ""
    account: str = ""


@dataclass(slots=True)
class CallRecord:
    """A call held by the store: its state, lease and the profile keys it joined."""

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

    def to_json(self) -> dict[str, Any]:
        """The record as the protocol shows it."""
        return {
            "call_id": self.call_id,
            "from": self.from_uri,
            "to": self.to_uri,
            "account": self.account,
            "state": self.state,
            "init_ts": self.init_ts,
            "start_ts": self.start_ts,
            "timeout": self.timeout,
            "expires": self.expires,
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
        )


class ReserveResult(NamedTuple):
    """The outcome of `reserve`.

    `sizes[i]` is the size of `plan[i]`'s key after the operation: it includes the call
    when it was admitted. `blocked` is the index of the first enforced (non-shadow) limit
    that had no room, when the call was refused. `duplicate` says the call already held
    its slots (a retransmitted check): nothing was counted again.
    """

    admitted: bool
    duplicate: bool
    blocked: int | None
    sizes: list[int]
    record: CallRecord | None


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


class CounterStore(abc.ABC):
    """Dialog-profile counters with leases; every method is one atomic step.

    Stores raise `policy.errors.StoreError` when they cannot answer; they never raise
    anything else on purpose.
    """

    #: Short backend name for logs and stats ("embedded", "redis").
    name: str = "store"
    #: True when operations finish without ever suspending (no I/O): transports then run
    #: requests eagerly instead of giving each one a Task.
    answers_inline: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect, restore state, start background work."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work, persist what must be persisted, disconnect."""

    @abc.abstractmethod
    async def reserve(
        self, call: CallInfo, plan: Sequence[PlanEntry], now: float, timeout: float
    ) -> ReserveResult:
        """Admit the call into every key of `plan` if every enforced limit has room; else into none.

        A call that is already held answers admitted with `duplicate=True` and changes nothing.
        An admitted call is `early` with a lease of `timeout` seconds.
        """

    @abc.abstractmethod
    async def answer(self, call_id: str, now: float, timeout: float) -> CallRecord | None:
        """Mark the call answered (`active`) with a lease of `timeout` seconds; None if unknown."""

    @abc.abstractmethod
    async def refresh(self, call_id: str, now: float, timeout: float) -> CallRecord | None:
        """Extend the call's lease to `now + timeout`; None if unknown."""

    @abc.abstractmethod
    async def end(self, call_id: str, now: float, reason: str) -> CallRecord | None:
        """Release every key the call joined; the removed record, or None if it was not held."""

    @abc.abstractmethod
    async def get_call(self, call_id: str, now: float) -> CallRecord | None:
        """The record of a held call, or None."""

    @abc.abstractmethod
    async def profile_size(self, profile: str, value: str | None, now: float) -> int:
        """How many calls are in the key; with `value=None`, in every value of the profile."""

    @abc.abstractmethod
    async def profile_list(self, profile: str, value: str | None, now: float) -> list[CallRecord]:
        """The calls in the key (or in every value of the profile), ordered by Call-ID."""

    @abc.abstractmethod
    async def stats(self, now: float) -> DialogStats:
        """The dialog statistics across everything this store covers."""

    @abc.abstractmethod
    async def sweep(self, now: float) -> int:
        """Drop every call whose lease ended by `now`; return how many were dropped."""
