"""`python -m bench.throughput` on CPU with a small shipped config: fields, arithmetic, JSON file."""

import json

from bench import throughput


def test_throughput_cli_writes_a_consistent_result(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = throughput.main(["--model", "smollm2-135m", "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                            "--max-num-batched-tokens", "32", "--max-num-seqs", "4", "--num-kv-pages", "16",
                            "--gemm-peak-tflops", "2.0", "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["generated_tokens"] == 3 * 4 and r["total_tokens"] == 3 * (8 + 4)
    assert r["device"] and r["jax"] and r["command"].startswith("python -m bench.throughput")
    optimal = 2.0e12 / (2 * r["params"])
    assert abs(r["optimal_tokens_per_s"] - optimal) < 1e-6 * optimal
    assert abs(r["fraction_of_optimal"] - r["total_tokens_per_s"] / optimal) < 1e-9
    assert json.loads(capsys.readouterr().out) == r


def test_spec_peak_by_device_name():
    assert throughput.spec_peak_tflops("NVIDIA H200") == 989.4
    assert throughput.spec_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert throughput.spec_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert throughput.spec_peak_tflops("cpu") is None
