"""The protocol's requests as typed structs, one per `op`, shared by every transport. Pure.

`decode(payload)` turns the bytes of one framed message (see `policy.wire`) into one of
the request structs below, or raises `RequestError` with the code and message the client
is answered with. Unknown fields are ignored (forward compatible); a known field of the
wrong type, a missing required field, an unknown `op` or bytes that are not a JSON object
are errors. When a message fails after its JSON parsed, `echo_of(payload)` still recovers
`id`/`tindex`/`tlabel`, so an error answer always finds its way back to a waiting
transaction (Kamailio's `t_continue`).

Every request class says which role may send it (`ROLE`): `proxy` ops are what a SIP proxy
sends for its calls; `admin` ops read or change everything (a proxy token cannot send them).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec
import orjson

from policy.errors import RequestError

#: The roles a client may hold; an admin may send every op.
ROLES = ("proxy", "admin")
#: Why a call ended, as the protocol spells it (the store counts cancel/failed as failed dialogs).
END_REASONS = ("bye", "cancel", "failed", "timeout", "admin", "reconciled")

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class Request(msgspec.Struct, tag_field="op", kw_only=True, frozen=True):
    """Fields every request may carry; they are echoed in its reply."""

    ROLE: ClassVar[str] = "admin"
    id: int | str | None = None
    tindex: int | None = None
    tlabel: int | None = None

    @property
    def op(self) -> str:
        """The op's name."""
        return str(self.__struct_config__.tag)


class CallFields(Request, kw_only=True, frozen=True):
    """The fields that describe a call to the rules (and identify it)."""

    call_id: str
    from_tag: str = ""
    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None
    ruri: str | None = None
    from_user: str | None = None
    from_domain: str | None = None
    to_user: str | None = None
    to_domain: str | None = None
    ruri_user: str | None = None
    ruri_domain: str | None = None
    account: str | None = None
    src_ip: str | None = None
    attrs: dict[str, str] | None = None
    vars: dict[str, str] | None = None


class Check(CallFields, tag="check", kw_only=True, frozen=True):
    """May this call start? Reserve its slots (or, with dry_run, explain without reserving)."""

    ROLE: ClassVar[str] = "proxy"
    dry_run: bool = False


class Answer(CallFields, tag="answer", kw_only=True, frozen=True):
    """The call was answered (200 OK); `create` counts a call that was never checked."""

    ROLE: ClassVar[str] = "proxy"
    token: str = ""
    timeout: Seconds | None = None
    create: bool = False


class Refresh(Request, tag="refresh", kw_only=True, frozen=True):
    """Extend a call's lease (re-INVITE, interim accounting, keepalive)."""

    ROLE: ClassVar[str] = "proxy"
    call_id: str
    from_tag: str = ""
    token: str = ""
    timeout: Seconds | None = None


class End(Request, tag="end", kw_only=True, frozen=True):
    """The call is over (BYE, CANCEL, a failed call): release its slots."""

    ROLE: ClassVar[str] = "proxy"
    call_id: str
    from_tag: str = ""
    token: str = ""
    reason: str = "bye"


class SetVar(Request, tag="set_var", kw_only=True, frozen=True):
    """Set (or with a null value, delete) one of a held call's variables."""

    ROLE: ClassVar[str] = "proxy"
    call_id: str
    from_tag: str = ""
    name: str
    value: str | None


class Ping(Request, tag="ping", kw_only=True, frozen=True):
    """Liveness."""

    ROLE: ClassVar[str] = "proxy"


class Auth(Request, tag="auth", kw_only=True, frozen=True):
    """Present a token; the connection then holds the token's role."""

    ROLE: ClassVar[str] = "none"
    token: str


class Stats(Request, tag="stats", kw_only=True, frozen=True):
    """Dialog stats, decisions per rule, store and front-end health."""


class ProfileSize(Request, tag="profile_size", kw_only=True, frozen=True):
    """How many calls are in a profile or one of its values (`dlg.profile_get_size`)."""

    profile: str
    value: str | None = None


class ProfileList(Request, tag="profile_list", kw_only=True, frozen=True):
    """A page of the calls in a profile or one of its values (`dlg.profile_list`)."""

    profile: str
    value: str | None = None
    cursor: str = ""
    limit: Count = 100


