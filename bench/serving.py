"""Online serving benchmark: latency percentiles and throughput of a running server.

    python -m nanoflow_jax.serve --model llama-3-8b --weights random --port 8000 &
    python -m bench.serving --port 8000 --dataset sharegpt --num-prompts 512 --request-rate 4,8,16,inf \
        --goodput ttft:500 tpot:50 --out bench/results/serving.json --plot bench/results/serving.png

Flags follow `vllm bench serve` where they overlap (--base-url / --host / --port,
--request-rate, --max-concurrency, --num-prompts, --dataset-name, --dataset-path,
--input-len / --output-len, --goodput, --seed). Workloads are the throughput benchmark's
(bench/datasets.py): random token-id prompts of constant lengths or of a public trace's
length shape; every request asks for its own output length with ignore_eos.

Requests arrive as a Poisson process at --request-rate (inf: all at once), optionally
capped at --max-concurrency in flight; several rates make a sweep (one run each, a PNG of
latency against the achieved rate). Each request streams (/v1/completions, SSE): TTFT is
the time to its first chunk, ITL the gaps between chunks, TPOT (e2e - TTFT) / (output
tokens - 1) with the token count from the response's usage. Goodput counts the requests
per second that meet every SLO given. `--offline-json` (a bench.throughput result of the
same workload) adds the ratio of online to offline token throughput.

The client never imports JAX's devices: it may share the machine (and the GPU) with the
server, so device and versions are read from the server's /version.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import datasets, print_and_write

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50` (milliseconds) -> {"ttft": 500.0, "tpot": 50.0}."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput {item!r}: use NAME:MS with NAME one of {', '.join(SLO_METRICS)}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[name] <= 0:
            raise ValueError(f"--goodput {item!r}: the limit must be > 0 ms")
    return slos


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        rate = float(part)   # "inf" parses too
        if not rate > 0:
            raise ValueError(f"--request-rate {part!r}: use requests per second > 0, or inf")
        rates.append(rate)
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="the server, e.g. http://127.0.0.1:8000 (default: --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="the model name to send (default: the server's, from /v1/models)")
    p.add_argument("--dataset", "--dataset-name", dest="dataset", default=datasets.CONSTANT,
                   help=f"request lengths: {datasets.CONSTANT} (constant --input-len / --output-len) or a "
                        f"built-in trace shape: {', '.join(datasets.dataset_names()[1:])}")
    p.add_argument("--dataset-path", default=None, help="a CSV length trace, as bench.throughput takes")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="cap every request (prompt first) to this (default: the server's max_model_len)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="prompts are random token ids below this (default 32000: inside every shipped model's "
                        "vocabulary)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", default="inf",
                   help="requests per second (Poisson arrivals), or inf for all at once; several, comma-separated, "
                        "run a sweep (default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="the gamma shape of the inter-arrival times: 1 is Poisson, lower is burstier")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (milliseconds; ttft, tpot, e2el)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one request may take on the client")
    p.add_argument("--offline-json", default=None,
                   help="a bench.throughput result of the same workload: reports online / offline tokens/s")
    p.add_argument("--out", "--output-json", dest="out", default=None, help="write the result JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of latency against the achieved request rate")
    args = p.parse_args(argv)
    try:
        args.rates = parse_rates(args.request_rate)
        args.slos = parse_goodput(args.goodput)
        if args.dataset_path is None:
            args.dataset = datasets.resolve(args.dataset)
    except ValueError as e:
        p.error(str(e))
    if args.num_prompts < 1:
        p.error(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        p.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.burstiness <= 0:
        p.error(f"--burstiness must be > 0, got {args.burstiness}")
    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    return args


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    ok: bool = False
    error: str = ""
    ttft: float = 0.0                 # seconds
    e2el: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def one_request(client: Any, url: str, body: dict[str, Any], prompt_len: int) -> RequestResult:
    """Stream one completion; times every chunk."""
    res = RequestResult(prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error event")
                    return res
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
            res.e2el = time.perf_counter() - start
            res.ok = res.output_tokens > 0
            if not res.ok:
                res.error = "the stream carried no usage chunk"
    except Exception as e:   # a failed request is counted, not fatal to the run
        res.error = f"{type(e).__name__}: {e}"
    return res


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds from the start at which each request is sent (gamma inter-arrivals, mean 1/rate)."""
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


