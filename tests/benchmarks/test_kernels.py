"""`python -m bench.kernels --smoke` on CPU: the memory-bound section and its copy ceilings."""

import json

from bench import kernels


def test_kernels_smoke_memory_section_writes_consistent_rows(tmp_path):
    out = tmp_path / "k.json"
    kernels.main(["--smoke", "--sections", "memory_bound", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["meta"]["command"].startswith("python -m bench.kernels") and isinstance(r["meta"]["seed"], int)
    assert not r["errors"], r["errors"]
    assert {row["op"] for row in r["memory_bound"]} == {"rms_norm_res", "rope", "write_kv", "gather_scatter_pages"}
    for row in r["memory_bound"]:
        assert row["t"] == 32 and row["ms"] > 0
        assert abs(row["vs_copy_same_size"] - row["copy_same_size_ms"] / row["ms"]) < 1e-9
        assert isinstance(row["copy_one_kernel_per_step"], bool)


def test_copy_ceiling_counts_one_kernel_per_chain_step():
    c = kernels.copy_ceiling(1 << 16, reps=3, repeats=1)
    assert c["bytes"] == 1 << 16 and c["gbps"] > 0 and c["reps"] == 3
    assert c["one_kernel_per_step"] == (c["chain_kernels"] == 3)


def test_decode_launches_are_distinct_and_cover_the_default():
    assert len(set(kernels.DECODE_CONFIGS)) == len(kernels.DECODE_CONFIGS)
    assert (64, 4, 2, None, 4) in kernels.DECODE_CONFIGS  # the kernel's default launch


def test_decode_configs_rows_name_each_launch_and_keep_failures(tmp_path, monkeypatch):
    """The decode_configs section, interpreted on tiny shapes: a timed row per launch and
    case, and a launch that cannot run is a row with its error."""
    monkeypatch.setattr(kernels, "DECODE_CONFIGS", [(32, 4, 2, None, 2), (16, 4, 2, None, 0)])
    bench = kernels.Bench(True, 60.0, str(tmp_path / "k.json"), decode_cases=((3, 40),))
    rows = bench.decode_configs(copy_gbps=1.0)
    assert [(r["block_k"], r["programs_per_sm"]) for r in rows] == [(32, 2), (16, 0)]
    assert rows[0]["n"] == 3 and rows[0]["ctx"] == 40 and rows[0]["ms"] > 0
    assert rows[0]["vs_copy"] == rows[0]["gbps"]  # against a 1 GB/s ceiling
    assert "error" in rows[1] and "ms" not in rows[1]


def test_prefill_configs_rows_check_each_launch_against_the_reference(tmp_path, monkeypatch):
    """The prefill_configs section, interpreted on tiny shapes (with decode rows at
    position -1): a row per launch that matches the reference, and an error row for a
    launch that cannot run."""
    monkeypatch.setattr(kernels, "PREFILL_CONFIGS", [(4, 16, 4, 2), (0, 16, 4, 2)])
    bench = kernels.Bench(True, 60.0, str(tmp_path / "k.json"))
    rows = bench.prefill_configs()
    assert [(r["case"], r["block_q"]) for r in rows] == [("smoke", 4), ("smoke", 0)]
    assert rows[0]["ms"] > 0 and rows[0]["tflops"] > 0
    assert "error" in rows[1] and "ms" not in rows[1]


def test_prefill_launches_are_distinct_and_cover_the_default():
    assert len(set(kernels.PREFILL_CONFIGS)) == len(kernels.PREFILL_CONFIGS)
    assert (32, 128, 8, 2) in kernels.PREFILL_CONFIGS  # the kernel's default on Llama-3-8B (Gp = 4)
