"""A small blocking client for the admin commands (line-framed JSON over TCP or Unix).

With a `token`, the first request on the connection is `auth`; a refused token raises
`ClientError` (whose message never contains the token).
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

import orjson

from policy.errors import PolicyError
from policy.settings import split_hostport


class ClientError(PolicyError):
    """The service could not be reached or answered garbage."""


class Client:
    """Sends requests and reads their replies, one line each."""

    def __init__(self, server: str | None = None, unix: str | None = None, timeout: float = 5.0,
                 token: str | None = None) -> None:
        self._ids = itertools.count(1)
        self._buf = b""
        try:
            if unix:
                self.where = unix
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(unix)
            else:
                host, port = split_hostport(server or "127.0.0.1:5099")
                self.where = f"{host}:{port}"
                self.sock = socket.create_connection((host, port), timeout=timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise ClientError(f"cannot connect to callpolicy at {unix or server}: {exc}") from None
        self.role: str | None = None
        if token:
            reply = self.request("auth", token=token)
            if not reply.get("ok"):
                err = reply.get("error") or {}
                self.close()
                raise ClientError(f"callpolicy at {self.where} refused the token: {err.get('code')}: "
                                  f"{err.get('message')}")
            self.role = reply.get("role")

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply."""
        msg = {"op": op, "id": next(self._ids), **{k: v for k, v in fields.items() if v is not None}}
        try:
            self.sock.sendall(orjson.dumps(msg) + b"\n")
            while b"\n" not in self._buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ClientError(f"callpolicy at {self.where} closed the connection")
                self._buf += chunk
        except OSError as exc:
            raise ClientError(f"callpolicy at {self.where}: {exc}") from None
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ClientError(f"bad reply from {self.where}: {exc}") from None
        if not isinstance(reply, dict):
            raise ClientError(f"bad reply from {self.where}: not an object")
        return reply

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
