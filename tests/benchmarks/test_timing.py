"""bench.timing: the programs device_ms times compute what they claim, in every mode."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from bench import timing


def _rand(key: int, *shape: int) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_timing_mode_defaults_to_slope_and_rejects_unknown(monkeypatch):
    monkeypatch.delenv(timing.TIMING_ENV, raising=False)
    assert timing.timing_mode() == "slope"
    monkeypatch.setenv(timing.TIMING_ENV, "fastest")
    with pytest.raises(ValueError, match="NANOFLOW_BENCH_TIMING"):
        timing.timing_mode()


def test_ordered_program_runs_every_call_on_its_own_copies():
    reps, seed = 5, int(np.random.default_rng().integers(1 << 30))
    xs = tuple(_rand(seed + i, 8, 16) for i in range(reps))
    ws = (_rand(seed + 100, 16, 4), _rand(seed + 101, 16, 4))
    run = timing.chained(jnp.dot, reps, rotate=(0, 1), ordered=True)
    outs = run(xs, ws)
    assert len(outs) == reps
    for i, out in enumerate(outs):
        want = np.asarray(xs[i], np.float64) @ np.asarray(ws[i % 2], np.float64)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)
    lowered = run.lower(xs, ws)
    text = lowered.as_text()
    assert text.count("call @") == reps  # fn is lowered once, called reps times
    assert text.count("optimization_barrier") == reps - 1  # one between each pair of calls
    assert lowered.compile().as_text().count(" dot(") == reps  # and XLA merged none


def test_patched_chain_threads_one_element_of_each_output():
    reps = 3
    x, w = _rand(7, 4, 4), _rand(8, 4, 4)
    got = np.asarray(timing.chained(jnp.dot, reps)(x, w), np.float64)
    a, wd = np.asarray(x, np.float64), np.asarray(w, np.float64)
    for _ in range(reps):  # the same patching, in float64 numpy
        out = a @ wd
        a = a.copy()
        a[0, 0] = out[0, 0]
    np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-4)


def test_timed_program_rotates_the_first_argument_itself():
    x, w = _rand(1, 4, 4), _rand(2, 4, 4)
    with pytest.raises(ValueError, match="first argument"):
        timing.timed_program(jnp.dot, ((x, x), w), 2, rotate=(0,))
    run, args = timing.timed_program(jnp.dot, (x, w), 3)
    assert len(args[0]) == 3 and len({id(c) for c in args[0]}) == 3
    assert len(run(*args)) == 3


@pytest.mark.parametrize("short,long_,want", [(10.0, 19.0, 0.9), (10.0, 10.1, 10.1 / 20)])
def test_slope_differences_programs_and_falls_back_when_noise_wins(monkeypatch, short, long_, want):
    times = iter((short, long_))
    monkeypatch.setattr(timing, "_program_ms", lambda *a, **k: next(times))
    got = timing.device_ms(jnp.dot, _rand(1, 2, 2), _rand(2, 2, 2), reps=10, mode="slope")
    assert got == pytest.approx(want)


def test_device_ms_times_each_mode_on_cpu():
    x, w = _rand(3, 64, 64), _rand(4, 64, 64)
    for mode in timing.TIMING_MODES:
        ms = timing.device_ms(jnp.dot, x, w, reps=2, repeats=1, min_sample_ms=0.1, mode=mode)
        assert 0 < ms < 1e3, mode
