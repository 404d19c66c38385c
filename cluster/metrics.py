"""Prometheus metrics of one ingress replica (`GET /metrics`, text format, no key).

Requests are counted as they are answered; a video's render time, end-to-end latency, steps per second,
module calls, GPU-seconds and DSP bytes are counted once, when its driver on this replica sees it finished
(from the record the group wrote: the same numbers as `GET /v1/videos/{id}` shows). Each replica has its own
registry: with several ingress replicas, scrape each (Serve's proxy would pick one at random); Ray's own
metrics (`ray.util.metrics`, the node's metrics port) cover the groups' processes.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class IngressMetrics:
    """The ingress's counters and histograms in a registry of its own (never the process-global one)."""

    def __init__(self, pending: Callable[[], float], jobs_by_state: Callable[[], dict[str, int]]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pab_http_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=r)  # fmt: skip
        self.request_seconds = Histogram("pab_http_request_seconds", "time to answer a request", ["route", "method"],
                                         registry=r)  # fmt: skip
        Gauge("pab_queue_depth", "videos accepted and not finished on this replica", registry=r).set_function(pending)
        self._states = jobs_by_state
        self.jobs = Gauge("pab_jobs", "unfinished videos this replica drives, by state", ["state"], registry=r)
        self.finished = Counter("pab_videos_finished", "videos finished, by final status", ["status"], registry=r)
        self.render_seconds = Histogram("pab_render_seconds", "time on a group (start to completion)",
                                        buckets=_SECONDS, registry=r)  # fmt: skip
        self.e2e_seconds = Histogram("pab_end_to_end_seconds", "creation to completion", buckets=_SECONDS,
                                     registry=r)  # fmt: skip
        self.steps_per_second = Histogram("pab_denoise_steps_per_second", "denoising steps per second of a render",
                                          buckets=(0.5, 1, 2, 5, 10, 20, 50, 100, 200), registry=r)  # fmt: skip
        self.module_calls = Counter("pab_module_calls", "attention/MLP module calls of finished renders",
                                    ["kind", "outcome"], registry=r)  # fmt: skip
        self.gpu_seconds = Counter("pab_gpu_seconds", "GPU-seconds of finished renders (0 on CPU groups)", registry=r)
        self.rank_seconds = Counter("pab_rank_seconds", "rank-seconds of finished renders", registry=r)
        self.bytes_sent = Counter("pab_dsp_bytes_sent", "bytes DSP sent between ranks for finished renders",
                                  registry=r)  # fmt: skip

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def video_finished(self, rec: Any) -> None:
        """Count a finished video (a JobRecord) once."""
        self.finished.labels(rec.status).inc()
        if rec.status != "completed":
            return
        t = rec.timings or {}
        if "run_s" in t:
            self.render_seconds.observe(t["run_s"])
        if "total_s" in t:
            self.e2e_seconds.observe(t["total_s"])
        loop_s = t.get("denoise_s") or t.get("engine_s")  # the engine's whole time when it reports no loop time
        if loop_s and rec.total_steps:
            self.steps_per_second.observe(rec.total_steps / loop_s)
        for kind, counts in ((rec.pab or {}).get("stats") or {}).items():
            self.module_calls.labels(kind, "computed").inc(int(counts.get("computed", 0)))
            self.module_calls.labels(kind, "reused").inc(int(counts.get("broadcast", 0)))
        cost = rec.cost or {}
        self.gpu_seconds.inc(cost.get("gpu_seconds", 0.0))
        self.rank_seconds.inc(cost.get("rank_seconds", 0.0))
        self.bytes_sent.inc(cost.get("bytes_sent", 0.0))

    def render(self) -> bytes:
        self.jobs.clear()
        for state, n in self._states().items():
            self.jobs.labels(state).set(n)
        return generate_latest(self.registry)
