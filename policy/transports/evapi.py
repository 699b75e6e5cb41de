"""Kamailio evapi connector: the service connects to Kamailio's evapi module as a TCP client.

Kamailio's `evapi` module is the TCP server (`modparam("evapi", "bind_addr", ...)`); the
service opens one connection to every node in `settings.evapi_nodes` and keeps it open,
reconnecting with exponential backoff (0.1 s doubling, capped at
`settings.evapi_reconnect_max`) whenever Kamailio restarts, the connection drops or the
authentication fails.

Both directions are netstrings carrying JSON objects. Two kinds travel on a connection:

- **the service's protocol**: Kamailio's `check` (echoed `tindex`/`tlabel` in the reply so
  `t_continue` finds the transaction) and its `answer`/`refresh`/`end` notices, handled by
  `PolicyService.handle`;
- **JSON-RPC 2.0** (objects with a `jsonrpc` key) between this connector and the shipped
  config: Kamailio's `callpolicy.challenge` on connect, our `callpolicy.auth`, and our reads of
  the node's dialog list (`dlg.briefing`, `dlg.dlg_list`, run by `jsonrpc_exec` in the config).

**Authentication** (challenge-response, the shared secret never crosses the wire): on accept
the config sends `{"method":"callpolicy.challenge","params":{"nonce":N}}`; we answer
`callpolicy.auth` with `proof = sha256(N + ":" + secret)` and a nonce M of ours; the config
checks the proof, tags the connection "callpolicy" (only tagged connections get checks and
notices) and answers with `sha256(M + ":" + secret + ":kamailio")`, which we check before we
trust anything the connection sends: a process squatting the evapi port gets no secret and
sends us no check. Until then a connection reads at most `settings.max_message` bytes; after
it, `settings.evapi_max_message` (dialog lists are big).

What gets a reply:

- `answer`, `refresh` and `end` are notices from `event_route[dialog:*]`: **no** reply unless
  the message carries an `id`. Nothing in Kamailio waits for them.
- every other op (`check`, `ping`, ...) gets a reply, also when it failed (`ok: false` with
  `tindex`/`tlabel` echoed, so the suspended transaction is resumed and the config's
  fail-open/fail-closed switch decides).
- a frame that is not a JSON object is logged and dropped: it cannot name a transaction.

Requests in flight when the connection drops run to the end: a notice still reaches the store.
Replies are written as soon as each is ready. `TCP_NODELAY` is set on connect and `TCP_QUICKACK`
after every read (Kamailio sets neither; without the quick ACK its writes wait ~20 ms).

Each node is a `policy.reconcile.DialogSource`: after every successful authentication it asks
the reconciler (`service.reconciler`) to compare its dialog list with the store. It is also a
`policy.terminate.DialogEnder`: `end_dialogs` reads the dialog (`dlg.dlg_list`) and ends it
with `dlg.terminate_dlg CALLID FROMTAG TOTAG` when confirmed (a BYE to both sides; Kamailio
5.6 sends BYE only for a confirmed dialog), with `tm.cancel CALLID CSEQ` when early (a CANCEL
to the callee, whose 487 goes back to the caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import orjson
import structlog

from policy import protocol as P
from policy.auth import Peer
from policy.errors import ProtocolError, RequestError
from policy.reconcile import DialogDetail, DialogSourceError, LiveDialog
from policy.settings import split_hostport
from policy.terminate import EndedDialog
from policy.wire import Framing, StreamDecoder, encode

log = structlog.get_logger("policy.transports.evapi")

NOTICE_OPS = frozenset({"answer", "refresh", "end"})
INITIAL_BACKOFF = 0.1
CONNECT_TIMEOUT = 5.0
AUTH_TIMEOUT = 5.0
RPC_TIMEOUT = 30.0
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_JSONRPC = b'{"jsonrpc"'
#: Kamailio dialog states (dlg_hash.h): 1 unconfirmed, 2 early, 3 confirmed (no ACK yet),
#: 4 confirmed, 5 deleted (ended, about to be freed).
_STATES = {1: "early", 2: "early", 3: "active", 4: "active"}


class _Service(Protocol):
    info_providers: dict[str, Callable[[], Any]]

    async def handle(self, req: P.Request, peer: Peer) -> dict[str, Any]: ...


class _Reconciler(Protocol):
    def add_source(self, source: Any) -> None: ...

    def trigger(self, name: str) -> None: ...


class AuthError(DialogSourceError):
    """The node refused our proof, or could not prove it knows the secret."""


def needs_reply(req: P.Request) -> bool:
    """Whether a message from Kamailio gets a reply (notices only when they carry an `id`)."""
    return req.id is not None or req.op not in NOTICE_OPS


def proof(nonce: str, secret: str, suffix: str = "") -> str:
    """sha256(nonce ":" secret [":" suffix]) in hex, as the shipped config computes it."""
    text = f"{nonce}:{secret}" + (f":{suffix}" if suffix else "")
    return hashlib.sha256(text.encode()).hexdigest()


# -- Kamailio's RPC shapes (dialog module, 5.6) ----------------------------------------------


def parse_briefing(result: Any) -> list[LiveDialog]:
    """`dlg.briefing cFIs` -> live dialogs: a list of {call-id, from_tag, init_ts, state, ...}."""
    if not isinstance(result, list):
        raise DialogSourceError(f"dlg.briefing: expected a list, got {type(result).__name__}")
    out = []
    for row in result:
        if not isinstance(row, dict) or not isinstance(row.get("call-id"), str):
            raise DialogSourceError(f"dlg.briefing: unexpected entry {str(row)[:200]}")
        out.append(LiveDialog(row["call-id"], str(row.get("from_tag") or ""),
                              _STATES.get(int(row.get("state") or 0), "ended"), float(row.get("init_ts") or 0)))
    return out


def parse_dialog(result: Any) -> DialogDetail | None:
    """`dlg.dlg_list CALLID FROMTAG` -> the dialog with its variables ({} when there is none).

    The check request the config stored in `$dlg_var(cp_req)` gives the call's fields; without
    it (a config that does not keep it) the dialog's From and To URIs are all there is.
    """
    if not isinstance(result, dict) or not isinstance(result.get("call-id"), str):
        return None
    variables: dict[str, str] = {}
    for item in result.get("variables") or []:
        if isinstance(item, dict):
            variables.update({str(k): str(v) for k, v in item.items() if v is not None})
    request: dict[str, Any] = {}
    raw = variables.get("cp_req")
    if raw:
        with contextlib.suppress(orjson.JSONDecodeError):
            loaded = orjson.loads(raw)
            if isinstance(loaded, dict):
                request = loaded
    if not request:
        request = {"from": str(result.get("from_uri") or ""), "to": str(result.get("to_uri") or "")}
    caller = result.get("caller")
    from_tag = caller.get("tag") if isinstance(caller, dict) else None
    return DialogDetail(result["call-id"], str(from_tag or ""),
                        _STATES.get(int(result.get("state") or 0), "ended"), float(result.get("init_ts") or 0),
                        request, variables.get("cp_token", ""))


def dialog_rows(result: Any) -> list[dict[str, Any]]:
    """`dlg.dlg_list CALLID [FROMTAG]` -> its dialogs: none ({}), one (an object) or several (a list)."""
    rows = result if isinstance(result, list) else [result]
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("call-id"), str)]


def _leg(row: dict[str, Any], side: str, key: str) -> str:
    leg = row.get(side)
    value = leg.get(key) if isinstance(leg, dict) else None
    return str(value) if value is not None else ""


def dialog_token(row: dict[str, Any]) -> str:
    """The admission token the config keeps with a listed dialog (`$dlg_var(cp_token)`), or ""."""
    for item in row.get("variables") or ():
        if isinstance(item, dict) and isinstance(item.get("cp_token"), str):
            return str(item["cp_token"])
    return ""


def end_request(row: dict[str, Any]) -> tuple[str, str, str, list[str] | None]:
    """How to end one listed dialog: (from_tag, state, action, params of the RPC or None).

    Confirmed (3, 4): `dlg.terminate_dlg [callid, fromtag, totag]` (BYE both ways); early
    (1, 2): `tm.cancel [callid, cseq]` (CANCEL downstream); deleted (5): nothing, it is ending.
    """
    call_id = str(row["call-id"])
    from_tag = _leg(row, "caller", "tag")
    code = int(row.get("state") or 0)
    state = _STATES.get(code, "ended")
    if code in (3, 4):
        return from_tag, state, "bye", [call_id, from_tag, _leg(row, "callee", "tag")]
    if code in (1, 2):
        cseq = _leg(row, "caller", "cseq").split(" ", 1)[0] or "1"
        return from_tag, state, "cancel", [call_id, cseq]
    return from_tag, state, "none", None


_END_METHODS = {"bye": "dlg.terminate_dlg", "cancel": "tm.cancel"}


# -- the connection ------------------------------------------------------------------------


class EvapiProtocol(asyncio.Protocol):
    """One connection to one Kamailio evapi node."""

    def __init__(self, node: EvapiNode) -> None:
        self.node = node
        self.service = node.service
        self.decoder = StreamDecoder(node.max_message)
        self.transport: asyncio.Transport | None = None
        self.sock: Any = None
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.auth_done: asyncio.Future[None] = loop.create_future()
        self.authenticated = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._auth_id: int | None = None
        self._expected_proof = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.sock = transport.get_extra_info("socket")
        if self.sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._quickack()

    def _quickack(self) -> None:
        if _QUICKACK is not None and self.sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        # requests in flight run to the end: a notice (answer/end) must still reach the store
        # even though its connection is gone; only the reply has nowhere to go
        self.transport = None
        self.authenticated = False
        self._fail(DialogSourceError("the evapi connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if not self.auth_done.done():
            self.auth_done.set_exception(exc)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()

    def close(self) -> None:
        """Close the connection (the node reconnects)."""
        if self.transport is not None:
            self.transport.close()

    def write(self, data: dict[str, Any]) -> None:
        """Send one netstring frame (dropped when the connection is gone)."""
        if self.transport is not None:
            self.transport.write(encode(data, Framing.NETSTRING))

    def data_received(self, data: bytes) -> None:
        self._quickack()  # Linux clears QUICKACK again after a while: set it after every read
        dec = self.decoder
        dec.receive_data(data)
        if not self.authenticated and dec.buffered > self.node.pre_auth_max:
            self._protocol_error(ProtocolError("too_long", f"more than {self.node.pre_auth_max} bytes "
                                                           "before authentication"))
            return
        while True:
            try:
                event = dec.next_event()
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is None:
                return
            payload = event.payload
            if payload.startswith(_JSONRPC):
                self._jsonrpc(payload)
                continue
            if not self.authenticated:
                self.node.bad_messages += 1
                log.warning("evapi_unexpected_before_auth", node=self.node.name, size=len(payload))
                continue
            self.node.received += 1
            task = asyncio.ensure_future(self._answer(payload))
            if not task.done():
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("evapi_protocol_error", node=self.node.name, code=exc.code, error=exc.message)
        self.node.protocol_errors += 1
        self._fail(DialogSourceError(f"protocol error: {exc.message}"))
        self.close()  # reconnects: a fresh stream resynchronises

    # -- JSON-RPC with the config ------------------------------------------------------

    def _jsonrpc(self, payload: bytes) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict):
            self.node.bad_messages += 1
            log.warning("evapi_bad_message", node=self.node.name, code="invalid_json", error="bad JSON-RPC frame")
            return
        method = msg.get("method")
        if method == "callpolicy.challenge":
            self._challenge(msg)
        elif method is None:
            self._response(msg)
        else:
            self.node.bad_messages += 1
            log.warning("evapi_unknown_request", node=self.node.name, method=str(method)[:64])

    def _challenge(self, msg: dict[str, Any]) -> None:
        params = msg.get("params")
        nonce = params.get("nonce") if isinstance(params, dict) else None
        if self._auth_id is not None or not isinstance(nonce, str) or not 0 < len(nonce) <= 256:
            log.warning("evapi_bad_challenge", node=self.node.name)
            self._fail(AuthError("bad or repeated challenge"))
            self.close()
            return
        mine = secrets.token_hex(16)
        self._expected_proof = proof(mine, self.node.secret, "kamailio")
        self._auth_id = self.node.next_id()
        self.write({"jsonrpc": "2.0", "method": "callpolicy.auth",
                    "params": {"proof": proof(nonce, self.node.secret), "nonce": mine}, "id": self._auth_id})

    def _response(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if rid is not None and rid == self._auth_id and not self.authenticated:
            result = msg.get("result")
            given = result.get("proof") if isinstance(result, dict) else None
            if isinstance(given, str) and hmac.compare_digest(given, self._expected_proof):
                # verified before the next frame is read: the checks that follow are trusted
                self.authenticated = True
                if not self.auth_done.done():
                    self.auth_done.set_result(None)
                return
            err = msg.get("error")
            why = (err.get("message") if isinstance(err, dict) else None) or "the node's proof is wrong"
            self._fail(AuthError(f"authentication failed: {why}"))
            self.close()
            return
        fut = self.pending.pop(rid, None) if isinstance(rid, int) else None
        if fut is None:
            log.debug("evapi_unexpected_response", node=self.node.name, id=rid)
        elif not fut.done():
            fut.set_result(msg)

    async def request(self, method: str, params: Any, timeout: float) -> Any:
        """One JSON-RPC request to the config; its `result` (raises DialogSourceError)."""
        if not self.authenticated or self.transport is None:
            raise DialogSourceError("not connected")
        rid = self.node.next_id()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        self.write({"jsonrpc": "2.0", "method": method, "params": params, "id": rid})
        try:
            msg = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise DialogSourceError(f"{method}: no answer within {timeout:g} s") from None
        finally:
            self.pending.pop(rid, None)
        err = msg.get("error")
        if err is not None:
            raise DialogSourceError(f"{method}: {err.get('message') if isinstance(err, dict) else err}")
        return msg.get("result")

    # -- the service's protocol --------------------------------------------------------------

    async def _answer(self, payload: bytes) -> None:
        try:
            req = P.decode(payload)
        except RequestError as exc:
            # answered all the same: a bad check still names the transaction to resume
            echoed = P.echo_of(payload)
            log.warning("evapi_bad_message", node=self.node.name, code=exc.code, error=exc.message)
            self.node.bad_messages += 1
            if "tindex" in echoed:
                self.write(P.error(exc.code, exc.message, echoed))
            return
        result = await self.service.handle(req, self.node.peer)
        if needs_reply(req) and self.transport is not None:
            self.write(result)
            self.node.replied += 1


class EvapiNode:
    """Keeps one authenticated connection to a Kamailio evapi node open; a `DialogSource`."""

    def __init__(self, service: _Service, name: str, max_message: int, reconnect_max: float, *,
                 secret: str = "", evapi_max_message: int | None = None,
                 on_ready: Callable[[str], None] | None = None, rpc_timeout: float = RPC_TIMEOUT) -> None:
        self.service = service
        self.name = name
        self.host, self.port = split_hostport(name)
        self.pre_auth_max = max_message
        self.max_message = max(evapi_max_message or max_message, max_message)
        self.reconnect_max = max(reconnect_max, INITIAL_BACKOFF)
        self.secret = secret
        self.on_ready = on_ready
        self.rpc_timeout = rpc_timeout
        self.peer = Peer("evapi", name, "proxy", name=name, node=name)
        self.protocol: EvapiProtocol | None = None
        self.connected_since: float | None = None
        self.connects = 0
        self.auth_failures = 0
        self.received = 0
        self.replied = 0
        self.bad_messages = 0
        self.protocol_errors = 0
        self.last_error: str | None = None
        self.task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        """A JSON-RPC id unique on this node."""
        return next(self._ids)

    @property
    def connected(self) -> bool:
        """Connected and authenticated."""
        p = self.protocol
        return p is not None and p.transport is not None and p.authenticated

    def info(self) -> dict[str, Any]:
        """What `stats` shows for this node."""
        return {
            "connected": self.connected,
            "since": self.connected_since,
            "connects": self.connects,
            "auth_failures": self.auth_failures,
            "received": self.received,
            "replied": self.replied,
            "bad_messages": self.bad_messages,
            "protocol_errors": self.protocol_errors,
            "last_error": self.last_error,
        }

    # -- DialogSource -------------------------------------------------------------------

    async def _rpc(self, method: str, params: Any) -> Any:
        proto = self.protocol
        if proto is None:
            raise DialogSourceError("not connected")
        return await proto.request(method, params, self.rpc_timeout)

    async def dialogs(self) -> list[LiveDialog]:
        """The node's dialogs (`dlg.briefing` with Call-ID, From-tag, init time, state)."""
        return parse_briefing(await self._rpc("dlg.briefing", ["cFIs"]))

    async def dialog(self, call_id: str, from_tag: str) -> DialogDetail | None:
        """One dialog with its variables (`dlg.dlg_list`), or None."""
        params = [call_id, from_tag] if from_tag else [call_id]
        return parse_dialog(await self._rpc("dlg.dlg_list", params))

    # -- DialogEnder ----------------------------------------------------------------------

    async def end_dialogs(self, call_id: str, from_tag: str) -> list[EndedDialog]:
        """End this node's dialogs with the Call-ID (and From-tag unless ""): BYE or CANCEL."""
        params = [call_id, from_tag] if from_tag else [call_id]
        out = []
        for row in dialog_rows(await self._rpc("dlg.dlg_list", params)):
            ftag, state, action, rpc_params = end_request(row)
            error = ""
            if rpc_params is not None:
                try:
                    await self._rpc(_END_METHODS[action], rpc_params)
                except DialogSourceError as exc:
                    error = str(exc)
            log.info("evapi_dialog_end", node=self.name, call_id=call_id, from_tag=ftag, state=state,
                     action=action, error=error or None)
            out.append(EndedDialog(str(row["call-id"]), ftag, state, action, error, dialog_token(row)))
        return out

    # -- connection life ----------------------------------------------------------------

    async def _connect(self) -> EvapiProtocol:
        loop = asyncio.get_running_loop()
        _transport, proto = await asyncio.wait_for(
            loop.create_connection(lambda: EvapiProtocol(self), self.host, self.port), CONNECT_TIMEOUT)
        self.protocol = proto
        try:
            await asyncio.wait_for(proto.auth_done, AUTH_TIMEOUT)
        except TimeoutError:
            proto.close()
            raise AuthError("no challenge or answer from the node within "
                            f"{AUTH_TIMEOUT:g} s (is it running the shipped kamailio.cfg?)") from None
        except DialogSourceError:
            proto.close()
            raise
        return proto

    async def run(self) -> None:
        """Connect, authenticate, wait for the connection to drop, back off, again - until cancelled."""
        backoff = INITIAL_BACKOFF
        failures = 0
        while True:
            try:
                proto = await self._connect()
            except (TimeoutError, OSError, DialogSourceError) as exc:
                self.protocol = None
                self.last_error = str(exc) or type(exc).__name__
                failures += 1
                if isinstance(exc, AuthError):
                    self.auth_failures += 1
                    log.error("evapi_auth_failed", node=self.name, error=self.last_error, retry_in=backoff)
                elif failures == 1:  # log the first failure of a series, not every retry
                    log.warning("evapi_connect_failed", node=self.name, error=self.last_error, retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max)
                continue
            self.connects += 1
            self.connected_since = time.time()
            log.info("evapi_connected", node=self.name, connects=self.connects, failed_attempts=failures,
                     authenticated=True)
            failures = 0
            backoff = INITIAL_BACKOFF
            if self.on_ready is not None:
                self.on_ready(self.name)
            try:
                await proto.closed
            finally:
                self.protocol = None
                self.connected_since = None
            log.warning("evapi_disconnected", node=self.name, retry_in=backoff)
            await asyncio.sleep(backoff)

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        proto = self.protocol
        if proto is not None:
            proto.close()