async def run_rate(args: argparse.Namespace, rate: float, prompts: list[list[int]], outs: np.ndarray,
                   model: str) -> tuple[list[RequestResult], float]:
    """Every request at this rate; returns the results and the wall time of the run."""
    import httpx

    url = args.base_url + args.endpoint
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts))
    times = arrival_times(len(prompts), rate, args.burstiness, args.seed)
    connections = httpx.Limits(max_connections=args.max_concurrency or len(prompts), max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=60.0), limits=connections) as client:
        start = time.perf_counter()

        async def send(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
            body = {"model": model, "prompt": prompts[i], "max_tokens": int(outs[i]), "ignore_eos": True,
                    "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
            async with limit:
                return await one_request(client, url, body, len(prompts[i]))

        results = await asyncio.gather(*(send(i) for i in range(len(prompts))))
        return list(results), time.perf_counter() - start


def _pcts(values: list[float]) -> dict[str, float]:
    """mean and percentiles in milliseconds."""
    if not values:
        return {}
    a = 1e3 * np.asarray(values)
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    prompt_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "ttft_ms": _pcts([r.ttft for r in ok]),
        "tpot_ms": _pcts([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _pcts([x for r in ok for x in r.itl]),
        "e2el_ms": _pcts([r.e2el for r in ok]),
    }
    if slos:
        def meets(r: RequestResult) -> bool:
            got = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
            return all(1e3 * got[name] <= limit for name, limit in slos.items())
        good = sum(meets(r) for r in ok)
        summary["goodput"] = {"slo_ms": slos, "requests_meeting_slo": good, "request_goodput": good / duration}
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:5]
    return summary


def server_info(base_url: str) -> dict[str, Any]:
    import httpx

    info: dict[str, Any] = {}
    for path in ("/version", "/v1/models"):
        try:
            resp = httpx.get(base_url + path, timeout=30)
            if resp.status_code == 200:
                info[path] = resp.json()
        except httpx.HTTPError as e:
            info[path] = f"unavailable: {e}"
    return info


def build_workload(args: argparse.Namespace, max_model_len: int) -> tuple[list[list[int]], np.ndarray, int]:
    ins, outs = datasets.request_lengths(args.dataset, args.num_prompts, args.seed, args.input_len,
                                         args.output_len, args.dataset_path)
    ins, outs, capped = datasets.cap_lengths(ins, outs, max_model_len)
    return datasets.random_prompts(ins, args.vocab_size, args.seed), outs, capped


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = server_info(args.base_url)
    models = info.get("/v1/models")
    if not isinstance(models, dict):
        raise SystemExit(f"bench.serving: no server answers at {args.base_url} ({models})")
    card = models["data"][0]
    model = args.model or card["id"]
    max_model_len = args.max_model_len or card.get("max_model_len") or int(args.input_len + args.output_len)
    prompts, outs, capped = build_workload(args, max_model_len)
    runs = []
    for rate in args.rates:
        results, duration = asyncio.run(run_rate(args, rate, prompts, outs, model))
        summary = {"request_rate": "inf" if math.isinf(rate) else rate, "max_concurrency": args.max_concurrency,
                   **summarize(results, duration, args.slos)}
        runs.append(summary)
        print(f"rate {summary['request_rate']}: {summary['completed']} done, {summary['failed']} failed, "
              f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tok/s, "
              f"TTFT p99 {summary['ttft_ms'].get('p99', float('nan')):.1f} ms", file=sys.stderr)
    version = info.get("/version") if isinstance(info.get("/version"), dict) else {}
    ins = np.array([len(p) for p in prompts])
    result: dict[str, Any] = {
        "command": "python -m bench.serving " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": version.get("device"), "backend": version.get("backend"), "jax": version.get("jax"),
        "python": platform.python_version(), "base_url": args.base_url, "model": model,
        "server_engine_config": version.get("engine_config"),
        "workload": {"dataset": args.dataset_path or args.dataset, "num_prompts": args.num_prompts,
                     "seed": args.seed, "max_model_len": max_model_len, "requests_capped": capped,
                     "input_len": datasets.length_stats(ins), "output_len": datasets.length_stats(outs)},
        "runs": runs,
    }
    if args.offline_json:
        add_offline_ratio(result, json.loads(Path(args.offline_json).read_text()))
    return result


def add_offline_ratio(result: dict[str, Any], offline: dict[str, Any]) -> None:
    """Online token throughput of each run as a fraction of the offline benchmark's."""
    total = offline.get("total_tokens_per_s")
    output = offline.get("output_tokens_per_s")
    result["offline"] = {"total_tokens_per_s": total, "output_tokens_per_s": output,
                         "command": offline.get("command")}
    for r in result["runs"]:
        if total:
            r["fraction_of_offline_total"] = r["total_token_throughput"] / total
        if output:
            r["fraction_of_offline_output"] = r["output_throughput"] / output


def plot(result: dict[str, Any], png: str) -> None:
    """TTFT, TPOT and ITL (p50 and p99) against the achieved request rate, one point per run."""
    from bench import pyplot

    plt = pyplot()
    runs = sorted(result["runs"], key=lambda r: r["request_throughput"])
    x = [r["request_throughput"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "itl_ms"), ("TTFT", "TPOT", "ITL")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [r[key].get(q, float("nan")) for r in runs], style, label=q)
        for r, xi in zip(runs, x):
            ax.annotate(f"{r['request_rate']}", (xi, r[key].get("p99", float("nan"))), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("achieved requests/s (labels: offered rate)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{result['model']} on {result['device']}: {result['workload']['dataset']}, "
                 f"{result['workload']['num_prompts']} requests", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from nanoflow_jax import env

    env.claim_serving_memory()   # before JAX first touches the GPU
    args = parse_args(argv)
    result = run(args)
    print_and_write(result, args.out)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.plot)
    return 0 if all(r["failed"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
