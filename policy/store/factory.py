"""Build the counter store that service.toml (or --store) asks for."""

from __future__ import annotations

from policy.clock import Clock
from policy.settings import Settings
from policy.store.base import CounterStore
from policy.store.embedded import EmbeddedStore


def make_store(settings: Settings, clock: Clock) -> CounterStore:
    """The embedded store, or the Redis store for `redis`/a redis URL, or the Redis Cluster store
    for a redis+cluster:// URL or `redis` with `[store] cluster` (given the service's clock: the
    Redis stores measure their offset to Redis TIME on every connect)."""
    if settings.store == "embedded":
        return EmbeddedStore(
            snapshot_path=settings.path(settings.snapshot),
            snapshot_interval=settings.snapshot_interval,
            fsync_interval=settings.fsync_interval,
            clock=clock.now,
        )
    if settings.store.startswith("redis+cluster://") or (settings.store == "redis" and settings.redis_cluster):
        from policy.store.redis.cluster import RedisClusterStore

        return RedisClusterStore.from_settings(settings, clock=clock)
    from policy.store.redis import RedisStore

    return RedisStore.from_settings(settings, clock=clock)
