"""Train with Flax + optax, then serve the in-memory params with the engine (no files)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanoflow_jax import LLM, SamplingParams
from nanoflow_jax.config import ModelConfig
from nanoflow_jax.models.flax_module import LlamaForCausalLM
from nanoflow_jax.models.llama import forward_dense
from nanoflow_jax.models.params import check_params

CFG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8)


def test_flax_params_are_engine_params_and_serve():
    model = LlamaForCausalLM(CFG)
    params = model.init(jax.random.key(np.random.randint(1 << 30)), jnp.zeros((1, 8), jnp.int32))["params"]
    check_params(params, CFG)  # the same pytree, no conversion

    # Teach it a fixed cycle so its greedy continuation is predictable.
    seq = jnp.asarray([[(3 * i + 5) % CFG.vocab_size for i in range(33)]])
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = model.apply({"params": p}, seq[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, value

    first = None
    for _ in range(150):
        params, state, value = step(params, state)
        first = value if first is None else first
    assert value < first * 0.2, (first, value)

    np.testing.assert_allclose(model.apply({"params": params}, seq), forward_dense(params, seq, CFG), rtol=1e-6)
    llm = LLM(params=params, config=CFG, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
              num_kv_pages=16, block_size=8)
    out = llm.generate([seq[0, :8].tolist()], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert out[0].outputs[0].token_ids == seq[0, 8:18].tolist()
