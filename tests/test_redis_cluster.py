"""Several `callpolicy serve` processes on one real redis-server: one truth for every cap.

The shipped rules give account `acme` a cap of 3 and every other account 10, each user
(From user@domain) 4, and emergency calls (to 112) a cap of 5 of their own (final, fail
open); account and user caps fail closed (503) when the store cannot answer.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, LineClient, RedisServer, ServiceProcess

pytestmark = pytest.mark.redis


def check(cid: str, *, user: str, to: str = "2000", account: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "check", "call_id": cid, "from": f"sip:{user}@example.com",
                           "to": f"sip:{to}@example.com"}
    if account is not None:
        msg["account"] = account
    return msg


def fire(services: list[ServiceProcess], msgs: list[dict[str, Any]], conns_each: int = 4) -> dict[str, Any]:
    """Send every message, spread over the services and several connections each, all at once
    (each connection pipelines its share from its own thread); the replies by call id."""
    clients = [svc.client() for svc in services for _ in range(conns_each)]
    shares: list[list[dict[str, Any]]] = [[] for _ in clients]
    for i, m in enumerate(msgs):
        shares[i % len(clients)].append(m)
    replies: dict[str, Any] = {}
    lock = threading.Lock()
    start = threading.Barrier(len(clients))

    def run(c: LineClient, share: list[dict[str, Any]]) -> None:
        start.wait()
        for m in share:
            c.send(m)
        got = [c.recv() for _ in share]
        with lock:
            for m, r in zip(share, got, strict=True):
                replies[m["call_id"]] = r

    threads = [threading.Thread(target=run, args=(c, s)) for c, s in zip(clients, shares, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    assert len(replies) == len(msgs)
    return replies


def ask(c: LineClient, msg: dict[str, Any]) -> dict[str, Any]:
    """One request (a message built by `check`), one reply."""
    c.send(msg)
    return c.recv()


def size(svc: ServiceProcess, profile: str, value: str | None = None) -> int:
    c = svc.client()
    try:
        r = c.call("profile_size", profile=profile, value=value)
        assert r["ok"], r
        return int(r["size"])
    finally:
        c.close()


def stats(svc: ServiceProcess) -> dict[str, Any]:
    c = svc.client()
    try:
        r = c.call("stats")
        assert r["ok"], r
        return r
    finally:
        c.close()


@pytest.fixture
def relaxed(tmp_path: Path) -> Path:
    """The shipped service.toml with a 500 ms store timeout: these tests are about one truth
    across instances, not about the 50 ms bound, and CI machines stall (the bound has its own
    test below)."""
    text = (ROOT / "service.toml").read_text()
    assert "timeout = 0.05" in text
    cfg = tmp_path / "service.toml"
    cfg.write_text(text.replace("timeout = 0.05", "timeout = 0.5"))
    return cfg


@pytest.fixture
def three(redis_url: str, relaxed: Path) -> Iterator[list[ServiceProcess]]:
    procs = [ServiceProcess(store=redis_url, config=relaxed) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


def test_many_instances_one_cap(three: list[ServiceProcess]) -> None:
    msgs = [check(f"beta-{i}", user=f"u{i}", account="beta") for i in range(300)]
    replies = fire(three, msgs)
    allowed = [cid for cid, r in replies.items() if r["decision"] == "allow"]
    assert len(allowed) == 10
    denied = [r for r in replies.values() if r["decision"] == "deny"]
    assert all(r["code"] == 486 and r["rule"] == "account-cap" for r in denied)
    for svc in three:  # every instance sees the same truth
        assert size(svc, "account", "beta") == 10
        assert size(svc, "total") == 10
    ends = fire(three, [{"op": "end", "call_id": f"beta-{i}"} for i in range(300)])
    assert sum(1 for r in ends.values() if r["released"]) == 10
    for svc in three:
        assert size(svc, "account", "beta") == 0
        assert size(svc, "account") == 0
        assert size(svc, "total") == 0
    d = stats(three[0])["dialogs"]
    assert (d["processed_dialogs"], d["early_dialogs"], d["active_dialogs"]) == (10, 0, 0)


def test_many_instances_mixed_accounts_users_emergency(three: list[ServiceProcess]) -> None:
    msgs = (
        [check(f"acme-{i}", user=f"a{i}", account="acme") for i in range(100)]
        + [check(f"beta-{i}", user=f"b{i}", account="beta") for i in range(100)]
        + [check(f"alice-{i}", user="alice") for i in range(60)]  # no account: user cap 4
        + [check(f"sos-{i}", user=f"s{i}", to="112", account="acme") for i in range(60)]
    )
    random.Random(7).shuffle(msgs)
    replies = fire(three, msgs)

    def allowed(prefix: str) -> int:
        return sum(1 for cid, r in replies.items() if cid.startswith(prefix) and r["decision"] == "allow")

    assert (allowed("acme-"), allowed("beta-"), allowed("alice-"), allowed("sos-")) == (3, 10, 4, 5)
    svc = three[1]
    assert size(svc, "account", "acme") == 3  # emergency calls are final: not in the account cap
    assert size(svc, "account", "beta") == 10
    assert size(svc, "account") == 13
    assert size(svc, "user", "alice@example.com") == 4
    assert size(svc, "emergency") == 5
    assert size(svc, "total") == 22
    c = three[2].client()
    try:
        listed = c.call("profile_list", profile="account", value="acme")["calls"]
    finally:
        c.close()
    assert sorted(x["call_id"] for x in listed) == sorted(
        cid for cid, r in replies.items() if cid.startswith("acme-") and r["decision"] == "allow")
    fire(three, [{"op": "end", "call_id": m["call_id"]} for m in msgs])
    for profile, value in [("account", None), ("user", None), ("emergency", None), ("total", None),
                           ("type", None), ("local", None)]:
        assert size(three[0], profile, value) == 0, profile


def test_killed_instance_calls_survive_and_end_releases(redis_url: str, relaxed: Path) -> None:
    a = ServiceProcess(store=redis_url, config=relaxed).start()
    try:
        c = a.client()
        for i in range(3):
            assert c.call("check", call_id=f"k{i}", **{"from": f"sip:k{i}@example.com"},
                          to="sip:2000@example.com", account="acme")["decision"] == "allow"
        assert c.call("answer", call_id="k0")["found"]
        c.close()
    finally:
        a.stop(signal.SIGKILL)
    b = ServiceProcess(store=redis_url, config=relaxed).start()
    try:
        assert size(b, "account", "acme") == 3
        c = b.client()
        # still full: the cap holds across the restart
        r = c.call("check", call_id="k9", **{"from": "sip:k9@example.com"}, to="sip:2000@example.com",
                   account="acme")
        assert r["decision"] == "deny" and r["code"] == 486
        listed = c.call("profile_list", profile="account", value="acme")["calls"]
        assert [x["call_id"] for x in listed] == ["k0", "k1", "k2"]
        assert [x["state"] for x in listed] == ["active", "early", "early"]
        for i in range(3):
            assert c.call("end", call_id=f"k{i}")["released"]
        c.close()
        assert size(b, "account", "acme") == 0
        assert size(b, "total") == 0
    finally:
        b.stop()


def test_lost_bye_expires_even_when_the_admitting_instance_is_gone(redis_url: str, relaxed: Path) -> None:
    short = ["--early-timeout", "0.6", "--default-timeout", "0.9"]
    a = ServiceProcess(store=redis_url, extra=short, config=relaxed).start()
    try:
        c = a.client()
        for i in range(4):
            assert c.call("check", call_id=f"l{i}", **{"from": f"sip:l{i}@example.com"},
                          to="sip:2000@example.com", account="beta")["decision"] == "allow"
        assert c.call("answer", call_id="l0")["found"]  # answered, then its BYE is lost
        c.close()
    finally:
        a.stop(signal.SIGKILL)
    b = ServiceProcess(store=redis_url, extra=short, config=relaxed).start()
    try:
        deadline = time.monotonic() + 5
        while size(b, "account", "beta") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert size(b, "account", "beta") == 0
        assert size(b, "total") == 0
        d = stats(b)["dialogs"]
        assert (d["expired_dialogs"], d["early_dialogs"], d["active_dialogs"]) == (4, 0, 0)
    finally:
        b.stop()


def test_redis_killed_during_load(redis_server: RedisServer) -> None:
    """Redis dies, hangs, comes back: no crash, store-error policy within the bound, then exact."""
    rs = RedisServer().start()
    svc = ServiceProcess(store=rs.url).start()
    stop = threading.Event()
    load_errors: list[BaseException] = []

    def load() -> None:  # background load on another connection all along
        c = svc.client()
        i = 0
        try:
            while not stop.is_set():
                c.call("check", call_id=f"bg{i}", **{"from": f"sip:bg{i}@example.com"},
                       to="sip:2000@example.com", account=f"bg{i % 50}")
                c.call("end", call_id=f"bg{i}")
                i += 1
        except BaseException as exc:
            load_errors.append(exc)
        finally:
            c.close()

    t = threading.Thread(target=load)
    t.start()
    c = svc.client()
    n = 0

    def timed(**kw: Any) -> tuple[dict[str, Any], float]:
        nonlocal n
        n += 1
        msg = check(f"x{n}", user=f"x{n}", **kw)
        t0 = time.monotonic()
        r = c.call("check", **{k: v for k, v in msg.items() if k != "op"})
        return r, time.monotonic() - t0

    try:
        time.sleep(0.2)
        r, _ = timed(account="beta")
        assert r["decision"] == "allow" and "store_error" not in r
        for how in ("kill", "hang"):
            if how == "kill":
                rs.stop(signal.SIGKILL)
            else:
                assert rs.proc is not None
                rs.proc.send_signal(signal.SIGSTOP)
            for _ in range(10):
                r, took = timed(account="beta")  # account cap fails closed
                assert (r["decision"], r.get("code"), r["rule"]) == ("deny", 503, "account-cap"), r
                assert "store_error" in r
                assert took < 0.05 + 0.3
                r, took = timed(to="112", account="beta")  # emergency fails open
                assert r["decision"] == "allow" and "store_error" in r, r
                assert took < 0.05 + 0.3
            assert svc.proc is not None and svc.proc.poll() is None
            t_back = time.monotonic()
            if how == "kill":
                rs = RedisServer(port=rs.port).start()
            else:
                assert rs.proc is not None
                rs.proc.send_signal(signal.SIGCONT)
            while True:
                r, _ = timed(account="beta")
                if "store_error" not in r:
                    break
                assert time.monotonic() - t_back < 1.0, "not exact again within a second"
                time.sleep(0.02)
            assert r["decision"] == "allow"
        s = stats(svc)
        assert s["decisions"].get("store_deny", 0) >= 20 and s["decisions"].get("store_allow", 0) >= 20
        assert any(e.get("event") == "decision" and e.get("store_error") for e in svc.log_events())
    finally:
        stop.set()
        t.join(10)
        c.close()
        assert svc.proc is not None and svc.proc.poll() is None, "the service died"
        svc.stop()
        if rs.proc is not None:
            rs.proc.send_signal(signal.SIGCONT)
        rs.stop()
    assert not load_errors, load_errors


def test_undo_never_undoes_a_confirmed_retry(private_redis: RedisServer) -> None:
    """Issue 8, through the service (store timeout 50 ms): acme (cap 3) holds 2; Redis is
    SIGSTOPped; check A -> 503 within the bound; SIGCONT after 1 s and retry A at once: it is
    allowed (its reserve ran late in Redis and the retry takes it over, or the late reserve was
    undone first and the retry admitted anew); either way acme reads 3 afterwards (A is held,
    by the retry's token) and a fourth call is refused: never 4 up on a cap of 3."""
    svc = ServiceProcess(store=private_redis.url).start()
    c = svc.client()
    try:
        for i in (1, 2):
            assert ask(c, check(f"x{i}", user=f"x{i}", account="acme"))["decision"] == "allow"
        assert private_redis.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        r = ask(c, check("A", user="a", account="acme"))
        assert (r["decision"], r.get("code")) == ("deny", 503) and "store_error" in r, r
        assert time.monotonic() - t0 < 0.05 + 0.3
        time.sleep(1.0)
        private_redis.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 3
        while True:  # retry at once, and again while the store is still reconnecting
            r = ask(c, check("A", user="a", account="acme"))
            if "store_error" not in r:
                break
            assert time.monotonic() < deadline, r
            time.sleep(0.01)
        assert r["decision"] == "allow", r
        token = r["token"]
        time.sleep(1.0)  # any undo parked for the first check has been applied by now
        assert size(svc, "account", "acme") == 3
        r = ask(c, check("D", user="d", account="acme"))
        assert (r["decision"], r.get("code")) == ("deny", 486), r
        assert c.call("end", call_id="A", token=token)["released"]
        assert size(svc, "account", "acme") == 2
    finally:
        c.close()
        svc.stop()


def test_redis_restarted_empty_is_logged_and_counted(private_redis: RedisServer) -> None:
    """Redis restarts without its data under a running service: checks follow on_store_error
    until the store has noticed (epoch marker gone), `redis_data_lost` is logged as an error and
    counted in `stats` -> store_info.data_losses; afterwards checks are exact again."""
    svc = ServiceProcess(store=private_redis.url).start()
    c = svc.client()
    try:
        for i in range(3):
            assert ask(c, check(f"y{i}", user=f"y{i}", account="acme"))["decision"] == "allow"
        port = private_redis.port
        private_redis.stop(signal.SIGKILL)
        r = ask(c, check("z0", user="z0", account="acme"))
        assert (r["decision"], r.get("code")) == ("deny", 503), r
        restarted = RedisServer(port=port).start()
        try:
            deadline = time.monotonic() + 3
            while True:
                r = ask(c, check("z1", user="z1", account="beta"))
                if "store_error" not in r:
                    break
                assert time.monotonic() < deadline, r
                time.sleep(0.02)
            assert r["decision"] == "allow"
            info = stats(svc)["store_info"]
            assert info["data_losses"] == 1 and info["state"] == "up", info
            events = svc.log_events()
            lost = [e for e in events if e.get("event") == "redis_data_lost"]
            assert len(lost) == 1 and lost[0]["level"] == "error", lost
            assert any(e.get("event") == "redis_rebuilt" for e in events)
        finally:
            restarted.stop()
    finally:
        c.close()
        svc.stop()
