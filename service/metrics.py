"""Prometheus metrics of one app instance (own registry, so tests can run several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gqtok.service.batcher import Timing

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServiceMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gqtok_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.inference = Histogram("gqtok_inference_seconds", "Inference time per batch", ["model", "direction"],
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("gqtok_queue_seconds", "Time an item waited for its batch", ["model", "direction"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("gqtok_batch_size", "Items per inference batch", ["model", "direction"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("gqtok_queue_depth", "Items waiting", ["model", "direction"], registry=r)
        self.ready = Gauge("gqtok_ready", "1 when every model is loaded, warmed up and not failing", registry=r)

    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def observe_batch(self, model: str, direction: str, t: Timing) -> None:
        self.inference.labels(model, direction).observe(t.inference_s)
        self.batch_size.labels(model, direction).observe(t.batch_size)

    def observe_queue(self, model: str, direction: str, seconds: float) -> None:
        self.queue.labels(model, direction).observe(seconds)

    def set_queue_depth(self, model: str, direction: str, depth: int) -> None:
        self.queue_depth.labels(model, direction).set(depth)
