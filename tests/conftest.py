"""Shared fixtures: real processes on loopback, never mocks."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.helpers import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session (tests flush it through `redis_url`)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The private redis-server's URL, flushed before the test."""
    redis_server.command("FLUSHALL")
    return redis_server.url
