"""/metrics: scraped from running services (families, labels, bounded per-value series), read on
the loop thread (never racing it), and the Grafana dashboard's every metric name exported."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from policy import __version__
from policy.clock import ManualClock
from policy.metrics import MetricsState, ServiceCollector, profile_caps
from policy.rules import load_rules
from policy.server import Server
from policy.settings import Settings
from policy.transports.evapi import proof
from tests.helpers import ROOT, ServiceProcess, free_port

DASHBOARD = ROOT / "integrations" / "grafana" / "callpolicy.json"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text: str = r.read().decode()
    return text


Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(text: str) -> Samples:
    """sample name -> [(labels, value)]."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(smp: Samples, name: str, **labels: str) -> float:
    [(_, v)] = [(lab, v) for lab, v in smp[name] if all(lab.get(k) == x for k, x in labels.items())]
    return v


class FakeKamailio:
    """A TCP listener standing in for a Kamailio evapi node: the service connects to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.conn: socket.socket | None = None
        self._buf = b""

    def accept(self, timeout: float = 10.0) -> socket.socket:
        self.sock.settimeout(timeout)
        self.conn, _ = self.sock.accept()
        self.conn.settimeout(5)
        return self.conn

    def handshake(self, secret: str) -> None:
        """Kamailio's side of the evapi login (docs/kamailio.md): a challenge, the service's proof
        and nonce, our proof back."""
        reply = self.request({"jsonrpc": "2.0", "method": "callpolicy.challenge", "params": {"nonce": "n1"}})
        assert reply["params"]["proof"] == proof("n1", secret), reply
        self.send({"jsonrpc": "2.0", "id": reply["id"],
                   "result": {"proof": proof(reply["params"]["nonce"], secret, "kamailio")}})

    def send(self, msg: dict[str, Any]) -> None:
        assert self.conn is not None
        body = orjson.dumps(msg)
        self.conn.sendall(b"%d:%s," % (len(body), body))

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One netstring request and its netstring reply (evapi's framing). RPCs the service asks
        meanwhile (the reconciliation's dialog list after the login) get an empty answer."""
        assert self.conn is not None
        self.send(msg)
        while True:
            frame = self._frame()
            if "method" in frame and frame.get("method") != "callpolicy.auth":
                self.send({"jsonrpc": "2.0", "id": frame.get("id"), "result": []})
                continue
            return frame

    def _frame(self) -> dict[str, Any]:
        assert self.conn is not None
        buf = self._buf
        while b":" not in buf or len(buf) < buf.index(b":") + 2 + int(buf[: buf.index(b":")]):
            buf += self.conn.recv(65536)
        head = buf.index(b":")
        end = head + 1 + int(buf[:head])
        frame: dict[str, Any] = orjson.loads(buf[head + 1 : end])
        self._buf = buf[end + 1 :]
        return frame

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.sock.close()


@dataclass
class Scraped:
    text: str
    smp: Samples
    ping: dict[str, Any]
    svc: ServiceProcess
    node: str


