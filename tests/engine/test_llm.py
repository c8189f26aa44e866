"""LLM facade features for training loops: the progress bar, and weights swapped in place."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanoflow_jax import SamplingParams
from tests.engine.conftest import IM_END, count_compiles, make_llm, random_prompts, reference_greedy, tiny_params

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_generate_shows_a_progress_bar_by_default(capsys):
    llm = make_llm()
    llm.generate([[1, 2]], GREEDY)
    assert "Processed prompts" in capsys.readouterr().err
    llm.generate([[1, 2]], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
    made = []

    def bar(*args, **kwargs):   # vLLM accepts a tqdm-like callable
        from tqdm import tqdm
        made.append(kwargs)
        return tqdm(*args, **{**kwargs, "disable": True})

    llm.generate([[1, 2], [3]], GREEDY, use_tqdm=bar)
    assert made and made[0]["total"] == 2


def test_update_params_follows_the_new_weights_without_compiling():
    llm = make_llm(precompile=True)
    runner = llm.engine.runner
    prompts = random_prompts(3, [5, 30, 11], seed=21)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == \
        reference_greedy(prompts, GREEDY.max_tokens)
    compiled = dict(runner._compiled)
    new, old = tiny_params(1), runner.params
    llm.update_params(new)   # the first update compiles the re-layout (once per engine shape)
    # The old weights' buffers were donated to the new ones: one engine copy at a time.
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(old))
    with count_compiles() as events:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert events == [], events
    assert [o.outputs[0].token_ids for o in outs] == reference_greedy(prompts, GREEDY.max_tokens, new)
    with count_compiles() as events:
        llm.update_params(tiny_params(0))
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert events == [], events
    assert [o.outputs[0].token_ids for o in outs] == reference_greedy(prompts, GREEDY.max_tokens)
    assert runner._compiled.keys() == compiled.keys() and all(runner._compiled[k] is compiled[k] for k in compiled)
    assert runner.cache.k.shape[1] == runner.num_pages and llm.engine.blocks.num_pages == runner.num_pages
    # The caller's arrays stay theirs: the engine copied them, nothing was donated away.
    assert np.isfinite(np.asarray(new["embed"])).all()
    # Host (numpy) arrays are accepted and uploaded.
    llm.update_params(jax.tree_util.tree_map(np.asarray, new))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == \
        reference_greedy(prompts, GREEDY.max_tokens, new)


def test_update_params_names_the_mismatching_leaf_and_keeps_serving():
    llm = make_llm()
    good = tiny_params(0)
    bad_shape = {**good, "layers": {**good["layers"], "wk": good["layers"]["wk"][:, :, :-1]}}
    with pytest.raises(ValueError, match=r"layers/wk is float32\[2, 64, 31\] but the engine's is float32\[2, 64, 32\]"):
        llm.update_params(bad_shape)
    with pytest.raises(ValueError, match=r"parameter embed is bfloat16"):
        llm.update_params({**good, "embed": good["embed"].astype(jnp.bfloat16)})
    with pytest.raises(ValueError, match="missing final_norm"):
        llm.update_params({k: v for k, v in good.items() if k != "final_norm"})
    # A stop is seen one iteration late: the batch sampled meanwhile is still in flight
    # when generate returns, and update_params reads it rather than refuse.
    eos_first = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={IM_END: 100.0})
    assert llm.generate([[1, 2]], eos_first, use_tqdm=False)[0].outputs[0].token_ids == [IM_END]
    assert llm.engine._inflight is not None
    llm.update_params(good)
    assert not llm.engine.has_unfinished() and llm.engine.blocks.all_free()
    stream = llm.stream([[1, 2, 3]], GREEDY)
    next(stream)
    with pytest.raises(RuntimeError, match="still running"):
        llm.update_params(good)
    stream.close()
    assert llm.generate([[4, 5]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == reference_greedy([[4, 5]], 6)[0]


def test_update_params_takes_arrays_sharded_over_a_training_mesh(tmp_path):
    """Two host devices stand in for a training mesh: the params arrive sharded over both,
    the engine serves on one, and the outputs follow them."""
    script = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from nanoflow_jax import SamplingParams
        from tests.engine.conftest import make_llm, reference_greedy, tiny_params
        assert len(jax.devices()) == 2
        mesh = Mesh(np.array(jax.devices()), ("d",))
        new = tiny_params(1)
        def shard(x):
            spec = P("d") if x.shape[0] % 2 == 0 else P()
            return jax.device_put(x, NamedSharding(mesh, spec))
        sharded = jax.tree_util.tree_map(shard, new)
        assert len(sharded["embed"].sharding.device_set) == 2
        llm = make_llm()
        llm.update_params(sharded)
        sp = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        out = llm.generate([[3, 1, 4, 1, 5]], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert out == reference_greedy([[3, 1, 4, 1, 5]], 5, new)[0], out
        assert all(len(x.sharding.device_set) == 1 for x in jax.tree_util.tree_leaves(llm.engine.runner.params))
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_generate_builds_only_final_updates_and_stream_every_step(monkeypatch):
    """generate keeps final outputs only, so the engine builds one update per request (its
    tokens and text copied once), not one per step; stream still gets every step's delta."""
    from nanoflow_jax.engine.llm_engine import LLMEngine

    built = []
    inner = LLMEngine._output
    monkeypatch.setattr(LLMEngine, "_output", lambda self, seq: built.append(seq.request_id) or inner(self, seq))
    llm = make_llm()
    rng = np.random.default_rng()
    prompts = random_prompts(5, [int(x) for x in rng.integers(2, 20, 5)], seed=int(rng.integers(1 << 30)))
    lengths = [int(x) for x in rng.integers(2, 9, 5)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    assert [o.outputs[0].token_ids for o in outs] == [r[:n] for r, n in zip(reference_greedy(prompts, 8), lengths)]
    assert sorted(built) == sorted(o.request_id for o in outs)   # once each
    group = llm.generate(prompts[:1], SamplingParams(temperature=0.9, n=3, max_tokens=4, seed=1, ignore_eos=True),
                         use_tqdm=False)
    assert len(group[0].outputs) == 3 and all(len(c.token_ids) == 4 for c in group[0].outputs)
    built.clear()
    streamed = list(llm.stream(prompts[:1], params[0]))
    assert len(built) == len(streamed) == lengths[0]
    assert [t for o in streamed for t in o.outputs[0].delta_token_ids] == outs[0].outputs[0].token_ids
