"""`python -m bench.rollouts` on CPU with a small shipped config: grouped (n samples) and
separate requests draw the same tokens, the grouped run holds fewer KV pages, the JSON."""

import json

from bench import rollouts


def test_rollouts_cli_compares_grouped_and_separate(tmp_path):
    out = tmp_path / "r.json"
    code = rollouts.main(["--model", "smollm2-135m", "--num-prompts", "2", "--n", "3", "--input-len", "20",
                          "--output-len", "3", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                          "--token-buckets", "64", "--num-kv-pages", "24", "--precompile", "1",
                          "--update-repeats", "1", "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    g, s = r["grouped"], r["separate"]
    assert g["requests"] == 2 and s["requests"] == 6 and g["samples"] == s["samples"] == 6
    assert g["generated_tokens"] == s["generated_tokens"] == 18 and not g["failed_requests"]
    assert r["same_tokens"] is True
    # 20-token prompts: the samples share the first page of 16 tokens.
    assert g["peak_kv_pages_used"] < s["peak_kv_pages_used"]
    assert r["speedup_grouped_over_separate"] == g["output_tokens_per_s"] / s["output_tokens_per_s"]
    assert list(r["compile_s"]) == ["startup"]   # nothing compiles while timing
    u = r["update_params"]
    assert u["first_s"] > 0 and len(u["repeat_s"]) == 1 and u["median_s"] > 0
    assert r["command"].startswith("python -m bench.rollouts")
