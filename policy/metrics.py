"""Prometheus metrics: a collector that reads the service's counters when scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from policy.service import PolicyService


class ServiceCollector(Collector):
    """Decisions per rule and outcome, reloads and connection counts (no store round trip)."""

    def __init__(self, service: PolicyService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        """Yield the metric families."""
        s = self.service
        dec = CounterMetricFamily("callpolicy_decisions", "Check decisions by outcome", labels=["outcome"])
        for outcome, n in s.totals.items():
            dec.add_metric([outcome], n)
        yield dec
        per = CounterMetricFamily("callpolicy_rule_decisions", "Limit outcomes per rule",
                                  labels=["rule", "outcome"])
        for (rule, outcome), n in s.decisions.items():
            per.add_metric([rule, outcome], n)
        yield per
        yield CounterMetricFamily("callpolicy_reloads", "Successful rule reloads", value=s.reloads)
        yield CounterMetricFamily("callpolicy_reload_errors", "Refused rule reloads", value=s.reload_errors)
        yield GaugeMetricFamily("callpolicy_rules_loaded", "Rules in force", value=len(s.ruleset.rules))
        if s.last_dialogs is not None:
            for name, value in s.last_dialogs.to_json().items():
                kind = GaugeMetricFamily if name in ("active_dialogs", "early_dialogs") else CounterMetricFamily
                yield kind(f"callpolicy_dialog_{name}", f"Kamailio-style dialog statistic {name} "
                           "(as of the last sweep)", value=value)
        tasks = s.info_providers.get("tasks")
        if tasks is not None:
            restarts = CounterMetricFamily("callpolicy_task_restarts", "Background task failures (each restarted)",
                                           labels=["task"])
            for name, n in tasks().items():
                restarts.add_metric([name], n)
            yield restarts
        conns = s.info_providers.get("connections")
        if conns is not None:
            yield GaugeMetricFamily("callpolicy_connections_open", "Open stream connections",
                                    value=conns()["open"])


def start_metrics(service: PolicyService, host: str, port: int) -> str:
    """Serve /metrics on a thread; returns HOST:PORT."""
    REGISTRY.register(ServiceCollector(service))
    server, _thread = start_http_server(port, addr=host)
    return f"{host}:{server.server_port}"
