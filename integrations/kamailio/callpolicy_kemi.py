"""callpolicy client for Kamailio's app_python3: a blocking alternative to evapi.

Loaded by kamailio.cfg when it runs with `-A POLICY_KEMI` (needs the Debian package
`kamailio-python3-modules`). Runs in Kamailio's embedded python3 with the standard library only.

    python_exec("check", "$var(cp)")   # $var(cp): the check as JSON (built with jansson_set)
        -> sets $var(decision) ("allow"/"deny", "" when callpolicy could not answer),
           $var(code), $var(reason), $var(rule), $var(error), and $var(token): the admission's
           token, which the config keeps in $dlg_var(cp_token) and sends back with the notices
    python_exec("notify", "$var(ev)")  # answer/end notices from the dialog event routes
                                       # (call_id, from_tag, token: built by the config)

Each Kamailio process keeps one TCP connection (line-framed JSON) to callpolicy, opened on first
use. The SIP worker blocks for at most CALLPOLICY_TIMEOUT seconds; after a failure to connect it
does not try again for CALLPOLICY_RETRY seconds, so a dead service costs nothing per call (the
config then fails open or closed, as for evapi).

Environment: CALLPOLICY_SERVER ("host:port" or a Unix socket path; default 127.0.0.1:5099),
CALLPOLICY_TIMEOUT (seconds, default 0.5), CALLPOLICY_RETRY (seconds, default 1.0).
"""

import json
import os
import socket
import time

import KSR  # provided by app_python3

SERVER = os.environ.get("CALLPOLICY_SERVER", "127.0.0.1:5099")
TIMEOUT = float(os.environ.get("CALLPOLICY_TIMEOUT", "0.5"))
RETRY = float(os.environ.get("CALLPOLICY_RETRY", "1.0"))


class CallPolicy:
    """One instance per Kamailio; the socket is per process (opened after the fork)."""

    def __init__(self):
        self.sock = None
        self.pid = None
        self.buf = b""
        self.down_until = 0.0
        self.next_id = 0

    def child_init(self, rank):
        return 0

    def _connect(self):
        if self.sock is not None and self.pid == os.getpid():
            return self.sock
        self.sock = None
        if time.monotonic() < self.down_until:
            raise OSError("callpolicy unreachable (waiting before the next attempt)")
        try:
            if SERVER.startswith("/"):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(TIMEOUT)
                s.connect(SERVER)
            else:
                host, port = SERVER.rsplit(":", 1)
                s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.down_until = time.monotonic() + RETRY
            raise
        self.sock, self.pid, self.buf = s, os.getpid(), b""
        return s

    def _close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def request(self, payload):
        """Send one JSON object (a string) and return the reply as a dict; raises OSError/ValueError."""
        msg = json.loads(payload)
        self.next_id += 1
        msg["id"] = self.next_id
        s = self._connect()
        try:
            deadline = time.monotonic() + TIMEOUT
            s.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
            while True:
                while b"\n" not in self.buf:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout("callpolicy did not answer in time")
                    s.settimeout(left)
                    chunk = s.recv(65536)
                    if not chunk:
                        raise OSError("callpolicy closed the connection")
                    self.buf += chunk
                line, self.buf = self.buf.split(b"\n", 1)
                reply = json.loads(line)
                if isinstance(reply, dict) and reply.get("id") == msg["id"]:
                    return reply
        except (OSError, ValueError):
            self._close()  # a late reply must not be read as the next call's answer
            raise

    def check(self, msg, args):
        for name in ("decision", "reason", "rule", "error", "token"):
            KSR.pv.sets("$var(" + name + ")", "")
        KSR.pv.seti("$var(code)", 503)
        try:
            reply = self.request(args)
        except (OSError, ValueError) as exc:
            KSR.pv.sets("$var(error)", str(exc) or type(exc).__name__)
            return 1
        if not reply.get("ok"):
            err = reply.get("error") or {}
            KSR.pv.sets("$var(error)", str(err.get("message", "error")))
            return 1
        KSR.pv.sets("$var(decision)", str(reply.get("decision", "")))
        KSR.pv.sets("$var(token)", str(reply.get("token", "")))
        if reply.get("decision") == "deny":
            KSR.pv.seti("$var(code)", int(reply.get("code", 486)))
            KSR.pv.sets("$var(reason)", str(reply.get("reason", "Call limit reached")))
            KSR.pv.sets("$var(rule)", str(reply.get("rule", "")))
        return 1

    def notify(self, msg, args):
        try:
            self.request(args)
        except (OSError, ValueError) as exc:
            KSR.warn("callpolicy notice not delivered: %s\n" % exc)
        return 1


def mod_init():
    return CallPolicy()
