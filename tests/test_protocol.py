"""The typed protocol: one struct per op, clear error codes, and a fuzz rule (a request or a
RequestError, nothing else)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import protocol as P
from policy.errors import RequestError


def test_check_decodes_to_its_struct() -> None:
    """Fields by their protocol names (`from`), unknown fields ignored, echo fields kept."""
    req = P.decode(b'{"op":"check","id":7,"tindex":1,"tlabel":2,"call_id":"a","from_tag":"ft",'
                   b'"from":"sip:1@x","to":"sip:2@x","account":"acme","future_field":[1]}')
    assert isinstance(req, P.Check)
    assert (req.call_id, req.from_tag, req.from_, req.to, req.account) == ("a", "ft", "sip:1@x", "sip:2@x", "acme")
    assert req.op == "check" and req.ROLE == "proxy"
    assert P.echo(req) == {"id": 7, "tindex": 1, "tlabel": 2}


def test_null_means_absent() -> None:
    """A proxy that sends `"account": null` means no account."""
    req = P.decode(b'{"op":"check","call_id":"a","account":null,"from":null}')
    assert isinstance(req, P.Check) and req.account is None and req.from_ is None


@pytest.mark.parametrize(("payload", "code", "text"), [
    (b'{"call_id":"x"}', "missing_field", "'op' is required"),
    (b'{"op":"nope"}', "unknown_op", "unknown op 'nope'"),
    (b'{"op":"check"}', "missing_field", "'call_id' is required"),
    (b'{"op":"check","call_id":5}', "bad_field", "'call_id'"),
    (b'{"op":"check","call_id":"x","from":3}', "bad_field", "'from'"),
    (b'{"op":"check","call_id":"x","attrs":{"a":1}}', "bad_field", "attrs"),
    (b'{"op":"answer","call_id":"x","timeout":-5}', "bad_field", "'timeout'"),
    (b'{"op":"profile_list","profile":"x","limit":0}', "bad_field", "'limit'"),
    (b"[1,2]", "invalid_json", "must be a JSON object"),
    (b'{"op":', "invalid_json", "invalid JSON"),
    (b"\xff\xfe", "invalid_json", "not valid UTF-8"),
])
def test_errors_have_codes(payload: bytes, code: str, text: str) -> None:
    """Every way a message can be wrong maps to one of the protocol's error codes."""
    with pytest.raises(RequestError) as info:
        P.decode(payload)
    assert info.value.code == code
    assert text in info.value.message


def test_a_bad_check_still_names_its_transaction() -> None:
    """A check that fails validation keeps tindex/tlabel for the error reply (Kamailio resumes it)."""
    payload = b'{"op":"check","tindex":12,"tlabel":34,"call_id":5}'
    with pytest.raises(RequestError) as info:
        P.decode(payload)
    reply = P.error(info.value.code, info.value.message, P.echo_of(payload))
    assert reply["tindex"] == 12 and reply["tlabel"] == 34 and reply["ok"] is False


def test_roles() -> None:
    """Proxy ops and admin ops, as issue 'who may ask' lists them."""
    proxy = {t.__struct_config__.tag for t in P.OPS if t.ROLE == "proxy"}
    assert proxy == {"check", "answer", "refresh", "end", "ping", "set_var"}
    admin = {t.__struct_config__.tag for t in P.OPS if t.ROLE == "admin"}
    assert {"reload", "profile_list", "profile_size", "stats", "reconcile", "release"} <= admin


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.dictionaries(
    st.sampled_from(["op", "call_id", "from", "to", "timeout", "attrs", "id", "tindex", "limit", "token"]),
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.sampled_from(P.OP_NAMES) | st.dictionaries(st.text(max_size=3), st.integers() | st.text(max_size=3)),
).map(lambda d: json.dumps(d).encode()))
def test_fuzz_any_payload(payload: bytes) -> None:
    """Any bytes give a request or a RequestError, never anything else."""
    try:
        req = P.decode(payload)
    except RequestError as exc:
        assert exc.code in ("invalid_json", "missing_field", "unknown_op", "bad_field")
        return
    assert isinstance(req, P.Request)
