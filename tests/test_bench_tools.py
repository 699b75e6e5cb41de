"""The bench's pure helpers: percentile math, reply checking, request templates, the baseline's
counters and the RADIUS reply verification. No sockets, no processes (well under a second)."""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import sys
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import baseline
import bench_radius
import loadgen


def test_buckets_are_exact_below_256_us_and_within_one_percent_above() -> None:
    prev = -1
    for us in [*range(0, 600), 1000, 1023, 1024, 12_345, 999_999, 5_000_000]:
        i = loadgen.bucket_of(us)
        assert i >= prev or us < 600  # monotonic over the sweep
        prev = i
        high = loadgen.bucket_high(i)
        assert high >= us
        if us < 256:
            assert high == us
        else:
            assert (high - us) / us < 0.008


def test_bucket_edges_meet() -> None:
    for i in range(1, 3000):
        assert loadgen.bucket_of(loadgen.bucket_high(i - 1) + 1) == i


def test_percentiles_nearest_rank() -> None:
    h = loadgen.Hist()
    for us in range(1, 101):  # 1..100 us
        h.add(us / 1e6)
    assert h.percentile(50) == pytest.approx(0.050)
    assert h.percentile(99) == pytest.approx(0.099)
    assert h.percentile(100) == pytest.approx(0.100)
    s = h.summary()
    assert s["n"] == 100 and s["max"] == pytest.approx(0.1) and s["lost"] == 0


def test_lost_replies_are_infinitely_slow() -> None:
    h = loadgen.Hist()
    for _ in range(990):
        h.add(0.0002)
    h.lost = 10  # 1 % never answered
    assert h.percentile(99) == pytest.approx(0.2)
    assert math.isinf(h.percentile(99.5))
    s = h.summary()
    assert s["p999"] is None and s["max"] is None  # printed as "lost", not as a small number


def test_percentile_never_above_the_exact_max() -> None:
    h = loadgen.Hist()
    h.add(0.0123456)
    assert h.percentile(50) == pytest.approx(12.3456)


def test_empty_histogram() -> None:
    assert math.isnan(loadgen.Hist().percentile(99))


@pytest.mark.parametrize(("op", "reply", "kind"), [
    ("check", {"id": 1, "ok": True, "decision": "allow", "profiles": []}, "ok"),
    ("check", {"id": 1, "ok": True, "decision": "allow", "duplicate": True}, "duplicate"),
    ("check", {"id": 1, "ok": True, "decision": "allow", "store_error": "down"}, "store_error"),
    ("check", {"id": 1, "ok": True, "decision": "deny", "code": 486, "rule": "user-cap"}, "deny:486:user-cap"),
    ("check", {"id": 1, "ok": False, "error": {"code": "bad_field", "message": "x"}}, "error:bad_field"),
    ("check", {"id": 2, "ok": True, "decision": "allow"}, "wrong_id"),
    ("check", {"id": 1, "ok": True}, "invalid_reply"),
    ("check", None, "invalid_reply"),
    ("check", [1], "invalid_reply"),
    ("end", {"id": 1, "ok": True, "released": True}, "ok"),
    ("end", {"id": 1, "ok": True, "released": False}, "not_released"),
    ("end", {"id": 1, "ok": False, "error": {"code": "store_error"}}, "error:store_error"),
    ("answer", {"id": 1, "ok": True, "found": True}, "ok"),
    ("answer", {"id": 1, "ok": True, "found": False}, "not_found"),
])
def test_reply_kind(op: str, reply: object, kind: str) -> None:
    assert loadgen.reply_kind(op, reply, 1) == kind


def test_parse_lines_bulk_and_garbage() -> None:
    assert loadgen.parse_lines(b'{"a":1}\n{"b":2}') == [{"a": 1}, {"b": 2}]
    assert loadgen.parse_lines(b'{"a":1}\nnot json\n{"b":2}') == [{"a": 1}, None, {"b": 2}]


def test_requests_are_json_with_distinct_users_and_no_emergency_callee() -> None:
    check = orjson.loads(loadgen.request("check", 7, b"t1", 42))
    assert check == {"op": "check", "id": 7, "call_id": "t1-42", "from": "sip:t1u42@bench.example",
                     "to": "sip:6002@bench.example", "account": "t1a42"}
    other = orjson.loads(loadgen.request("check", 8, b"t1", 43))
    assert other["from"] != check["from"] and other["account"] != check["account"]
    held = orjson.loads(loadgen.request("check", 9, b"h", 5, template="held"))
    assert "account" not in held and held["from"] == "sip:hh5@held.example"
    assert orjson.loads(loadgen.request("end", 10, b"t1", 42)) == {"op": "end", "id": 10, "call_id": "t1-42"}
    assert loadgen.call_id(b"t1", 42) == b"t1-42"


def test_end_echoes_a_token() -> None:
    end = orjson.loads(loadgen.request("end", 3, b"t", 1, token="abc"))
    assert end == {"op": "end", "id": 3, "call_id": "t-1", "token": "abc"}


