"""`python -m bench.multiround` on CPU with a small shipped config: every mode serves the same
replies, the cache computes fewer prefill tokens, and the result JSON holds every section."""

import json

import pytest

from bench import multiround

SMALL = ["--model", "smollm2-135m", "--weights", "random", "--dtype", "float32", "--num-conversations", "2",
         "--rounds", "3", "--concurrency", "1", "--max-turn-len", "8", "--max-output-len", "4", "--max-num-seqs", "4",
         "--max-num-batched-tokens", "32", "--token-buckets", "8,32", "--block-size", "4", "--num-kv-pages", "64",
         "--kv-offload-host-gb", "0.5", "--kv-offload-disk-gb", "0.5", "--bandwidth-pages", "4", "--repeats", "1"]


def test_multiround_cli_reports_reuse_in_every_mode(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert multiround.main([*SMALL, "--kv-offload-disk-path", str(tmp_path / "disk"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["complete"] and r["outputs_identical"] and set(r["modes"]) == set(multiround.MODES)
    assert r["concurrency"] == 1
    base = r["modes"]["no-cache"]
    assert base["total"]["prefill_tokens_computed"] == base["total"]["prompt_tokens"]
    assert base["total"]["cache_hit_tokens"] == 0 and base["prefill_reduction"] == 1
    for name in ("cache", "offload"):
        m = r["modes"][name]
        assert len(m["rounds"]) == 3 and m["rounds"][0]["round"] == 1
        t = m["total"]
        # Rounds 2 and 3 extend round 1's conversation: their earlier pages are not computed.
        assert t["prefill_tokens_computed"] + t["cache_hit_tokens"] == t["prompt_tokens"] == base["total"]["prompt_tokens"]
        assert m["prefill_reduction"] > 1.3 and m["rounds"][2]["cache_hit_tokens"] > 0
        assert all(rd["ttft"]["p50_ms"] > 0 and rd["total_tokens_per_s"] > 0 for rd in m["rounds"])
    assert "offload" in r["modes"]["offload"] and "offload" not in r["modes"]["cache"]
    single = r["single_round_offload"]
    on = single["offload_on"]
    assert on["saved_pages"] == on["offload"]["saved_pages"] > 0 and on["offload"]["save_s"] > 0
    assert single["offload_on"]["saved_pages"] > 0 and single["overhead"] == pytest.approx(
        single["offload_off"]["total_tokens_per_s"] / single["offload_on"]["total_tokens_per_s"] - 1)
    bw = r["bandwidth"]
    assert bw["pages"] == 4 and all(bw[k] > 0 for k in ("device_to_host_gbps", "device_to_pinned_gbps",
                                                         "host_to_device_gbps", "disk_write_gbps", "disk_read_gbps"))
    for entry in ("entry", "entry_one_page"):
        assert all(bw[entry][k] > 0 for k in ("raw_npy_save_ms", "raw_npy_load_ms", "orbax_save_ms", "orbax_load_ms"))
    assert bw["entry"]["bytes"] == 4 * bw["entry_one_page"]["bytes"] == 4 * bw["page_bytes"]
    assert "fewer" in capsys.readouterr().out


def test_multiround_flags_are_checked():
    with pytest.raises(SystemExit):
        multiround.parse_args(["--modes", "cache,bogus"])
    with pytest.raises(SystemExit):
        multiround.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        multiround.parse_args(["--dataset", "random"])
    assert multiround.parse_args(["--dataset", "lmsys"]).dataset == "lmsys-chat-1m"
