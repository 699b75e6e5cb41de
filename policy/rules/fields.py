"""The request fields rules can see: THE one list of them, and the pure helper that builds them.

A check carries string fields (`REQUEST_FIELDS`, plus the required `call_id`) and an optional
`attrs` object whose entries become `attrs.NAME` fields. The user and domain parts of the
`from`, `to` and `ruri` URIs are split out (`URI_FIELDS`) unless the proxy sent them. The
service, the RADIUS mapping and the rule compiler all take the names from here.

Time fields (`TIME_FIELDS`) are not sent: the rules compute them from the evaluation time,
and only when a rule uses them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from policy.errors import RequestError
from policy.sip import split_uri

#: The string fields of a check besides `call_id` (missing ones are empty / absent).
REQUEST_FIELDS: tuple[str, ...] = (
    "from",
    "to",
    "ruri",
    "from_user",
    "from_domain",
    "to_user",
    "to_domain",
    "ruri_user",
    "ruri_domain",
    "account",
    "src_ip",
)
#: Every field a rule can read from the request itself.
BUILTIN_FIELDS: tuple[str, ...] = ("call_id", *REQUEST_FIELDS)
#: (uri field, its user field, its domain field).
URI_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("from", "from_user", "from_domain"),
    ("to", "to_user", "to_domain"),
    ("ruri", "ruri_user", "ruri_domain"),
)
#: Fields computed from the evaluation time, in the rules' time zone: `hour` ("00".."23"),
#: `weekday` ("mon".."sun"), `time` ("HH:MM").
TIME_FIELDS: tuple[str, ...] = ("hour", "weekday", "time")
#: Prefix of the free-form fields a proxy passes in `attrs` (`attrs.channels`).
ATTR_PREFIX = "attrs."
#: What may follow `attrs.` in a rule, and the name of a derived (classify) attribute.
ATTR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_REQUEST_FIELD_SET = frozenset(REQUEST_FIELDS)


def is_attr_field(name: str) -> bool:
    """True for a well-formed `attrs.NAME` field."""
    return name.startswith(ATTR_PREFIX) and bool(ATTR_NAME_RE.match(name[len(ATTR_PREFIX):]))


def request_fields(msg: Mapping[str, Any]) -> dict[str, str]:
    """The rule-visible fields of a check message: the given string fields, user/domain split
    out of the URIs (unless given), and `attrs.NAME` for each entry of `attrs`.

    Raises `RequestError` (`missing_field` / `bad_field`) for a missing or empty `call_id` and
    for fields of the wrong type; unknown fields are ignored. Pure.
    """
    call_id = msg.get("call_id")
    if type(call_id) is not str or not call_id:
        if call_id is None:
            raise RequestError("missing_field", "'call_id' is required")
        if not isinstance(call_id, str):
            raise RequestError("bad_field", f"'call_id' must be a string, not {type(call_id).__name__}")
        raise RequestError("bad_field", "'call_id' must not be empty")
    req: dict[str, str] = {"call_id": call_id}
    attrs = None
    for name, val in msg.items():
        if name in _REQUEST_FIELD_SET:
            if type(val) is not str:
                if val is None:
                    continue
                raise RequestError("bad_field", f"{name!r} must be a string, not {type(val).__name__}")
            req[name] = val
        elif name == "attrs":
            attrs = val
    for uri, user_key, domain_key in URI_FIELDS:
        value = req.get(uri)
        if value is not None and (user_key not in req or domain_key not in req):
            user, domain = split_uri(value)
            req.setdefault(user_key, user)
            req.setdefault(domain_key, domain)
    if attrs is not None:
        if not isinstance(attrs, dict):
            raise RequestError("bad_field", "'attrs' must be an object of strings")
        for k, v in attrs.items():
            if not isinstance(v, str):
                raise RequestError("bad_field", f"attrs.{k} must be a string, not {type(v).__name__}")
            req[ATTR_PREFIX + k] = v
    return req
