"""`python -m bench.step_profile --smoke` on CPU: every op of a layer is timed and the step too."""

import json

from bench import step_profile


def test_step_profile_smoke(tmp_path):
    out = tmp_path / "step.json"
    step_profile.main(["--smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["ops_ms_per_layer"]) >= {"q_proj", "attention", "write_kv", "gate_up_silu", "down_residual"}
    assert all(v > 0 for v in res["ops_ms_per_layer"].values())
    assert res["step_ms"] > 0 and res["lm_head_ms"] > 0
    assert res["sum_of_ops_ms"] > 2 * min(res["ops_ms_per_layer"].values())  # 2 layers + head