def test_run_keeps_the_token_of_a_check_for_its_end() -> None:
    run = loadgen.Run(("check", "end"), "t", "bench")
    rid, _ = run.encode(0, 5)
    assert run.on_reply(rid, 0, 5, {"id": rid, "ok": True, "decision": "allow", "token": "tok"}, 0.001)
    rid2, msg = run.encode(1, 5)
    assert orjson.loads(msg)["token"] == "tok"
    assert run.on_reply(rid2, 1, 5, {"id": rid2, "ok": True, "released": True}, 0.001)
    assert run.completed_all == 1 and not run.errors


def test_run_counts_a_pair_only_when_both_succeed() -> None:
    run = loadgen.Run(("check", "end"), "t", "bench")
    run.measuring = True
    assert not run.on_reply(1, 0, 1, {"id": 1, "ok": True, "decision": "deny", "code": 486, "rule": "r"}, 0.0)
    assert run.on_reply(2, 0, 2, {"id": 2, "ok": True, "decision": "allow"}, 0.0)
    assert not run.on_reply(3, 1, 2, {"id": 3, "ok": True, "released": False}, 0.0)
    assert run.completed == 0
    assert run.errors == {"check:deny:486:r": 1, "end:not_released": 1}


def test_baseline_counters_cap_and_release() -> None:
    c = baseline.Counters()
    for i in range(4):
        r = c.handle({"op": "check", "id": i, "call_id": f"c{i}", "from": "sip:u@x", "account": f"a{i}"})
        assert loadgen.reply_kind("check", r, i) == "ok"
    r = c.handle({"op": "check", "id": 9, "call_id": "c9", "from": "sip:u@x"})
    assert r["decision"] == "deny" and r["rule"] == "user-cap"
    assert loadgen.reply_kind("end", c.handle({"op": "end", "id": 5, "call_id": "c0"}), 5) == "ok"
    assert loadgen.reply_kind("end", c.handle({"op": "end", "id": 6, "call_id": "c0"}), 6) == "not_released"
    for i in range(3):
        c.handle({"op": "check", "call_id": f"acme{i}", "from": f"sip:v{i}@x", "account": "acme"})
    assert c.handle({"op": "check", "call_id": "acme3", "from": "sip:w@x", "account": "acme"})["decision"] == "deny"
    assert c.handle({"op": "nope"})["error"]["code"] == "unknown_op"
    assert c.handle(None)["ok"] is False


def _radius_reply(code: int, ident: int, req_auth: bytes, secret: bytes, avps: list[bytes],
                  bad_ma: bool = False) -> bytes:
    attrs = b"".join(bench_radius.attr(225, v) for v in avps) + bench_radius.attr(80, b"\x00" * 16)
    head = struct.pack("!BBH", code, ident, 20 + len(attrs))
    ma = hmac.new(secret, head + req_auth + attrs, "md5").digest()
    if bad_ma:
        ma = bytes(16)
    attrs = attrs[:-16] + ma
    auth = hashlib.md5(head + req_auth + attrs + secret).digest()
    return head + auth + attrs


def test_radius_reply_verification() -> None:
    secret, req = b"s3", bytes(range(16))
    ok = _radius_reply(2, 1, req, secret, [b"policy:allow"])
    assert bench_radius.reply_kind(ok, req, secret) == "ok"
    assert bench_radius.reply_kind(ok, req, b"other") == "bad_response_authenticator"
    assert bench_radius.reply_kind(ok, bytes(16), secret) == "bad_response_authenticator"
    deny = _radius_reply(2, 1, req, secret, [b"policy:deny", b"policy_code#486"])
    assert bench_radius.reply_kind(deny, req, secret) == "deny"
    assert bench_radius.reply_kind(_radius_reply(3, 1, req, secret, []), req, secret) == "access_reject"
    assert bench_radius.reply_kind(_radius_reply(2, 1, req, secret, [b"policy:allow"], bad_ma=True), req,
                                   secret) == "bad_message_authenticator"
    assert bench_radius.reply_kind(b"\x02\x01\x00", req, secret) == "garbage"


def test_radius_request_uses_the_loadgen_call_id() -> None:
    pkt = bench_radius.access_request(3, bytes(16), b"rt", 77)
    attrs = bench_radius.attributes(pkt)
    assert attrs is not None
    assert dict((t, v) for t, v, _ in attrs)[44] == loadgen.call_id(b"rt", 77)


def test_radius_request_is_signed_with_a_message_authenticator() -> None:
    """RFC 3579: HMAC-MD5 over the packet with the attribute zeroed (the service drops unsigned
    Access-Requests by default)."""
    secret = b"bench-secret"
    auth = bytes(range(16))
    pkt = bench_radius.access_request(3, auth, b"rt", 77, secret)
    attrs = bench_radius.attributes(pkt)
    assert attrs is not None
    [(_, mac, off)] = [a for a in attrs if a[0] == bench_radius.MESSAGE_AUTHENTICATOR]
    zeroed = pkt[:off] + bytes(16) + pkt[off + 16:]
    assert hmac.compare_digest(hmac.new(secret, zeroed, "md5").digest(), mac)
    assert struct.unpack("!H", pkt[2:4])[0] == len(pkt) and pkt[4:20] == auth
    assert bench_radius.MESSAGE_AUTHENTICATOR not in [t for t, _, _ in
                                                       bench_radius.attributes(
                                                           bench_radius.access_request(3, auth, b"rt", 77)) or []]
