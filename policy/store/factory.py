"""Build the counter store that service.toml (or --store) asks for."""

from __future__ import annotations

from policy.clock import Clock
from policy.settings import Settings
from policy.store.base import CounterStore
from policy.store.embedded import EmbeddedStore


def make_store(settings: Settings, clock: Clock) -> CounterStore:
    """The embedded store, or the Redis store for `redis`/a redis URL (given the service's
    clock: the Redis store measures its offset to Redis TIME on every connect)."""
    if settings.store == "embedded":
        return EmbeddedStore(
            snapshot_path=settings.path(settings.snapshot),
            snapshot_interval=settings.snapshot_interval,
            fsync_interval=settings.fsync_interval,
            clock=clock.now,
        )
    from policy.store.redis import RedisStore

    return RedisStore.from_settings(settings, clock=clock)
