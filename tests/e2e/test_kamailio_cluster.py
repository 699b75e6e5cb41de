"""Two proxies, one cap: two Kamailio, each with its own `callpolicy serve` on one Redis."""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import StackFactory
from tests.e2e.harness import Uas, profile_size, run_uac, wait_profiles_zero

pytestmark = [
    pytest.mark.kamailio,
    pytest.mark.redis,
    pytest.mark.skipif(importlib.util.find_spec("policy.store.redis") is None,
                       reason="policy.store.redis (the Redis counter store) is not available yet"),
]


def test_two_proxies_share_one_account_cap(make_stack: StackFactory, redis_url: str) -> None:
    """acme (cap 3) calls through both proxies at once: 3 answered in all, never more."""
    uas = Uas().start()
    try:
        a = make_stack(uas_obj=uas, store=redis_url)
        b = make_stack(uas_obj=uas, store=redis_url)
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(run_uac, st.kam.sip_port, calls=10, rate=10, hold_ms=3000,
                                from_user="acme", service="200", timeout=40) for st in (a, b)]
            ra, rb = (f.result() for f in runs)
        answered = ra.first_recv(200) + rb.first_recv(200)
        assert answered == 3, (ra.counts, rb.counts, a.dump(), b.dump())
        assert ra.recv(486) + rb.recv(486) == 17, (ra.counts, rb.counts)
        assert ra.recv(503) + rb.recv(503) == 0, "no store errors"
        for st in (a, b):
            sizes = wait_profiles_zero(st.port)
            assert not any(sizes.values()), sizes
            assert profile_size(st.port, "account", "acme") == 0
    finally:
        uas.stop()
