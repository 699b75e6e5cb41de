"""Counter stores: the interface, the embedded backend and the Redis backend."""

from policy.store.base import (
    CallInfo,
    CallRecord,
    CounterStore,
    DialogStats,
    PlanEntry,
    ReserveResult,
)

__all__ = ["CallInfo", "CallRecord", "CounterStore", "DialogStats", "PlanEntry", "ReserveResult"]
