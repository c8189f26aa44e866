"""Kernel profile tables: interpolation against numpy's, monotone in work, the JSON round trip,
and profiling that refuses to run off a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanoflow_jax.config import ModelConfig
from nanoflow_jax.search.profile import OPS, OpTable, Profile, ProfileUnavailable, measure_profile
from tests.search.synthetic import synthetic_profile

WORK = (16.0, 64.0, 256.0, 1024.0)
PROGRAMS = (16, 33, 66, 132)


def random_table(rng: np.random.Generator) -> tuple[OpTable, np.ndarray]:
    """A table from noisy times (not monotone in work) and the raw array."""
    ms = rng.uniform(0.01, 1.0, (len(WORK), len(PROGRAMS)))
    return OpTable(WORK, PROGRAMS, tuple(map(tuple, ms))), ms


def reference_time(ms: np.ndarray, work: float, programs: float) -> float:
    """Independent reference inside the grid: a running maximum down each column, numpy's
    interpolation in work per column, then in programs."""
    mono = np.maximum.accumulate(ms, axis=0)
    cols = [np.interp(work, WORK, mono[:, j]) for j in range(len(PROGRAMS))]
    return float(np.interp(programs, PROGRAMS, cols))


def test_interpolation_matches_numpy_inside_the_grid():
    rng = np.random.default_rng(0)
    for _ in range(5):
        table, ms = random_table(rng)
        for work, programs in zip(rng.uniform(16, 1024, 40), rng.uniform(16, 132, 40)):
            assert table.time(work, programs) == pytest.approx(reference_time(ms, work, programs), rel=1e-12)
        for i, w in enumerate(WORK):  # grid points are exact (after the running maximum)
            for j, p in enumerate(PROGRAMS):
                assert table.time(w, p) == pytest.approx(np.maximum.accumulate(ms, axis=0)[i, j])


def test_time_never_falls_with_more_work():
    rng = np.random.default_rng(1)
    table, _ = random_table(rng)
    works = np.linspace(1, 4096, 400)
    for programs in (8, 16, 20, 50, 66, 100, 132, 200):
        times = [table.time(w, programs) for w in works]
        assert all(b >= a - 1e-12 for a, b in zip(times, times[1:])), programs


def test_extrapolation_outside_the_grid():
    table = OpTable((100.0, 200.0), (33, 132), ((1.0, 0.5), (3.0, 1.5)))
    assert table.time(10, 132) == 0.5                    # below the least work: a launch's cost
    assert table.time(400, 132) == pytest.approx(3.5)    # the last segment's slope: 0.5 + 1.0 per 100
    assert table.time(100, 11) == pytest.approx(1.0 * 33 / 11)  # fewer programs: 1 / programs
    assert table.time(100, 500) == 0.5                   # more programs than the GPU: no faster
    assert table.time(0, 66) == 0.0


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="strictly increasing"):
        OpTable((2.0, 1.0), (1,), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="rows"):
        OpTable((1.0,), (1, 2), ((1.0,),))
    with pytest.raises(ValueError, match="> 0 ms"):
        OpTable((1.0,), (1,), ((0.0,),))
    prof = synthetic_profile(ModelConfig.from_name("smollm2-135m"))
    ops = dict(prof.ops)
    del ops["sampler"]
    with pytest.raises(ValueError, match="sampler"):
        Profile(device="x", num_sms=8, shape="s", dtype="bfloat16", ops=ops)


def test_json_round_trip(tmp_path):
    prof = synthetic_profile(ModelConfig.from_name("smollm2-135m"))
    path = tmp_path / "p.json"
    prof.save(path)
    back = Profile.load(path)
    assert back.source == "synthetic" and back.device == prof.device and back.memory_bytes == prof.memory_bytes
    for op in OPS:
        for work, programs in ((37.0, 50), (5e5, 132), (3.0, 7)):
            assert back.time(op, work, programs) == prof.time(op, work, programs)
    assert prof.time("qkv", 64.0) == prof.time("qkv", 64.0, prof.num_sms)  # None: the kernel's own launch
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a kernel profile"):
        Profile.load(path)


def test_the_shipped_synthetic_profile_is_marked_synthetic():
    from pathlib import Path

    prof = Profile.load(Path(__file__).parent / "synthetic_profile_h200.json")
    assert prof.source == "synthetic" and "not a measurement" in prof.meta["note"]


def test_profiling_needs_a_gpu():
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(ProfileUnavailable, match="--profile FILE"):
        measure_profile(ModelConfig.from_name("smollm2-135m"))


@pytest.mark.gpu
def test_measure_profile_on_a_gpu():
    cfg = ModelConfig.from_name("llama-3-8b")
    prof = measure_profile(cfg, tokens=(128, 512), rows=(64,), decode=((64, 512),), prefill=((0, 128),),
                           programs=(66, 132), log=lambda _: None)
    assert prof.source == "measured" and prof.num_sms >= 66 and prof.memory_bytes > 0
    for op in OPS:
        assert prof.time(op, 300 if OPS[op][1] == "tokens" else 64 if OPS[op][1] == "rows" else 3e4) > 0
    assert prof.time("gate_up", 512) > prof.time("gate_up", 128) * 0.9


def test_profiling_routine_times_every_op_class_interpreted_on_cpu(monkeypatch):
    """measure_profile's timing loop (fill_tables) with bench.kernels' smoke set-up: the kernels
    interpreted on tiny shapes, so the GPU routine's every op case runs here too (qkv and down
    share o's GEMM case)."""
    import os

    from bench.kernels import Bench
    from nanoflow_jax.search.profile import fill_tables, model_dims
    from tests.engine.conftest import TINY

    monkeypatch.setenv("NANOFLOW_BENCH_TIMING", "ordered")  # one timed program per point, not two
    bench = Bench(smoke=True, budget_s=1e9, out_path=os.devnull, sections=())
    bench.m = model_dims(TINY)
    ops = ("o", "gate_up", "lm_head", "prefill_attention", "decode_attention", "norm_rope", "sampler")
    points = {"tokens": (8,), "rows": (4,), "decode_attention": ((2, 24),), "prefill_attention": ((3, 5),)}
    tables = fill_tables(bench, "float32", points, (bench.sms,), ops, log=lambda _: None)
    assert set(tables) == set(ops)
    assert tables["decode_attention"].work == (48.0,) and tables["prefill_attention"].work == (3 * 5 + 15.0,)
    assert tables["sampler"].programs == (bench.sms,) and tables["o"].programs == (bench.sms,)
    assert all(v > 0 for t in tables.values() for row in t.ms for v in row)