Spawn = Callable[[str, Callable[[], Awaitable[None]]], "asyncio.Task[None]"]


async def start_evapi(service: Any, settings: Any, spawn: Spawn | None = None) -> Callable[[], Awaitable[None]]:
    """Connect to every node in `settings.evapi_nodes`; return the closer.

    Each node becomes a dialog source of `service.reconciler` (when there is one), which runs
    after every successful authentication.
    """
    svc = cast(_Service, service)
    reconciler = cast("_Reconciler | None", getattr(service, "reconciler", None))
    secret = settings.evapi_secret()
    nodes = [EvapiNode(svc, name, settings.max_message, settings.evapi_reconnect_max, secret=secret,
                       evapi_max_message=getattr(settings, "evapi_max_message", None),
                       on_ready=reconciler.trigger if reconciler is not None else None)
             for name in dict.fromkeys(settings.evapi_nodes)]
    terminator = getattr(service, "terminator", None)
    for node in nodes:
        if reconciler is not None:
            reconciler.add_source(node)
        if terminator is not None:
            terminator.add_node(node)
        # the server's supervisor (`spawn`) logs and restarts a node loop that fails
        node.task = (spawn(f"evapi {node.name}", node.run) if spawn is not None
                     else asyncio.create_task(node.run(), name=f"evapi {node.name}"))

    def info() -> dict[str, Any]:
        return {"connected": sum(1 for n in nodes if n.connected),
                "nodes": {n.name: n.info() for n in nodes}}

    svc.info_providers["evapi"] = info

    async def close() -> None:
        svc.info_providers.pop("evapi", None)
        for node in nodes:
            if terminator is not None:
                terminator.remove_node(node.name)
        await asyncio.gather(*(n.close() for n in nodes))
        log.info("evapi_stopped", nodes=[n.name for n in nodes])

    return close
