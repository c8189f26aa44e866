"""ServerMetrics on its own: gauges from engine stats, preemptions as a counter, latency splits."""

from __future__ import annotations

import pytest

from nanoflow_jax.serve.metrics import RequestTiming, ServerMetrics


def _stats(**kw: int) -> dict[str, int]:
    return {"num_running": 0, "num_waiting": 0, "kv_pages_total": 100, "kv_pages_free": 100,
            "num_preemptions": 0, "num_iterations": 0, **kw}


def test_gauges_and_preemptions_follow_the_engine():
    m = ServerMetrics()
    value = m.registry.get_sample_value
    m.publish(_stats(num_running=3, num_waiting=2, kv_pages_free=70, num_preemptions=4), not_handed_over=5)
    assert (value("nanoflow_num_requests_running"), value("nanoflow_num_requests_waiting")) == (3, 7)
    assert (value("nanoflow_kv_pages_used"), value("nanoflow_kv_pages_free")) == (30, 70)
    m.publish(_stats(num_preemptions=4), 0)
    m.publish(_stats(num_preemptions=9), 0)
    assert value("nanoflow_num_preemptions_total") == 9 and value("nanoflow_kv_pages_used") == 0
    assert b"nanoflow_num_preemptions_total 9.0" in m.render()
    assert ServerMetrics().registry.get_sample_value("nanoflow_num_preemptions_total") == 0   # registries are apart


def test_prefix_cache_and_offload_counters_grow_with_the_engine():
    m = ServerMetrics()
    value = m.registry.get_sample_value
    m.publish(_stats(prefix_cache_queries=120, prefix_cache_hits=48, kv_offload_saved_pages=6), 0)
    m.publish(_stats(prefix_cache_queries=200, prefix_cache_hits=80, kv_offload_saved_pages=6,
                     kv_offload_loaded_pages=3), 0)
    assert (value("nanoflow_prefix_cache_queries_total"), value("nanoflow_prefix_cache_hits_total")) == (200, 80)
    assert (value("nanoflow_kv_offload_saved_pages_total"), value("nanoflow_kv_offload_loaded_pages_total")) == (6, 3)
    # The engine's counters were reset (reset_prefix_cache): the exported ones keep growing from there.
    m.publish(_stats(prefix_cache_queries=10, prefix_cache_hits=0), 0)
    m.publish(_stats(prefix_cache_queries=30, prefix_cache_hits=16), 0)
    assert (value("nanoflow_prefix_cache_queries_total"), value("nanoflow_prefix_cache_hits_total")) == (220, 96)


def test_latencies_per_token():
    m = ServerMetrics()
    value = m.registry.get_sample_value
    t = RequestTiming(arrival=10.0)
    m.observe(t, prompt_tokens=7, new_tokens=1, now=10.5)     # first token: TTFT 0.5
    m.observe(t, prompt_tokens=7, new_tokens=0, now=10.6)     # no token: nothing
    m.observe(t, prompt_tokens=7, new_tokens=2, now=10.9)     # two tokens in 0.4 s: two gaps of 0.2
    m.count_generated(3)
    m.count_generated(0)
    m.end(t, "length", now=11.0)
    assert value("nanoflow_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value("nanoflow_inter_token_latency_seconds_count") == 2
    assert value("nanoflow_inter_token_latency_seconds_sum") == pytest.approx(0.4)
    assert value("nanoflow_prompt_tokens_total") == 7 and value("nanoflow_generation_tokens_total") == 3
    assert value("nanoflow_e2e_request_latency_seconds_sum") == pytest.approx(1.0)
    m.end(RequestTiming(arrival=0.0), "abort", now=5.0)       # an abort is counted, not timed
    assert value("nanoflow_e2e_request_latency_seconds_count") == 1
    assert value("nanoflow_request_finished_total", {"finished_reason": "abort"}) == 1
