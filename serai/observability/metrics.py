"""Prometheus metrics of one app: what the model requests did, read from each request's record
when it ends, and the state of the deployments, engines and ledger, read when /metrics is scraped.

Each app owns its registry (never prometheus_client's global one), so several apps in one process
(tests, a second gateway) never mix their counts. Label values are names this server chose
(models it serves, deployment ids, error codes, status codes): a client cannot mint one, and no
key, organization or content ever becomes one. docs/metrics.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serai.billing.ledger import LedgerWriter
from serai.engines.base import Reporting
from serai.engines.router import Router
from serai.errors import (
    EngineOverloaded,
    LimitsUnavailable,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
)
from serai.observability.request_log import RequestRecord

# The model label of a request that named no model this server serves (or was refused before
# its model was read): one fixed value, however many names clients make up.
UNKNOWN_MODEL = "unknown"

# Refusals before a request ran, for limits, quotas, balance, permissions or a full engine; the
# reason label is their error code.
ADMISSION_CODES = frozenset(str(error.code) for error in (
    RateLimited, QuotaExceeded, LimitsUnavailable, PermissionDenied, EngineOverloaded))

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The metrics of one app. `observe` takes each finished request; `watch` names the router
    and ledger writer whose state a scrape reads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "serai_requests", "Model requests answered, by model, wire protocol and HTTP status.",
            ["model", "protocol", "status"], registry=r)
        self.rejections = Counter(
            "serai_admission_rejections", "Model requests refused before they ran, by the "
            "error code of the refusal.", ["reason"], registry=r)
        self.input_tokens = Counter(
            "serai_input_tokens", "Prompt tokens of the model requests that ran.", ["model"],
            registry=r)
        self.output_tokens = Counter(
            "serai_output_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.ttft = Histogram(
            "serai_time_to_first_token_seconds", "Seconds from a request's arrival to its first "
            "generated token.", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "serai_time_per_output_token_seconds", "Seconds per completion token after the "
            "first, per request of two tokens or more.", ["model"], buckets=TPOT_BUCKETS,
            registry=r)
        self.duration = Histogram(
            "serai_request_duration_seconds", "Seconds from a request's arrival to the end of its "
            "response (the last event of a stream), for requests that ran.", ["model"],
            buckets=DURATION_BUCKETS, registry=r)
        self._fleet = FleetState()
        r.register(self._fleet)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def watch(self, *, router: Router, ledger: LedgerWriter) -> None:
        self._fleet.router = router
        self._fleet.ledger = ledger

    def observe(self, record: RequestRecord) -> None:
        """Count a finished request (model requests only; other paths are not counted)."""
        protocol = record.protocol
        if protocol is None:
            return
        model = record.model or UNKNOWN_MODEL
        self._child(self.requests, model, protocol, str(record.status)).inc()
        if record.error in ADMISSION_CODES:
            self._child(self.rejections, record.error).inc()
        if not record.ran:
            return
        self._child(self.input_tokens, model).inc(record.input_tokens or 0)
        output = record.output_tokens or 0
        self._child(self.output_tokens, model).inc(output)
        duration = record.duration_s
        assert duration is not None, "observed before record.end()"
        self._child(self.duration, model).observe(duration)
        if (ttft := record.ttft_s) is not None:
            self._child(self.ttft, model).observe(ttft)
            if output > 1:
                self._child(self.tpot, model).observe((duration - ttft) / (output - 1))

    def _child(self, metric: Any, *labels: str) -> Any:
        """The metric's child for these label values. labels() takes a lock and builds a key
        on every call, which made up most of a request's metrics cost: each child is looked
        up once."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[metric, labels] = metric.labels(*labels)
        return child

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


# What an embedded engine reports (serai.engines.base.EngineStats field, metric, help).
ENGINE_GAUGES = (
    ("waiting", "serai_engine_waiting_requests",
     "Requests waiting for a free sequence of an embedded engine."),
    ("running", "serai_engine_running_sequences", "Sequences an embedded engine is decoding."),
    ("kv_cache_usage", "serai_engine_kv_cache_usage_ratio",
     "Share of an embedded engine's KV cache holding tokens (running sequences and prefixes "
     "kept for reuse), 0 to 1."),
)


class FleetState(Collector):
    """Gauges read at scrape time, so the request path never updates them: each deployment's
    health and load, what its engine reports (the embedded engine: its waiting line, running
    sequences and KV cache), and the usage rows the ledger writer has yet to write."""

    def __init__(self) -> None:
        self.router: Router | None = None
        self.ledger: LedgerWriter | None = None

    def collect(self) -> Iterator[Metric]:
        labels = ["deployment", "model"]
        up = GaugeMetricFamily(
            "serai_deployment_up", "1 while a deployment's circuit is closed (it takes requests), "
            "0 while it is ejected or on trial.", labels=[*labels, "kind"])
        outstanding = GaugeMetricFamily(
            "serai_deployment_outstanding_requests", "Requests a deployment holds now.",
            labels=labels)
        engine = {field: GaugeMetricFamily(name, help, labels=labels)
                  for field, name, help in ENGINE_GAUGES}
        backlog = GaugeMetricFamily(
            "serai_ledger_backlog", "Usage rows waiting to be written to the database.")
        for deployment in self.router.all() if self.router is not None else ():
            names = [deployment.id, deployment.engine.model.name]
            up.add_metric([*names, deployment.kind],
                          1.0 if deployment.circuit == "closed" else 0.0)
            outstanding.add_metric(names, deployment.outstanding)
            if isinstance(deployment.engine, Reporting):
                stats = deployment.engine.stats()
                for field, family in engine.items():
                    family.add_metric(names, getattr(stats, field))
        set_aside = CounterMetricFamily(
            "serai_ledger_set_aside", "Usage rows the database refused for what they hold, "
            "kept in <data_dir>/ledger-set-aside.jsonl for the operator.")
        if self.ledger is not None:
            backlog.add_metric([], self.ledger.backlog)
            set_aside.add_metric([], self.ledger.set_aside)
        yield from (up, outstanding, *engine.values(), backlog, set_aside)