def test_a_cut_off_profile_resumes_from_its_partial_file(tmp_path, monkeypatch):
    """measure_profile keeps each op's table as it is done; a second call times only the rest."""
    import jax

    from nanoflow_jax.search import profile as profile_mod

    cfg = ModelConfig.from_name("smollm2-135m")
    want = synthetic_profile(cfg).ops
    asked: list[list[str]] = []

    def fake_fill(bench, dtype, points, programs, ops, log, on_table):
        asked.append(list(ops))
        for op in ops:
            on_table(op, want[op])
            if op == "gate_up" and len(asked) == 1:
                raise TimeoutError("cut off")
        return {op: want[op] for op in ops}

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(profile_mod, "fill_tables", fake_fill)
    partial = tmp_path / "p.partial.json"
    with pytest.raises(TimeoutError):
        measure_profile(cfg, shape="s", partial=partial, log=lambda _: None)
    prof = measure_profile(cfg, shape="s", partial=partial, log=lambda _: None)
    order = list(OPS)
    assert asked == [order, order[order.index("gate_up") + 1:]]
    assert prof.source == "measured" and dict(prof.ops) == dict(want)
    # Another shape does not reuse it.
    measure_profile(cfg, shape="other", partial=partial, log=lambda _: None)
    assert asked[-1] == order
