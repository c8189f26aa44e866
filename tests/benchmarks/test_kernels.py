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
