"""The request fields: the one list, and request_fields(msg) that builds what rules see."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.errors import RequestError
from policy.rules import (
    BUILTIN_FIELDS,
    PEER_FIELDS,
    REQUEST_FIELDS,
    TIME_FIELDS,
    URI_FIELDS,
    load_rules,
    request_fields,
)
from policy.rules.fields import is_attr_field
from tests.test_rules import ROOT


def test_the_lists_fit_together() -> None:
    """call_id + the request fields; every URI's user/domain is a request field; time is apart."""
    assert BUILTIN_FIELDS[0] == "call_id"
    assert BUILTIN_FIELDS[1:] == (*REQUEST_FIELDS, *PEER_FIELDS)
    for uri, user, domain in URI_FIELDS:
        assert {uri, user, domain} <= set(REQUEST_FIELDS)
    assert not set(TIME_FIELDS) & set(BUILTIN_FIELDS)
    assert is_attr_field("attrs.channels")
    assert not is_attr_field("attrs.") and not is_attr_field("attrs.a-b") and not is_attr_field("channels")


def test_request_fields_splits_uris_and_flattens_attrs() -> None:
    """user/domain come out of the URIs unless given; attrs become attrs.NAME; None is absent."""
    req = request_fields("c1", {"from": '"A" <sip:6001@Example.COM:5060>;tag=1', "to": "sip:0044@example.com",
                                "to_user": "given", "ruri": "tel:+4930", "account": "acme", "src_ip": None},
                         {"channels": "4"})
    assert req == {"call_id": "c1", "from": '"A" <sip:6001@Example.COM:5060>;tag=1', "from_user": "6001",
                   "from_domain": "example.com", "to": "sip:0044@example.com", "to_user": "given",
                   "to_domain": "example.com", "ruri": "tel:+4930", "ruri_user": "+4930", "ruri_domain": "",
                   "account": "acme", "attrs.channels": "4"}


@pytest.mark.parametrize(("call_id", "given", "code", "message"), [
    ("", {}, "bad_field", "'call_id' must not be empty"),
    ("x" * 11, {}, "bad_field", "'call_id' is longer than 10 characters"),
    ("x", {"from": "sip:" + "a" * 20}, "bad_field", "'from' is longer than 10 characters"),
])
def test_request_fields_errors(call_id: str, given: dict[str, Any], code: str, message: str) -> None:
    """An empty call_id and over-long fields are RequestErrors with the protocol's codes."""
    with pytest.raises(RequestError) as info:
        request_fields(call_id, given, max_field=10)
    assert (info.value.code, info.value.message) == (code, message)


SHIPPED = load_rules(ROOT / "rules")


@given(st.dictionaries(st.sampled_from(REQUEST_FIELDS), st.one_of(st.text(max_size=30), st.none())),
       st.none() | st.dictionaries(st.from_regex(r"[a-z_]{1,5}", fullmatch=True), st.text(max_size=5)))
def test_any_fields_give_fields_or_a_request_error(given: dict[str, Any], attrs: dict[str, str] | None) -> None:
    """Any fields give either a RequestError or a dict of strings the rules evaluate."""
    try:
        req = request_fields("c", given, attrs, max_field=20)
    except RequestError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in req.items())
    SHIPPED.evaluate(req)
