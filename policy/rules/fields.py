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
from collections.abc import Iterable, Mapping

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
#: Fields the service fills from where a check came, not from the check: `node` is the proxy
#: node or named client that sent it (an evapi node's address, `radius:<client>`, a token's
#: name; empty for an anonymous local client), so a rule can cap the calls each one holds.
PEER_FIELDS: tuple[str, ...] = ("node",)
#: Every field a rule can read from the request itself.
BUILTIN_FIELDS: tuple[str, ...] = ("call_id", *REQUEST_FIELDS, *PEER_FIELDS)
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


def request_fields(call_id: str, given: Mapping[str, str | None] | Iterable[tuple[str, str | None]],
                   attrs: Mapping[str, str] | None = None, max_field: int = 0, node: str = "") -> dict[str, str]:
    """The rule-visible fields of a call: `call_id`, the given string fields (a mapping or
    (name, value) pairs; `None` = absent; names from `REQUEST_FIELDS`), user/domain split out
    of the URIs unless given, and `attrs.NAME` for each entry of `attrs`. Types are the
    protocol's business (it decodes typed requests); this bounds lengths (`max_field` > 0)
    and raises `RequestError` (`bad_field`) for an empty `call_id` or a field that is too
    long. Pure.
    """
    if not call_id:
        raise RequestError("bad_field", "'call_id' must not be empty")
    req: dict[str, str] = {"call_id": call_id}
    for name, val in (given.items() if hasattr(given, "items") else given):  # a Mapping, or pairs
        if val is not None:
            req[name] = val
    for uri, user_key, domain_key in URI_FIELDS:
        value = req.get(uri)
        if value is not None and (user_key not in req or domain_key not in req):
            user, domain = split_uri(value)
            req.setdefault(user_key, user)
            req.setdefault(domain_key, domain)
    if attrs:
        for k, v in attrs.items():
            req[ATTR_PREFIX + k] = v
    if max_field:
        for name, val in req.items():
            if len(val) > max_field:
                raise RequestError("bad_field", f"{name!r} is longer than {max_field} characters")
    if node:
        req["node"] = node
    return req