class ProfileValues(Request, tag="profile_values", kw_only=True, frozen=True):
    """A page of a with-value profile's values and their sizes (OpenSIPS `profile_get_values`)."""

    profile: str
    cursor: str = ""
    limit: Count = 100


class Release(Request, tag="release", kw_only=True, frozen=True):
    """An operator's forced release of one call (`call_id`), or of every call in a profile key."""

    call_id: str | None = None
    from_tag: str = ""
    profile: str | None = None
    value: str | None = None


class Reload(Request, tag="reload", kw_only=True, frozen=True):
    """Reload the rules now; the reply's `preview` lists the profile keys over their new caps."""


class Top(Request, tag="top", kw_only=True, frozen=True):
    """One refresh of `callpolicy top`: counters, dialogs, health, the keys nearest their caps."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10


class Terminate(Request, tag="terminate", kw_only=True, frozen=True):
    """Ask the proxy that holds a call (`call_id`, `from_tag` unless any), or every call in a
    profile key, to end it (BYE/CANCEL); `wait` seconds for the releases its notices bring."""

    call_id: str | None = None
    from_tag: str | None = None
    profile: str | None = None
    value: str | None = None
    wait: Annotated[float, msgspec.Meta(ge=0, le=30)] = 2.0


class Reconcile(Request, tag="reconcile", kw_only=True, frozen=True):
    """Compare the store with the proxies' own dialog lists and repair it (`dry_run`: only report)."""

    node: str | None = None
    dry_run: bool = False


AnyRequest = (
    Check | Answer | Refresh | End | SetVar | Ping | Auth | Stats | ProfileSize | ProfileList
    | ProfileValues | Release | Reload | Reconcile | Top | Terminate
)
OPS: tuple[type[Request], ...] = (Check, Answer, Refresh, End, SetVar, Ping, Auth, Stats, ProfileSize,
                                  ProfileList, ProfileValues, Release, Reload, Reconcile, Top, Terminate)
OP_NAMES = tuple(str(t.__struct_config__.tag) for t in OPS)
_decoder = msgspec.json.Decoder(AnyRequest)
_ECHO = ("id", "tindex", "tlabel")


def decode(payload: bytes) -> AnyRequest:
    """One request from the bytes of one message; raises RequestError (never anything else)."""
    try:
        return _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc), payload) from None
    except msgspec.DecodeError as exc:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("invalid_json", "message is not valid UTF-8") from None
        raise RequestError("invalid_json", f"invalid JSON: {exc}") from None


def _validation_error(text: str, payload: bytes) -> RequestError:
    """msgspec's message as the protocol's error codes (missing_field, unknown_op, bad_field)."""
    if text.startswith("Expected `object`"):
        return RequestError("invalid_json", "message must be a JSON object")
    if text == "Object missing required field `op`":
        return RequestError("missing_field", "'op' is required")
    if text.endswith("- at `$.op`"):
        op = echo_of(payload).get("op")
        return RequestError("unknown_op", f"unknown op {op!r} (known: {', '.join(OP_NAMES)})")
    if text.startswith("Object missing required field"):
        name = text.split("`")[1]
        return RequestError("missing_field", f"{name!r} is required")
    where = text.rsplit("- at `$.", 1)
    field = where[1].rstrip("`") if len(where) == 2 else ""
    field = "from" if field == "from_" else field
    return RequestError("bad_field", f"{field!r}: {where[0].strip()}" if field else where[0].strip())


def echo_of(payload: bytes) -> dict[str, Any]:
    """`op`, `id`, `tindex`, `tlabel` of a message that failed to decode (empty if not JSON)."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("op", *_ECHO) if k in data}


def echo(req: Request) -> dict[str, Any]:
    """The reply's start: the request's id/tindex/tlabel."""
    out: dict[str, Any] = {}
    if req.id is not None:
        out["id"] = req.id
    if req.tindex is not None:
        out["tindex"] = req.tindex
    if req.tlabel is not None:
        out["tlabel"] = req.tlabel
    return out


def error(code: str, message: str, echoed: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error reply."""
    reply = {k: v for k, v in (echoed or {}).items() if k in _ECHO}
    reply["ok"] = False
    reply["error"] = {"code": code, "message": message}
    return reply


def from_dict(data: dict[str, Any]) -> AnyRequest:
    """A request from an already-decoded object (adapters that build requests, tests)."""
    return decode(orjson.dumps(data))
