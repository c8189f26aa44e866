"""`python -m bench.memory_sweep --smoke` on CPU: the JSON holds ceilings, checked rows and a best per case."""

import json

from bench import memory_sweep


def test_memory_sweep_smoke_writes_a_consistent_result(tmp_path):
    out = tmp_path / "m.json"
    assert memory_sweep.main(["--smoke", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["meta"]["smoke"] and r["meta"]["command"].startswith("python -m bench.memory_sweep")
    assert isinstance(r["meta"]["seed"], int) and r["ceilings"]["large"]["copy_gbps"] > 0
    kernels = {"rms_norm_res", "rope_q", "rope_k"}
    assert {k.split("/")[0] for k in r["ceilings"]["same_size"]} == kernels
    for c in r["ceilings"]["same_size"].values():
        assert c["gbps"] > 0 and c["reps"] > 0 and isinstance(c["chain_kernels"], int)
        assert c["one_kernel_per_step"] == (c["chain_kernels"] == c["reps"])
    assert len(r["rows"]) == 6 and all("error" not in row for row in r["rows"])
    for row in r["rows"]:
        same = r["ceilings"]["same_size"][f"{row['kernel']}/{row['T']}"]["gbps"]
        assert row["ok"] and abs(row["vs_copy_same_size"] - row["gbps"] / same) < 1e-9
        assert abs(row["gbps"] - row["bytes"] / row["ms"] / 1e6) < 1e-9
    assert {(b["kernel"], b["T"]) for b in r["best"]} == {(k, 13) for k in kernels}
