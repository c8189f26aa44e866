"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process).

The engine thread updates everything: gauges from `LLMEngine.stats()` after each step,
counters and latency histograms from each request's outputs as they are produced.
prometheus-client's metrics are thread-safe, and /metrics renders them on the event loop.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets in seconds: milliseconds on a GPU up to minutes on a CPU.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclasses.dataclass
class RequestTiming:
    """One engine request's clock (time.monotonic seconds), kept by the engine thread."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("nanoflow_num_requests_running", "requests holding KV pages in the engine", registry=r)
        self.waiting = Gauge("nanoflow_num_requests_waiting",
                             "requests queued for the engine (scheduler queue and not yet handed over)", registry=r)
        self.pages_used = Gauge("nanoflow_kv_pages_used", "KV-cache pages held by requests", registry=r)
        self.pages_free = Gauge("nanoflow_kv_pages_free", "KV-cache pages free", registry=r)
        self.prompt_tokens = Counter("nanoflow_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("nanoflow_generation_tokens", "tokens generated", registry=r)
        self.preemptions = Counter("nanoflow_num_preemptions", "requests preempted (pages freed, recomputed)",
                                   registry=r)
        self.finished = Counter("nanoflow_request_finished", "requests ended, by finish reason "
                                "(stop, length, abort, error, timeout)", ["finished_reason"], registry=r)
        self.rejected = Counter("nanoflow_request_rejected", "requests refused before the engine "
                                "(overloaded, draining)", ["reason"], registry=r)
        self.ttft = Histogram("nanoflow_time_to_first_token_seconds", "arrival to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("nanoflow_inter_token_latency_seconds", "time between a request's tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("nanoflow_e2e_request_latency_seconds", "arrival to last token",
                             buckets=_E2E_BUCKETS, registry=r)
        # Engine counters (LLMEngine.stats() keys) exported as counters by their growth.
        self._counters = {
            "num_preemptions": self.preemptions,
            "prefix_cache_queries": Counter("nanoflow_prefix_cache_queries", "prompt tokens looked up in the "
                                            "prefix cache (vLLM's prefix_cache_queries)", registry=r),
            "prefix_cache_hits": Counter("nanoflow_prefix_cache_hits", "of which found cached, not computed",
                                         registry=r),
            "kv_offload_saved_pages": Counter("nanoflow_kv_offload_saved_pages", "KV pages copied to host memory",
                                              registry=r),
            "kv_offload_loaded_pages": Counter("nanoflow_kv_offload_loaded_pages", "KV pages loaded back from host "
                                               "memory instead of computed", registry=r),
            "kv_offload_skipped_pages": Counter("nanoflow_kv_offload_skipped_pages", "KV pages not copied to host "
                                                "memory: the copies were too far behind", registry=r),
        }
        self._seen: dict[str, int] = {}

    def publish(self, stats: dict[str, int], not_handed_over: int) -> None:
        """Engine-wide numbers after a step (or while idle)."""
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"] + not_handed_over)
        self.pages_free.set(stats["kv_pages_free"])
        self.pages_used.set(stats["kv_pages_total"] - stats["kv_pages_free"])
        for key, counter in self._counters.items():
            if key not in stats:
                continue
            # A counter only grows: an engine count that went back (its counters reset) restarts the baseline.
            new = stats[key] - self._seen.get(key, 0)
            if new > 0:
                counter.inc(new)
            self._seen[key] = stats[key]

    def observe(self, timing: RequestTiming, prompt_tokens: int, new_tokens: int, now: float) -> None:
        """A request's update with `new_tokens` tokens arrived at `now` (the generated-token
        counter is `count_generated`'s, once a step)."""
        if new_tokens <= 0:
            return
        if timing.first_token is None:
            timing.first_token = now
            self.ttft.observe(now - timing.arrival)
            self.prompt_tokens.inc(prompt_tokens)
            new_gaps = new_tokens - 1
            gap = 0.0
        else:
            new_gaps = new_tokens
            gap = (now - timing.last_token) / new_tokens
        for _ in range(new_gaps):
            self.itl.observe(gap)
        timing.last_token = now

    def count_generated(self, tokens: int) -> None:
        if tokens > 0:
            self.generation_tokens.inc(tokens)

    def end(self, timing: RequestTiming, reason: str, now: float) -> None:
        """A request ended: `reason` is its finish reason, or "timeout"."""
        self.finished.labels(finished_reason=reason).inc()
        if reason in ("stop", "length"):
            self.e2e.observe(now - timing.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
