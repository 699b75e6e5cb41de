"""The Redis counter store (see `store.py`): `from policy.store.redis import RedisStore`."""

from policy.store.redis.connection import parse_sentinel_url, parse_target
from policy.store.redis.store import REBUILDING, RedisStore, script_source

__all__ = ["REBUILDING", "RedisStore", "parse_sentinel_url", "parse_target", "script_source"]
