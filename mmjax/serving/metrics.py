"""/metrics: one prometheus-client registry per server.

Names follow vLLM's (`vllm:` -> `mmjax:`), so its dashboards carry over. Counters and histograms
are updated by the server as outputs arrive; the engine's state (queue, running, pages, encoder
cache) is read at scrape time from the snapshot the engine thread takes after every step, so a
scrape never touches the engine itself."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class _EngineState:
    """Gauges (and the encoder cache's cumulative counters) from the engine's last stats() snapshot."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, key, doc in [("mmjax:num_requests_waiting", "waiting", "Requests queued, not yet admitted."),
                               ("mmjax:num_requests_running", "running", "Requests in the running batch."),
                               ("mmjax:kv_pages_used", "pages_used", "KV-cache pages held by requests."),
                               ("mmjax:kv_pages_total", "pages_total", "KV-cache pages in the pool."),
                               ("mmjax:encoder_cache_bytes", "encoder_cache_bytes", "Bytes of cached image features.")]:
            yield GaugeMetricFamily(name, doc, value=float(s.get(key, 0)))
        total = s.get("pages_total") or 0
        yield GaugeMetricFamily("mmjax:kv_cache_usage_perc", "Fraction of KV-cache pages in use (0..1).",
                                value=float(s.get("pages_used", 0)) / total if total else 0.0)
        for name, key, doc in [("mmjax:encoder_cache_hits", "encoder_cache_hits", "Images found in the encoder cache."),
                               ("mmjax:encoder_cache_misses", "encoder_cache_misses", "Images encoded (cache misses)."),
                               ("mmjax:num_preemptions", "preemptions", "Requests preempted for pages (recomputed).")]:
            yield CounterMetricFamily(name, doc, value=float(s.get(key, 0)))


class Metrics:
    def __init__(self, model_name: str, engine_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.requests = Counter("mmjax:request_success", "Finished requests, by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.errors = Counter("mmjax:request_errors", "Requests answered with an error, by HTTP status.",
                              labels + ["status"], registry=r)
        self.prompt_tokens = Counter("mmjax:prompt_tokens", "Prompt tokens of admitted requests (images included).",
                                     labels, registry=r)
        self.generation_tokens = Counter("mmjax:generation_tokens", "Tokens generated.", labels, registry=r)
        self.ttft = Histogram("mmjax:time_to_first_token_seconds", "Request arrival to its first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("mmjax:inter_token_latency_seconds", "Time between a request's consecutive tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("mmjax:e2e_request_latency_seconds", "Request arrival to its last token.", labels,
                             buckets=_E2E_BUCKETS, registry=r)
        r.register(_EngineState(engine_stats))
        self.model_name = model_name

    def finished(self, reason: str) -> None:
        self.requests.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