def _wait_for(port: int, pred: Any, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(port)
        if pred(samples(text)) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """One service that has seen traffic of every kind: checks over TCP and over an evapi node,
    allows, denies, a shadow would-deny, ends (with call records), a sweep and a profile sample."""
    tmp = tmp_path_factory.mktemp("metrics")
    kam = FakeKamailio()
    mport = free_port()
    cfg = tmp / "service.toml"
    cfg.write_text(f"""
[store]
sweep_interval = 0.1
[metrics]
listen = "127.0.0.1:{mport}"
refresh = 0.1
[records]
file = "records/calls.jsonl"
[evapi]
token = "metrics-test-evapi-secret"
""")
    svc = ServiceProcess(workdir=tmp, config=cfg, extra=["--metrics", f"127.0.0.1:{mport}", "--evapi",
                                                          f"127.0.0.1:{kam.port}"]).start()
    try:
        kam.accept()
        kam.handshake("metrics-test-evapi-secret")
        r = kam.request({"op": "check", "call_id": "evapi-1", "account": "beta", "from": "sip:e1@x",
                         "to": "sip:6002@x"})
        assert r["decision"] == "allow", r
        c = svc.client()
        for i in range(4):  # acme's cap is 3: one deny; international: shadow would-deny from the 3rd
            c.call("check", call_id=f"m{i}", account="acme", **{"from": f"sip:u{i}@x", "to": "sip:00491234@x"})
        for i in range(3):
            c.call("end", call_id=f"m{i}")
        c.call("check", call_id="m9", account="gamma", **{"from": "sip:u9@x", "to": "sip:6002@x"})
        c.call("nonsense_op")
        ping = c.call("ping")
        c.close()
        text = _wait_for(mport, lambda s: "callpolicy_dialog_active_dialogs" in s
                         and value(s, "callpolicy_profile_size", profile="total") == 2
                         and value(s, "callpolicy_records_delivered_total", sink="file") == 3)
        yield Scraped(text, samples(text), ping, svc, f"127.0.0.1:{kam.port}")
    finally:
        svc.stop()
        kam.close()


def test_families_and_labels(scraped: Scraped) -> None:
    """Every family the docs list, with its labels and the values the traffic implies."""
    s = scraped.smp
    assert value(s, "callpolicy_build_info", version=__version__, rules_version=scraped.ping["rules_version"]) == 1
    assert value(s, "callpolicy_decisions_total", outcome="allow") == 5
    assert value(s, "callpolicy_decisions_total", outcome="deny") == 1
    assert value(s, "callpolicy_decisions_total", outcome="store_deny") == 0
    assert value(s, "callpolicy_bad_requests_total") == 1
    assert value(s, "callpolicy_rule_decisions_total", rule="account-cap", outcome="deny") == 1
    assert value(s, "callpolicy_rule_decisions_total", rule="international-shadow", outcome="would_deny") == 2
    # the latency histogram: one observation per check, cumulative buckets ending in +Inf
    assert value(s, "callpolicy_check_duration_seconds_count", store="embedded") == 6
    buckets = [(lab["le"], v) for lab, v in s["callpolicy_check_duration_seconds_bucket"]]
    assert buckets[-1] == ("+Inf", 6) and [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert 0 < value(s, "callpolicy_check_duration_seconds_sum", store="embedded") < 6
    # dialogs, store health, notices, connections
    assert value(s, "callpolicy_dialog_active_dialogs") == 0 and value(s, "callpolicy_dialog_early_dialogs") == 2
    assert value(s, "callpolicy_store_up", store="embedded") == 1
    assert value(s, "callpolicy_store_errors_total", store="embedded") == 0
    assert value(s, "callpolicy_store_timeouts_total", store="embedded") == 0
    assert value(s, "callpolicy_store_circuit_state", store="embedded", state="closed") == 1
    assert value(s, "callpolicy_store_circuit_state", store="embedded", state="open") == 0
    assert value(s, "callpolicy_notices_pending") == 0 and value(s, "callpolicy_notices_queued_total") == 0
    assert value(s, "callpolicy_connections_accepted_total") >= 1
    # evapi: the node is connected and its message was counted
    node = scraped.node
    assert value(s, "callpolicy_evapi_nodes") == 1 and value(s, "callpolicy_evapi_nodes_connected") == 1
    assert value(s, "callpolicy_evapi_node_up", node=node) == 1
    assert value(s, "callpolicy_evapi_messages_received_total", node=node) == 1
    assert value(s, "callpolicy_evapi_messages_replied_total", node=node) == 1
    # profiles: totals for every profile, limits, per-value series for acme (override) and the top N
    assert value(s, "callpolicy_profile_size", profile="total") == 2  # evapi-1 and m9 are still held
    assert value(s, "callpolicy_profile_size", profile="account") == 2
    assert value(s, "callpolicy_profile_limit", profile="emergency", shadow="false") == 5
    assert value(s, "callpolicy_profile_limit", profile="international", shadow="true") == 2
    assert value(s, "callpolicy_profile_values", profile="account") == 2
    assert value(s, "callpolicy_profile_value_size", profile="account", value="acme") == 0
    assert value(s, "callpolicy_profile_value_limit", profile="account", value="acme") == 3
    assert value(s, "callpolicy_profile_value_size", profile="account", value="beta") == 1
    assert value(s, "callpolicy_profile_value_limit", profile="account", value="beta") == 10
    assert value(s, "callpolicy_profile_value_size", profile="type", value="local") == 2
    # call records
    assert value(s, "callpolicy_records_emitted_total") == 3
    assert value(s, "callpolicy_records_queued", sink="file") == 0
    # the scrape never fell back to a stale copy; the process collector is there too
    assert value(s, "callpolicy_metrics_stale_scrapes_total") == 0
    assert "process_resident_memory_bytes" in s


def test_names_follow_prometheus_conventions(scraped: Scraped) -> None:
    """Counters end in _total, seconds are in seconds, everything is callpolicy_ and snake_case."""
    for fam in text_string_to_metric_families(scraped.text):
        if not fam.name.startswith("callpolicy_"):
            continue
        assert re.fullmatch(r"callpolicy_[a-z0-9_]+", fam.name), fam.name
        if fam.type == "counter":
            assert all(x.name.endswith(("_total", "_created")) for x in fam.samples), fam.name
        assert "_ms" not in fam.name and "millis" not in fam.name, fam.name


# -- bounded per-value series -----------------------------------------------------------------


def test_per_value_series_stay_bounded_with_1000_accounts(tmp_path: Path) -> None:
    """1,000 accounts with a call each, plus `hot` at 8/10 and `full` at 10/10: per-value series exist
    only for the override (acme), the values at >= 80 % of their cap, and the top 5 - not 1,000."""
    mport = free_port()
    cfg = tmp_path / "service.toml"
    cfg.write_text(f"[metrics]\nlisten = \"127.0.0.1:{mport}\"\nrefresh = 0.1\ntop_n = 5\nnear_limit = 0.8\n")
    with ServiceProcess(workdir=tmp_path, config=cfg, extra=["--metrics", f"127.0.0.1:{mport}"]) as svc:
        c = svc.client()
        for i in range(1000):
            c.send({"op": "check", "call_id": f"a{i}", "account": f"acct{i:04d}", "from": f"sip:u{i}@x",
                    "to": "sip:6002@x"})
        for who, n in (("hot", 8), ("full", 10), ("warm", 7)):
            for i in range(n):
                c.send({"op": "check", "call_id": f"{who}{i}", "account": who, "from": f"sip:{who}{i}@x",
                        "to": "sip:6002@x"})
        for _ in range(1025):
            assert c.recv()["decision"] == "allow"
        c.close()
        text = _wait_for(mport, lambda s: value(s, "callpolicy_profile_size", profile="account") == 1025)
    s = samples(text)
    assert value(s, "callpolicy_profile_values", profile="account") == 1003
    accounts = {lab["value"]: v for lab, v in s["callpolicy_profile_value_size"] if lab["profile"] == "account"}
    # near the cap: hot (8/10), full (10/10) - not warm (7/10); the override: acme (0 calls); top 5 by size:
    # full, hot, warm and two of the 1-call accounts
    assert {"hot", "full", "acme", "warm"} <= set(accounts)
    assert len(accounts) == 6, accounts
    assert (accounts["full"], accounts["hot"], accounts["acme"]) == (10, 8, 0)
    users = [lab for lab, _ in s["callpolicy_profile_value_size"] if lab["profile"] == "user"]
    assert len(users) == 5  # 1,025 users of 1 call each (cap 4): only the top 5
    assert len(s["callpolicy_profile_value_size"]) <= 6 + 5 + 3  # account + user + type (3 values in use)


def test_max_values_caps_series_per_profile() -> None:
    """`max_values` bounds the per-value series of one profile whatever the overrides and near values."""
    rs = load_rules(ROOT / "rules")
    caps = profile_caps(rs)
    assert caps["account"].limit_for("acme") == 3 and caps["account"].limit_for("other") == 10
    assert caps["international"].shadow and caps["international"].default == 2
    assert not caps["emergency"].shadow and caps["emergency"].default == 5


async def test_max_values_bound_in_a_sample(tmp_path: Path) -> None:
    """With max_values = 3 and 10 values at their cap, 3 series; nearest (most over) first."""
    server, _clock = await _server(tmp_path)
    try:
        svc = server.service
        assert svc is not None
        for i in range(10):
            for j in range(4):  # user cap 4: every user at 100 %
                await svc.handle({"op": "check", "call_id": f"c{i}-{j}", "from": f"sip:user{i}@x", "to": "sip:1@x"})
        state = MetricsState(svc, top_n=0, max_values=3)
        state.bind()
        sample = await state.sample_profiles()
        assert len(sample.values["user"]) == 3
        assert all(size == 4 and limit == 4 for size, limit in sample.values["user"].values())
        assert sample.counts["user"] == 10
    finally:
        await server.stop()


# -- read on the loop, never racing it -------------------------------------------------------------


async def _server(tmp_path: Path, metrics: str | None = None) -> tuple[Server, ManualClock]:
    rules = tmp_path / "rules"
    if not rules.exists():
        shutil.copytree(ROOT / "rules", rules)
    settings = Settings(tcp=None, udp=None, unix=None, rules=str(rules), snapshot=None, watch=False,
                        metrics=metrics, base_dir=tmp_path, metrics_refresh=0.05)
    clock = ManualClock()
    server = Server(settings, clock=clock)
    await server.start()
    return server, clock


async def test_scrape_copies_figures_on_the_loop_thread(tmp_path: Path) -> None:
    """Providers (and every counter) are read on the event loop's thread, not the scrape thread."""
    mport = free_port()
    server, _clock = await _server(tmp_path, f"127.0.0.1:{mport}")
    try:
        svc = server.service
        assert svc is not None
        threads: list[int] = []

        def provider() -> dict[str, int]:
            threads.append(threading.get_ident())
            return {"auth_failures": 7}

        svc.info_providers["transport_auth"] = provider
        text = await asyncio.to_thread(scrape, mport)
        assert threads == [threading.get_ident()]  # this test runs on the loop's thread
        # a provider this module has no names for is still exported, untyped, by its key
        assert value(samples(text), "callpolicy_transport_auth_auth_failures") == 7
    finally:
        await server.stop()


async def test_stalled_loop_serves_the_previous_copy(tmp_path: Path) -> None:
    """A scrape while the loop is blocked answers within the timeout from the last copy, and says so."""
    mport = free_port()
    server, _clock = await _server(tmp_path, f"127.0.0.1:{mport}")
    try:
        svc = server.service
        assert svc is not None
        await svc.handle({"op": "check", "call_id": "x1", "from": "sip:a@x", "to": "sip:1@x"})
        await asyncio.to_thread(scrape, mport)  # a fresh copy: 1 allow
        await svc.handle({"op": "check", "call_id": "x2", "from": "sip:b@x", "to": "sip:1@x"})
        result: dict[str, Any] = {}

        def in_thread() -> None:
            t = time.monotonic()
            result["text"] = scrape(mport)
            result["took"] = time.monotonic() - t

        th = threading.Thread(target=in_thread)
        th.start()
        time.sleep(3.0)  # block the loop longer than the snapshot timeout (2 s)
        th.join(10)
        s = samples(result["text"])
        assert value(s, "callpolicy_metrics_stale_scrapes_total") == 1
        assert value(s, "callpolicy_decisions_total", outcome="allow") == 1  # the previous copy
        assert 1.5 < result["took"] < 5.0  # the 2 s snapshot timeout, not the 3 s stall
        s = samples(await asyncio.to_thread(scrape, mport))
        assert value(s, "callpolicy_decisions_total", outcome="allow") == 2
    finally:
        await server.stop()


async def test_provider_contracts(tmp_path: Path) -> None:
    """The keys read from each provider (the integrator aligns the providers with these)."""
    server, _clock = await _server(tmp_path)
    try:
        svc = server.service
        assert svc is not None
        svc.info_providers["loop"] = lambda: {"lag_seconds": 0.002, "lag_max_seconds": 0.04, "stalls": 3,
                                                 "busy_max_ms": 12.5, "p99_ms": 3.0}
        svc.info_providers["radius"] = lambda: {"received": 10, "answered": 9, "dropped": 1, "duplicates": 0,
                                                "access_accept": 7, "access_reject": 2,
                                                "drop_reasons": {"bad_authenticator": 1}}
        svc.store.info = lambda: {"up": False, "errors": 4, "timeouts": 2, "circuit": "half_open",  # type: ignore[method-assign]
                                  "pipeline_depth": 5}
        state = MetricsState(svc)
        state.bind()
        fams = {f.name: f for f in ServiceCollector(state).collect()}
        smp: Samples = {}
        for f in fams.values():
            for x in f.samples:
                smp.setdefault(x.name, []).append((dict(x.labels), x.value))
        assert value(smp, "callpolicy_loop_lag_seconds") == 0.002
        assert value(smp, "callpolicy_loop_lag_max_seconds") == 0.04
        assert value(smp, "callpolicy_loop_stalls_total") == 3
        assert value(smp, "callpolicy_loop_busy_max_seconds") == 0.0125
        assert "callpolicy_loop_p99_ms" not in smp  # figures for people stay out of the metrics
        assert value(smp, "callpolicy_radius_received_total") == 10
        assert value(smp, "callpolicy_radius_requests_total", outcome="access_accept") == 7
        assert value(smp, "callpolicy_radius_requests_total", outcome="answered") == 9
        assert value(smp, "callpolicy_radius_drops_total", reason="bad_authenticator") == 1
        assert value(smp, "callpolicy_store_up", store="embedded") == 0
        assert value(smp, "callpolicy_store_errors_total", store="embedded") == 4
        assert value(smp, "callpolicy_store_timeouts_total", store="embedded") == 2
        assert value(smp, "callpolicy_store_circuit_state", store="embedded", state="half_open") == 1
        assert value(smp, "callpolicy_store_circuit_state", store="embedded", state="closed") == 0
        assert value(smp, "callpolicy_store_pipeline_depth", store="embedded") == 5
    finally:
        await server.stop()


# -- the dashboard ---------------------------------------------------------------------------------

_FUNCS_AND_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                    "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression (or a Grafana `label_values(...)` query) selects."""
    m = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*\w+\s*\)\s*", expr)
    if m:
        return {m.group(1)}
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)  # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # grouping labels
    e = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", e)  # numbers
    names = set()
    for name, call in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", e):
        if call or name.lower() in _FUNCS_AND_WORDS:
            continue
        names.add(name)
    return names


