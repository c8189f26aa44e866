"""Start-up compilation of the step buckets: on a thread pool, errors named, pool sized by
`EngineConfig.compile_workers`."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine import compiler
from nanoflow_jax.engine.compiler import BucketCompileError
from nanoflow_jax.engine.config import EngineConfig
from nanoflow_jax.engine.model_runner import ModelRunner
from tests.engine.conftest import make_llm, random_prompts, reference_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _compile_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nanoflow-compile")]


class _Recording(compiler.ThreadPoolExecutor):
    """The real pool, remembering the size each instance was made with."""

    sizes: list[int] = []

    def __init__(self, max_workers: int, **kw: Any) -> None:
        _Recording.sizes.append(max_workers)
        super().__init__(max_workers=max_workers, **kw)


@pytest.fixture
def pool_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    _Recording.sizes = []
    monkeypatch.setattr(compiler, "ThreadPoolExecutor", _Recording)
    return _Recording.sizes


class _FakeLowered:
    """Stands in for a `jax.stages.Lowered`: compiling sleeps, may fail, counts overlap."""

    live = 0
    peak = 0
    calls = 0
    lock = threading.Lock()

    def __init__(self, key: int, fail: bool = False, seconds: float = 0.05) -> None:
        self.key, self.fail, self.seconds = key, fail, seconds

    def compile(self, options: Any = None) -> str:
        with _FakeLowered.lock:
            _FakeLowered.calls += 1
            _FakeLowered.live += 1
            _FakeLowered.peak = max(_FakeLowered.peak, _FakeLowered.live)
        try:
            time.sleep(self.seconds)
            if self.fail:
                raise RuntimeError("injected compile failure")
            return f"exe{self.key}"
        finally:
            with _FakeLowered.lock:
                _FakeLowered.live -= 1


def test_parallel_precompile_matches_sequential(pool_sizes):
    prompts = random_prompts(6, [1, 4, 9, 20, 33, 50], seed=3)
    # cache_executables=False: steps an earlier test stored would load instead of compiling.
    parallel = make_llm(precompile=True, compile_workers=2, cache_executables=False)
    assert pool_sizes == [2] and not _compile_threads()
    sequential = make_llm(precompile=True, compile_workers=1, cache_executables=False)
    assert pool_sizes == [2]  # one worker compiles in the calling thread, without a pool
    p_run, s_run = parallel.engine.runner, sequential.engine.runner
    assert set(p_run._compiled) == set(s_run._compiled) == set(p_run.bucket_keys())
    expected = reference_greedy(prompts, GREEDY.max_tokens)
    for llm in (parallel, sequential):
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected


def test_pool_size_follows_compile_workers(pool_sizes):
    off = dict(precompile=True, cache_executables=False)   # compile, never load a stored step
    num_buckets = len(make_llm(compile_workers=3, **off).engine.runner.compile_jobs())
    make_llm(compile_workers=64, **off)   # never more threads than compiles
    make_llm(**off)                       # None: one per core, up to the buckets
    default = min(num_buckets, compiler.available_cores())
    assert pool_sizes == [w for w in (3, num_buckets, default) if w > 1]  # one worker: no pool


def test_compiles_overlap_up_to_the_pool_size():
    for workers in (1, 2, 3):
        _FakeLowered.peak = 0
        out = compiler.compile_all(list(range(6)), lambda k: _FakeLowered(k, seconds=0.2), None, workers)
        assert out == {k: f"exe{k}" for k in range(6)}
        assert _FakeLowered.peak == workers
    assert compiler.resolve_workers(None, 1) == 1 and compiler.resolve_workers(8, 3) == 3


@pytest.mark.parametrize("workers", [1, 3])
def test_a_failing_compile_names_its_bucket_and_stops_the_pool(workers):
    _FakeLowered.calls = 0

    def lower(key: int) -> _FakeLowered:
        return _FakeLowered(key, fail=key == 2, seconds=0.2 if key == 2 else 0.05)

    labels = {k: f"T={16 * k} W=8" for k in range(40)}
    with pytest.raises(BucketCompileError, match=r"T=32 W=8 failed: RuntimeError: injected") as info:
        compiler.compile_all(list(range(40)), lower, None, workers, label=labels.__getitem__)
    assert info.value.key == 2 and isinstance(info.value.__cause__, RuntimeError)
    assert not _compile_threads() and _FakeLowered.live == 0
    assert _FakeLowered.calls < 40  # the compiles not yet started when it failed never run


def test_a_failing_lowering_names_its_bucket():
    def lower(key: int) -> _FakeLowered:
        if key == 1:
            raise TypeError("injected lowering failure")
        return _FakeLowered(key)

    with pytest.raises(BucketCompileError, match=r"for 1 failed: TypeError: injected lowering"):
        compiler.compile_all([0, 1, 2], lower, None, 2)
    assert not _compile_threads() and _FakeLowered.live == 0


def test_engine_start_up_reports_the_failing_bucket(monkeypatch):
    lower = ModelRunner._lower

    def broken(self: ModelRunner, cache: Any, t: int, w: int, decode_only: bool = False) -> Any:
        lowered = lower(self, cache, t, w, decode_only)
        if (t, w) == (32, 8):
            return _FakeLowered(0, fail=True)
        return lowered

    monkeypatch.setattr(ModelRunner, "_lower", broken)
    with pytest.raises(BucketCompileError, match=r"step for T=32 W=8 failed: RuntimeError: injected"):
        make_llm(precompile=True, compile_workers=2)
    assert not _compile_threads()


def test_progress_lines_off_a_terminal(capsys):
    runner = make_llm(precompile=True, compile_workers=2, show_progress=True).engine.runner
    err = capsys.readouterr().err
    n, m = len(runner.bucket_keys()), len(runner.compile_jobs()) - len(runner.bucket_keys())
    assert f"compiling {n} step buckets and {m} samplers, 2 at a time" in err
    assert f"compiled {n} step buckets and {m} samplers in" in err


def test_memory_probe_compiles_both_pool_sizes(pool_sizes):
    runner = make_llm(compile_workers=2).engine.runner   # CPU: nothing compiled at start-up
    temp = runner._step_temp_bytes([16, 4112])
    assert len(temp) == 2 and all(isinstance(b, int) and b >= 0 for b in temp)
    assert pool_sizes == [2]


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_invalid_compile_workers_are_refused(bad):
    with pytest.raises(ValueError, match=r"compile_workers must be a positive integer"):
        EngineConfig(compile_workers=bad)
    assert EngineConfig(compile_workers=None).compile_workers is None
    assert EngineConfig(compile_workers=4).compile_workers == 4
