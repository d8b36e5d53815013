"""``GET /metrics``: the gateway in Prometheus' text format, through the
official ``prometheus_client`` with a registry of its own (never the
process-wide default one, so nothing else in the process leaks into it).

Counted as requests end (``Metrics.request``, ``Metrics.started``); the
models' states, requests in flight, GPU-hours and the batches' progress are
read when Prometheus scrapes (``_Live``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from alvis_fsm.engine.batch.lifecycle import BatchStatus
from alvis_fsm.fronts.gateway.observe.requestlog import Entry
from alvis_fsm.fronts.gateway.slot import models as gm

if TYPE_CHECKING:
    from alvis_fsm.fronts.gateway.observe.batchview import BatchSource
    from alvis_fsm.fronts.gateway.slot.models import Models

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = (gm.COLD, gm.QUEUED, gm.LOADING, gm.READY, gm.FAILED)
# Seconds: from a few ms (a short answer) to the gateway's hold timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
START_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)


class Metrics:
    def __init__(self, models: Models, batches: BatchSource) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "alvis_fsm_requests",
            "Requests the gateway answered, by model, route and HTTP status",
            ["model", "route", "status"],
            registry=r,
        )
        self.errors = Counter(
            "alvis_fsm_request_errors",
            "Requests not answered whole (an error status, or a stream that ended in an error)",
            ["model", "route"],
            registry=r,
        )
        self.latency = Histogram(
            "alvis_fsm_request_duration_seconds",
            "From a request's arrival to the last byte of its answer (held time included)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt = Counter(
            "alvis_fsm_prompt_tokens",
            "Prompt tokens, from the answers' usage",
            ["model"],
            registry=r,
        )
        self.completion = Counter(
            "alvis_fsm_completion_tokens",
            "Completion tokens, from the answers' usage",
            ["model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "alvis_fsm_queue_wait_seconds",
            "A model's job: from submission until it runs",
            ["model"],
            buckets=START_BUCKETS,
            registry=r,
        )
        self.load_time = Histogram(
            "alvis_fsm_load_duration_seconds",
            "A model's job: from running until the gateway can reach its server",
            ["model"],
            buckets=START_BUCKETS,
            registry=r,
        )
        r.register(_Live(models, batches))

    def request(self, entry: Entry) -> None:
        model = entry.model or "-"
        self.requests.labels(model, entry.route, str(entry.status)).inc()
        if not entry.ok:
            self.errors.labels(model, entry.route).inc()
        if entry.model:
            self.latency.labels(model).observe(entry.latency_s)
            if entry.prompt_tokens:
                self.prompt.labels(model).inc(entry.prompt_tokens)
            if entry.completion_tokens:
                self.completion.labels(model).inc(entry.completion_tokens)

    def started(self, model: str, queue_wait: float | None, load_time: float | None) -> None:
        if queue_wait is not None:
            self.queue_wait.labels(model).observe(queue_wait)
        if load_time is not None:
            self.load_time.labels(model).observe(load_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """What is read at scrape time."""

    def __init__(self, models: Models, batches: BatchSource) -> None:
        self.models = models
        self.batches = batches

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked: its families are made at each scrape

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "alvis_fsm_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily(
            "alvis_fsm_requests_in_flight", "Requests held or proxied", labels=["model"]
        )
        used = CounterMetricFamily(
            "alvis_fsm_gpu_hours_used",
            "GPU-hours held by the model's jobs (GPUs × hours running)",
            labels=["model"],
        )
        saved = CounterMetricFamily(
            "alvis_fsm_gpu_hours_saved",
            "GPU-hours the idle stops left unused (until the jobs' time limits)",
            labels=["model"],
        )
        for name, slot in self.models.slots.items():
            now = slot.state
            for s in STATES:
                state.add_metric([name, s], 1.0 if now == s else 0.0)
            in_flight.add_metric([name], float(slot.in_flight))
            used.add_metric([name], slot.gpu_hours_used)
            saved.add_metric([name], slot.gpu_hours_saved)
        yield from (state, in_flight, used, saved)
        progress = GaugeMetricFamily(
            "alvis_fsm_batch_requests",
            "A batch's requests by outcome (total, completed, failed)",
            labels=["batch", "model", "outcome"],
        )
        for b in self.batches.list():
            for outcome, value in (
                ("total", b.total),
                (BatchStatus.COMPLETED.value, b.completed),
                (BatchStatus.FAILED.value, b.failed),
            ):
                progress.add_metric([b.id, b.model, outcome], float(value))
        yield progress
