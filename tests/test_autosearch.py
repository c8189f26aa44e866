"""The auto-search: every mode and candidate is timed, the fastest is written per model shape
and GPU, and an engine with pipeline="auto" loads it (or runs sequential where none exists)."""

from __future__ import annotations

import json
import random
import logging

import jax
import pytest

from nanoflow_jax import autosearch
from nanoflow_jax.config import ModelConfig
from tests.engine.conftest import TINY, tiny_params


def test_search_times_every_mode_and_candidate_and_keeps_the_fastest():
    result = autosearch.search(TINY, tiny_params(), kernels="xla", tokens=32, decodes=5, context=8, rows=8,
                               candidates=("gemm=1|gemm=2",), iters=1, show_progress=False)
    runs = [(r["pipeline"], r["nano_programs"]) for r in result["measured"]]
    assert runs == [("sequential", [{}, {}]), ("nanobatch", [{}, {}]), ("nanoflow", [{}, {}]),
                    ("nanoflow", [{"gemm": 1}, {"gemm": 2}])]
    assert all(r["iteration_ms"] > 0 for r in result["measured"])
    assert result["best"]["iteration_ms"] == min(r["iteration_ms"] for r in result["measured"])


def test_cli_writes_a_choice_that_load_choice_reads(tmp_path):
    argv = ["--model", "smollm2-135m", "--dtype", "float32", "--kernels", "xla", "--tokens", "16", "--rows", "8",
            "--decodes", "3", "--context", "8", "--iters", "1", "--candidates", "gemm=1|gemm=2",
            "--out-dir", str(tmp_path)]
    assert autosearch.main(argv) == 0
    cfg = ModelConfig.from_name("smollm2-135m")
    device = jax.devices()[0].device_kind
    path = autosearch.choice_path(cfg, device, tmp_path)
    record = json.loads(path.read_text())
    assert record["model"] == "smollm2-135m" and len(record["measured"]) == 4
    choice = autosearch.load_choice(cfg, device, tmp_path)
    assert choice["pipeline"] == record["best"]["pipeline"]
    assert choice["nano_programs"] == tuple(record["best"]["nano_programs"])


def test_auto_resolves_to_the_searched_choice_on_a_gpu(tmp_path, monkeypatch, caplog):
    device = "NVIDIA H200"
    path = autosearch.choice_path(TINY, device, tmp_path)
    path.write_text(json.dumps({"best": {"pipeline": "nanoflow", "nano_programs": [{"gemm": 32}, {"gemm": 100}]}}))
    assert autosearch.resolve_pipeline("auto", None, TINY, tmp_path) == ("sequential", None)  # no GPU here
    assert autosearch.resolve_pipeline("nanobatch", None, TINY, tmp_path) == ("nanobatch", None)

    class FakeDevice:
        device_kind = device
    monkeypatch.setattr(autosearch.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(autosearch.jax, "devices", lambda: [FakeDevice()])
    assert autosearch.resolve_pipeline("auto", None, TINY, tmp_path) == ("nanoflow", ({"gemm": 32}, {"gemm": 100}))
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="nanoflow_jax.autosearch"):
        assert autosearch.resolve_pipeline("auto", None, TINY, tmp_path) == ("sequential", None)
    assert "python -m nanoflow_jax.autosearch" in caplog.text
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a pipeline choice"):
        autosearch.resolve_pipeline("auto", None, TINY, tmp_path)


def test_keys_and_budget_parsing():
    assert autosearch.device_key("NVIDIA H200") == "nvidia-h200"
    assert autosearch.shape_key(TINY).startswith("llama-l2-e64-")
    assert autosearch.parse_programs("gemm=32,decode_attention=40|gemm=100") == (
        {"gemm": 32, "decode_attention": 40}, {"gemm": 100})
    for bad, match in (("gemm=32", "separated by"), ("gemm|gemm=1", "not op=programs"),
                       ("gemm=0|", "must be an integer >= 1"), ("matmul=4|", "takes an SM budget")):
        with pytest.raises(ValueError, match=match):
            autosearch.parse_programs(bad)


def test_engine_pipeline_auto_runs_sequential_without_a_gpu():
    from tests.engine.conftest import make_llm

    llm = make_llm()   # EngineConfig.pipeline defaults to "auto"
    assert llm.engine_config.pipeline == "auto" and llm.engine.runner.pipeline == "sequential"


def test_the_searched_batch_sizing_fills_in_what_the_caller_left_out(tmp_path, monkeypatch):
    from nanoflow_jax.engine import llm as llm_module

    class FakeDevice:
        device_kind = "NVIDIA H200"
    monkeypatch.setattr(autosearch, "PIPELINES_DIR", tmp_path)
    path = autosearch.choice_path(TINY, FakeDevice.device_kind)
    assert autosearch.searched_sizing(TINY, FakeDevice.device_kind) is None   # no file
    seqs, tokens = random.randint(2, 999), random.randint(1000, 9999)
    path.write_text(json.dumps({"best": {"pipeline": "sequential"},
                                "engine": {"max_num_seqs": seqs, "max_num_batched_tokens": tokens, "kv_pages": 7}}))
    assert autosearch.searched_sizing(TINY, FakeDevice.device_kind) == {"max_num_seqs": seqs,
                                                                        "max_num_batched_tokens": tokens}
    # A sizing for a bf16 cache is not one for an fp8 cache (twice the requests fit), and back.
    assert autosearch.searched_sizing(TINY, FakeDevice.device_kind, kv_cache_dtype="fp8") is None
    record = json.loads(path.read_text())
    record["engine"]["kv_cache_dtype"] = "fp8_e4m3"
    path.write_text(json.dumps(record))
    assert autosearch.searched_sizing(TINY, FakeDevice.device_kind, kv_cache_dtype="fp8")["max_num_seqs"] == seqs
    assert autosearch.searched_sizing(TINY, FakeDevice.device_kind) is None
    record["engine"].pop("kv_cache_dtype")
    path.write_text(json.dumps(record))
    kwargs = {}
    llm_module._apply_searched_sizing(TINY, kwargs)   # CPU: the file is for a GPU
    assert kwargs == {}
    monkeypatch.setattr(llm_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(llm_module.jax, "devices", lambda: [FakeDevice()])
    llm_module._apply_searched_sizing(TINY, kwargs)
    assert kwargs == {"max_num_seqs": seqs, "max_num_batched_tokens": tokens}
    for given in ({"max_num_seqs": 3}, {"pipeline": "nanobatch"}):   # the caller's choice stands
        llm_module._apply_searched_sizing(TINY, kw := dict(given))
        assert kw == given
    path.write_text(json.dumps({"engine": {"max_num_seqs": -1, "max_num_batched_tokens": 5}}))
    with pytest.raises(ValueError, match="not a pipeline choice"):
        autosearch.searched_sizing(TINY, FakeDevice.device_kind)
