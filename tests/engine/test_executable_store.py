"""The executable store: a warm start loads every stored step without lowering one, gives
the same tokens, and a changed run, a corrupt entry or the switch turned off compile again.

A step XLA cannot serialize is not stored (on CPU, a drawing sampler that JAX's own cache
supplied): it compiles again at the next start, so the counts below allow for it."""

from __future__ import annotations

import logging
import os

import pytest

from nanoflow_jax import SamplingParams
from nanoflow_jax.engine import executable_store
from nanoflow_jax.engine.model_runner import ModelRunner
from tests.engine.conftest import make_llm, random_prompts, reference_greedy

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _forbid_lowering(monkeypatch, samplers: bool = True):
    def refuse(*args, **kwargs):
        raise AssertionError("a warm start lowered a step")
    monkeypatch.setattr(ModelRunner, "_lower", refuse)
    if samplers:
        monkeypatch.setattr(ModelRunner, "_lower_sampler", refuse)


def _entries(folder):
    return sorted((folder / "nanoflow_executables").glob("*.exe"))


def test_a_warm_start_loads_every_step_and_lowers_none(tmp_path, monkeypatch):
    prompts = random_prompts(3, seed=7)
    cold = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True)
    runner = cold.engine.runner
    jobs = len(runner.compile_jobs())
    stored = runner.store.stored
    assert runner.store.misses == jobs and runner.store.hits == 0
    assert len(_entries(tmp_path)) == stored >= len(runner.bucket_keys())   # every forward bucket
    want = _tokens(cold, prompts)
    assert want == reference_greedy(prompts, 6)

    _forbid_lowering(monkeypatch, samplers=stored == jobs)
    warm = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True)
    assert warm.engine.runner.store.hits == stored and warm.engine.runner.store.misses == jobs - stored
    assert _tokens(warm, prompts) == want


def test_another_run_or_other_code_misses(tmp_path, monkeypatch):
    first = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True).engine.runner.store
    other = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), max_num_seqs=4, cache_executables=True)
    assert other.engine.runner.store.hits == 0   # another engine configuration: other shapes
    monkeypatch.setenv("NANOFLOW_TEST_GPU", "0")   # a variable that changes no kernel
    again = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True)
    assert again.engine.runner.store.hits == first.stored
    table = tmp_path / "table.json"
    table.write_text("{}")
    monkeypatch.setenv("NANOFLOW_GEMM_TABLE", str(table))   # other GEMM tiles
    assert make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True).engine.runner.store.hits == 0
    monkeypatch.delenv("NANOFLOW_GEMM_TABLE")
    monkeypatch.setattr(executable_store, "code_fingerprint", lambda: "edited source")
    edited = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True)
    assert edited.engine.runner.store.hits == 0


def test_a_corrupt_entry_is_dropped_and_compiled_again(tmp_path, caplog):
    prompts = random_prompts(2, seed=3)
    first = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True).engine.runner
    unstored = len(first.compile_jobs()) - first.store.stored
    entries = _entries(tmp_path)
    entries[0].write_bytes(entries[0].read_bytes()[:100])   # truncated
    with caplog.at_level(logging.WARNING, logger=executable_store.__name__):
        llm = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True)
    store = llm.engine.runner.store
    assert store.misses == 1 + unstored and store.hits == len(entries) - 1
    assert any("dropping the stored executable" in r.getMessage() for r in caplog.records)
    assert _tokens(llm, prompts) == reference_greedy(prompts, 6)
    # Compiled again and stored whole.
    assert len(entries[0].read_bytes()) > 100


def test_an_unwritable_folder_warns_and_serves(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(executable_store, "_warned", False)   # warned once a process
    (tmp_path / "nanoflow_executables").write_text("a file where the store's folder would be")
    with caplog.at_level(logging.WARNING, logger=executable_store.__name__):
        llm = make_llm(precompile=True, compilation_cache_dir=str(tmp_path), cache_executables=True)
    assert any("could not store the executable" in r.getMessage() for r in caplog.records)
    prompts = random_prompts(2, seed=5)
    assert _tokens(llm, prompts) == reference_greedy(prompts, 6)


@pytest.mark.parametrize("precompile", [True, False])
def test_switched_off_nothing_is_stored(tmp_path, precompile):
    llm = make_llm(precompile=precompile, compilation_cache_dir=str(tmp_path), cache_executables=False)
    assert llm.engine.runner.store is None
    _tokens(llm, random_prompts(1, seed=1))
    assert not (tmp_path / "nanoflow_executables").exists()


def test_steps_compiled_on_first_use_are_stored_too(tmp_path, monkeypatch):
    """On CPU buckets compile when first needed: those go to the store and a later engine
    loads them when it needs them."""
    prompts = random_prompts(2, seed=11)
    lazy = make_llm(precompile=False, compilation_cache_dir=str(tmp_path), cache_executables=True)
    want = _tokens(lazy, prompts)
    store = lazy.engine.runner.store
    assert store.stored >= 1 and len(_entries(tmp_path)) == store.stored
    _forbid_lowering(monkeypatch, samplers=store.stored == store.misses)
    again = make_llm(precompile=False, compilation_cache_dir=str(tmp_path), cache_executables=True)
    assert _tokens(again, prompts) == want and again.engine.runner.store.hits == store.stored


def test_the_folder_keeps_to_its_budget_least_recently_used_first(tmp_path):
    """Writes past max_bytes delete the entries used longest ago; a load counts as a use."""
    import jax
    import jax.numpy as jnp

    store = executable_store.ExecutableStore(tmp_path, "run", max_bytes=1 << 40)
    fns = {name: jax.jit(lambda x, k=k: x * k).lower(jnp.ones(4)).compile() for k, name in enumerate("abcd")}
    for i, name in enumerate("abc"):
        store.store(name, fns[name])
        os.utime(store._path(name), (1000 + i, 1000 + i))   # written in order a, b, c
    assert store.load("a") is not None   # a is now the most recently used
    size = store._path("a").stat().st_size
    store.max_bytes = 3 * size + size // 2   # room for three entries
    store.store("d", fns["d"])
    assert not store._path("b").exists()   # least recently used
    assert all(store._path(n).exists() for n in "acd")
    assert float(store.load("d")(jnp.ones(4))[0]) == 3.0


def test_the_store_is_opt_in_on_cpu(tmp_path):
    """On CPU, steps are not stored by default: XLA:CPU executables loaded whole can fail at
    dispatch; cache_executables=True still opts in."""
    assert make_llm(compilation_cache_dir=str(tmp_path)).engine.runner.store is None
    assert make_llm(compilation_cache_dir=str(tmp_path), cache_executables=True).engine.runner.store is not None
