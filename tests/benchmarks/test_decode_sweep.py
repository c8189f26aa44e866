"""bench.decode_sweep's labels and plot, on synthetic rows."""

from __future__ import annotations

import json
import random

import pytest

from bench import decode_sweep


def _row(n, ctx, bk, pps, vs_copy, **kw):
    return dict(n=n, ctx=ctx, block_k=bk, num_warps=4, num_stages=2, num_splits=None,
                programs_per_sm=pps, vs_copy=vs_copy, **kw)


def test_labels_name_the_launch():
    assert decode_sweep.config_label(_row(1, 1, 64, 4, 0.7)) == "64 keys, 4 warps, 2 stages, 4/SM"
    split = dict(_row(1, 1, 256, 1, 0.5), num_splits=2, mask_tail=False)
    assert decode_sweep.config_label(split) == "256 keys, 4 warps, 2 stages, 1/SM, 2 splits, whole tail"


def test_plot_draws_one_panel_per_case_and_skips_failed_rows(tmp_path):
    rows = [_row(n, ctx, bk, pps, random.random()) for n, ctx in ((64, 4096), (128, 640))
            for bk in (64, 256) for pps in (1, 4)]
    rows.append({"n": 64, "ctx": 4096, "block_k": 512, "error": "RESOURCE_EXHAUSTED"})
    src = tmp_path / "s.json"
    src.write_text(json.dumps({"meta": {"jax_device": "test"}, "rows": rows}))
    decode_sweep.main(["--plot", str(src), "--png", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 1000
    src.write_text(json.dumps({"meta": {}, "rows": rows[-1:]}))
    with pytest.raises(SystemExit, match="no timed decode-sweep rows"):
        decode_sweep.plot(str(src), str(tmp_path / "t.png"))