def dashboard_exprs(doc: Any) -> list[str]:
    """Every PromQL string in a Grafana dashboard: targets, variable queries, annotations."""
    out: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            promql = k in ("expr", "definition") or (k == "query" and doc.get("type") == "query")
            if promql and isinstance(v, str):
                out.append(v)
            else:
                out.extend(dashboard_exprs(v))
    elif isinstance(doc, list):
        for v in doc:
            out.extend(dashboard_exprs(v))
    return out


def test_metric_name_extraction() -> None:
    """The extractor itself: names in, labels, functions, grouping, ranges and numbers out."""
    assert metric_names('histogram_quantile(0.99, sum by (le, store) (rate(a_bucket{x="y{z}"}[5m])))') == {"a_bucket"}
    assert metric_names("max by (p) (b) / on (p) max by (p) (c{i=~\"$instance\"}) > 0.8") == {"b", "c"}
    assert metric_names("topk(20, d) or vector(0)") == {"d"}
    assert metric_names("label_values(callpolicy_build_info, instance)") == {"callpolicy_build_info"}
    assert metric_names("sum(increase(e_total[$__rate_interval])) * 1e3") == {"e_total"}


def test_dashboard_uses_only_exported_metric_names(scraped: Scraped) -> None:
    """Every metric name in every expression of the shipped dashboard is one the service exports."""
    doc = orjson.loads(DASHBOARD.read_bytes())
    exprs = dashboard_exprs(doc)
    assert len(exprs) >= 20
    names = set().union(*(metric_names(e) for e in exprs))
    exported = set(scraped.smp)
    missing = sorted(n for n in names if n not in exported)
    assert not missing, f"dashboard names the service does not export: {missing}"
    # and it covers what the dashboard is for
    for needed in ("callpolicy_decisions_total", "callpolicy_rule_decisions_total", "callpolicy_profile_size",
                   "callpolicy_profile_limit", "callpolicy_profile_value_size", "callpolicy_profile_value_limit",
                   "callpolicy_check_duration_seconds_bucket", "callpolicy_store_up",
                   "callpolicy_store_circuit_state", "callpolicy_evapi_node_up", "callpolicy_evapi_nodes_connected"):
        assert needed in names, needed
    # a name the service does not export would be caught
    assert "callpolicy_no_such_metric" not in exported


@pytest.mark.parametrize(("body", "key"), [("refresh = 0", "metrics.refresh"), ("top_n = -1", "metrics.top_n"),
                                           ("near_limit = 1.5", "metrics.near_limit"),
                                           ("max_values = -3", "metrics.max_values")])
def test_bad_metrics_settings_are_refused(tmp_path: Path, body: str, key: str) -> None:
    from policy.errors import SettingsError
    from policy.settings import load_settings

    cfg = tmp_path / "s.toml"
    cfg.write_text(f"[metrics]\n{body}\n")
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load_settings(cfg)
