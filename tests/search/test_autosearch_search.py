"""`python -m nanoflow_jax.autosearch --search` end to end on a CPU: from a saved profile it writes
the pipeline file the engine loads, and with --verify it times the predicted candidates."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from nanoflow_jax import autosearch
from nanoflow_jax.config import ModelConfig
from tests.search.synthetic import synthetic_profile

SYNTHETIC = Path(__file__).parent / "synthetic_profile_h200.json"
LLAMA = ModelConfig.from_name("llama-3-8b")


def test_search_from_a_profile_writes_a_choice_resolve_pipeline_loads(tmp_path, monkeypatch, capsys):
    argv = ["--model", "llama-3-8b", "--search", "--profile", str(SYNTHETIC), "--verify", "0",
            "--max-nano-batches", "2", "--out-dir", str(tmp_path)]
    assert autosearch.main(argv) == 0
    path = autosearch.choice_path(LLAMA, "NVIDIA H200", tmp_path)   # the profile's GPU, not this CPU
    record = json.loads(path.read_text())
    assert record["verified"] is False and record["search"]["profile_source"] == "synthetic"
    assert set(record["predicted"]) == {"sequential", "nanobatch", "nanoflow"}
    assert record["engine"]["max_num_seqs"] == 512 and record["engine"]["max_num_batched_tokens"] == 1536
    assert record["batch"] == {"tokens": 1536, "decodes": 511, "context": 1280, "rows": 512}
    best = record["best"]
    assert best["predicted_ms"] == min(record["predicted"].values())
    assert "predicted" in capsys.readouterr().out

    class H200:
        device_kind = "NVIDIA H200"
    monkeypatch.setattr(autosearch.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(autosearch.jax, "devices", lambda: [H200()])
    mode, budgets = autosearch.resolve_pipeline("auto", None, LLAMA, tmp_path)
    assert mode == best["pipeline"] and budgets == tuple(best["nano_programs"])


def test_search_errors_name_the_fix(tmp_path, capsys):
    base = ["--model", "llama-3-8b", "--search", "--out-dir", str(tmp_path)]
    if jax.default_backend() != "gpu":
        assert autosearch.main(base + ["--verify", "0"]) == 2
        assert "--profile FILE" in capsys.readouterr().err
    assert autosearch.main(["--model", "smollm2-135m", "--search", "--profile", str(SYNTHETIC), "--verify", "0",
                            "--out-dir", str(tmp_path)]) == 2
    assert "model shape" in capsys.readouterr().err
    assert autosearch.main(base + ["--profile", str(SYNTHETIC), "--verify", "1"]) == 2
    assert "--verify 0" in capsys.readouterr().err
    assert autosearch.main(base + ["--profile", str(SYNTHETIC), "--verify", "0", "--gpu-memory-gib", "10"]) == 2
    assert "fewer than 64" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_verify_times_the_predicted_candidates(tmp_path):
    cfg = ModelConfig.from_name("smollm2-135m")
    profile = tmp_path / "profile.json"
    # A profile "of this machine" (synthetic) whose memory holds few requests, so the search is small.
    synthetic_profile(cfg, device=jax.devices()[0].device_kind, sms=8,
                      memory_bytes=2**30).save(profile)
    argv = ["--model", "smollm2-135m", "--search", "--profile", str(profile), "--dtype", "float32",
            "--kernels", "xla", "--tokens", "16", "--rows", "8", "--context", "8", "--max-nano-batches", "1",
            "--input-len", "8", "--output-len", "8",
            "--verify", "1", "--iters", "1", "--out-dir", str(tmp_path)]
    assert autosearch.main(argv) == 0
    record = json.loads(autosearch.choice_path(cfg, jax.devices()[0].device_kind, tmp_path).read_text())
    assert record["verified"] is True
    runs = [(r["pipeline"], r["nano_programs"]) for r in record["measured"]]
    assert runs[:3] == [("sequential", [{}, {}]), ("nanobatch", [{}, {}]), ("nanoflow", [{}, {}])]
    assert all(r["iteration_ms"] > 0 and r["predicted_ms"] > 0 for r in record["measured"])
    assert record["best"]["iteration_ms"] == min(r["iteration_ms"] for r in record["measured"])
    assert record["measured"][0]["predicted_ms"] == pytest.approx(record["predicted"]["sequential"], abs=1e-3)
