"""A GRPO-style RL loop on the default model: rollouts through the engine, training in
Flax + optax, and the new weights pushed back into the engine in place.

    python -m examples.grpo --steps 5

Each step samples `n` completions per prompt with their logprobs (the engine's, which are
the model's raw logprobs), scores them with a toy reward (the share of even token ids: a
stand-in for a real verifier), normalises the rewards within each prompt's group, and
takes one optimizer step on the clipped policy-gradient objective. The ratio's "old"
logprobs are the engine's: on-policy they equal the trainer's own forward, which each
step checks (`max_logprob_gap`). `LLM.update_params` then swaps the weights without
recompiling anything, so every step after the first compiles nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanoflow_jax import LLM, SamplingParams
from nanoflow_jax.models.flax_module import LlamaForCausalLM
from nanoflow_jax.weights.loader import load_model

PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is")


@dataclasses.dataclass
class StepStats:
    step: int
    mean_reward: float
    loss: float
    max_logprob_gap: float   # max |engine logprob - trainer logprob| over sampled tokens
    update_norm: float       # L2 norm of the parameter change
    seconds: float


def toy_reward(token_ids: Sequence[int]) -> float:
    return float(np.mean([t % 2 == 0 for t in token_ids])) if token_ids else 0.0


def grpo_loss(params: Any, model: LlamaForCausalLM, tokens: jax.Array, mask: jax.Array, old_logprobs: jax.Array,
              advantages: jax.Array, clip: float) -> tuple[jax.Array, jax.Array]:
    """Clipped surrogate over the sampled tokens; also returns the trainer's token logprobs.

    tokens [B, T] (prompt then completion, right-padded); mask [B, T-1] marks the
    positions whose next token was sampled; old_logprobs [B, T-1] are the engine's."""
    logits = model.apply({"params": params}, tokens)[:, :-1]
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    ratio = jnp.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip, 1 + clip) * adv)
    loss = -jnp.sum(surrogate * mask) / jnp.maximum(jnp.sum(mask), 1)
    return loss, logprobs


def rollout_batch(outs: list[Any], length: int) -> tuple[np.ndarray, ...]:
    """Token matrix, sampled-token mask, the engine's logprobs and group advantages."""
    rows = [(o.prompt_token_ids, c) for o in outs for c in o.outputs]
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length - 1), np.float32)
    old = np.zeros((len(rows), length - 1), np.float32)
    rewards = np.zeros(len(rows), np.float32)
    for r, (prompt, comp) in enumerate(rows):
        seq = list(prompt) + list(comp.token_ids)
        tokens[r, :len(seq)] = seq
        at = slice(len(prompt) - 1, len(seq) - 1)   # logits at position t predict token t + 1
        mask[r, at] = 1.0
        old[r, at] = [entry[t].logprob for t, entry in zip(comp.token_ids, comp.logprobs)]
        rewards[r] = toy_reward(comp.token_ids)
    group = rewards.reshape(len(outs), -1)
    adv = (group - group.mean(1, keepdims=True)) / (group.std(1, keepdims=True) + 1e-4)
    return tokens, mask, old, adv.reshape(-1), rewards


def train(model_path: str | None = None, steps: int = 2, n: int = 4, max_tokens: int = 8,
          prompts: Sequence[str] = PROMPTS[:2], learning_rate: float = 1e-5, clip: float = 0.2,
          seed: int = 0) -> Iterator[StepStats]:
    """Yields one StepStats per step (a generator, so a caller can watch each step)."""
    loaded = load_model(model_path, dtype="float32", progress=False)
    cfg, params = loaded.config, loaded.params
    prompt_ids = [loaded.tokenizer.encode(p) for p in prompts]
    length = max(map(len, prompt_ids)) + max_tokens
    # Small fixed buckets, all compiled up front: no step after the first compiles.
    llm = LLM(params=params, config=cfg, tokenizer=loaded.tokenizer, max_model_len=128,
              max_num_seqs=len(prompts) * n, max_num_batched_tokens=64, num_kv_pages=8 * len(prompts) * n + 1,
              precompile=True, show_progress=False)
    model = LlamaForCausalLM(cfg)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(params: Any, opt_state: Any, tokens: jax.Array, mask: jax.Array, old: jax.Array,
               adv: jax.Array) -> tuple[Any, Any, jax.Array, jax.Array, jax.Array]:
        (loss, logprobs), grads = jax.value_and_grad(grpo_loss, has_aux=True)(
            params, model, tokens, mask, old, adv, clip)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, logprobs, optax.tree.norm(updates)

    for step in range(steps):
        start = time.perf_counter()
        sampling = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, logprobs=0, seed=seed + step)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling, use_tqdm=False)
        tokens, mask, old, adv, rewards = rollout_batch(outs, length)
        params, opt_state, loss, logprobs, norm = update(params, opt_state, tokens, mask, old, adv)
        gap = float(np.max(np.abs(np.asarray(logprobs) - old) * mask))
        llm.update_params(params)
        yield StepStats(step, float(rewards.mean()), float(loss), gap, float(norm), time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt (the GRPO group)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    args = ap.parse_args(argv)
    for s in train(args.model, args.steps, args.n, args.max_tokens, learning_rate=args.learning_rate):
        print(f"step {s.step}: reward {s.mean_reward:.3f}  loss {s.loss:+.4f}  logprob gap {s.max_logprob_gap:.2e}  "
              f"update norm {s.update_norm:.3e}  {s.seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
