"""Workloads for `bench.throughput`: request lengths, seeded, and random-token prompts.

Real traces are not downloaded: each built-in dataset is the empirical shape of a public
trace, stored as 18 quantiles of its input and of its output lengths (tokens). A length
is drawn by inverse-CDF sampling, interpolating log-linearly between the quantiles, so the
generator reproduces the trace's median and p90 within 0.5% and its mean within 2%. Input and
output lengths are drawn independently (their log-length correlation in the traces is
0.00 to 0.20).

Sources: the length traces NanoFlow evaluates on (github.com/efeslab/Nanoflow,
datasets/traces/*.csv, columns ContextTokens,GeneratedTokens; NanoFlow's splitwise.csv is
byte-identical to Azure's AzureLLMInferenceTrace_conv.csv) and the Azure LLM inference
traces of the Splitwise paper (github.com/Azure/AzurePublicDataset,
data/AzureLLMInferenceTrace_{conv,code}.csv, Patel et al., ISCA 2024). The quantiles below
are computed from those files.

| name           | trace (rows)                               | trace mean in / out | generator mean | median    | p90        |
|----------------|--------------------------------------------|---------------------|----------------|-----------|------------|
| splitwise-conv | Azure conversation, 2023-11 (19,366)       | 1154.7 / 211.1      | 1136.5 / 211.5 | 1020 / 129 | 2732 / 424 |
| splitwise-code | Azure coding, 2023-11 (8,819)              | 2047.8 / 27.9       | 2058.9 / 28.7  | 1468 / 13 | 5190 / 55  |
| lmsys-chat-1m  | NanoFlow lmsys.csv, first turns (100,000)  | 92.2 / 207.4        | 93.9 / 208.6   | 28 / 140  | 302 / 512  |
| sharegpt       | NanoFlow sharegpt.csv, <= 4096 (58,338)    | 249.1 / 321.9       | 250.5 / 322.3  | 35 / 280  | 760 / 680  |

(generator columns, input / output: 2,000,000 draws; `GENERATED_MEANS` holds the means a test checks.)
Average input / output lengths quoted from NanoFlow's paper (arXiv 2408.12757, its dataset
table): 1155 / 211 (Splitwise), 102 / 222 (LMSYS-Chat-1M), 246 / 322 (ShareGPT). The
Splitwise figures match the conversation trace; ShareGPT's match the trace limited to
4096 tokens a request (249 / 322, the limit used here); the shipped LMSYS trace averages
92 / 207 (its generator script, datasets/utils/preprocess_lmsys.py, notes the same), and
this module follows the trace. Lengths are token counts as the traces record them; the
prompts here are random token ids of those lengths, which is all throughput depends on.

`--dataset-path` reads a trace in the same CSV format (ContextTokens and GeneratedTokens
columns, or input_len and output_len) and samples requests from its rows.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

# Cumulative probabilities of the stored quantiles: dense in the tail, which sets the mean.
QUANTILE_LEVELS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


@dataclasses.dataclass(frozen=True)
class LengthDataset:
    name: str
    description: str
    input_quantiles: tuple[int, ...]    # token counts at QUANTILE_LEVELS
    output_quantiles: tuple[int, ...]

    def __post_init__(self) -> None:
        for q in (self.input_quantiles, self.output_quantiles):
            if len(q) != len(QUANTILE_LEVELS) or list(q) != sorted(q) or q[0] < 1:
                raise ValueError(f"dataset {self.name!r}: {len(QUANTILE_LEVELS)} ascending positive quantiles needed")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`n` (input, output) length pairs."""
        return _draw(self.input_quantiles, n, rng), _draw(self.output_quantiles, n, rng)


def _draw(quantiles: tuple[int, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    # Log-linear between quantiles: lengths span orders of magnitude within a bin of the tail.
    u = rng.random(n)
    return np.maximum(1, np.rint(np.exp(np.interp(u, QUANTILE_LEVELS, np.log(quantiles))))).astype(np.int64)


DATASETS: dict[str, LengthDataset] = {d.name: d for d in (
    LengthDataset("splitwise-conv", "Splitwise / Azure LLM inference trace, conversation (NanoFlow's Splitwise)",
                  (2, 29, 181, 207, 387, 403, 703, 1020, 1071, 1130, 1315, 2735, 4083, 4098, 4142, 4831, 6212, 14050),
                  (7, 16, 41, 54, 77, 91, 103, 129, 177, 384, 400, 424, 451, 540, 601, 644, 954, 1000)),
    LengthDataset("splitwise-code", "Splitwise / Azure LLM inference trace, coding",
                  (3, 17, 75, 147, 385, 770, 1075, 1469, 1909, 2433, 3193, 5194, 7315, 7436, 7436, 7436, 7437, 7437),
                  (6, 6, 6, 7, 8, 9, 11, 13, 16, 20, 29, 55, 90, 172, 252, 361, 831, 1899)),
    LengthDataset("lmsys-chat-1m", "LMSYS-Chat-1M, first user turn and its answer",
                  (2, 2, 3, 6, 10, 14, 19, 28, 40, 66, 109, 302, 432, 639, 750, 876, 1320, 3894),
                  (1, 2, 8, 12, 28, 54, 90, 140, 216, 298, 384, 512, 520, 690, 850, 899, 1062, 4819)),
    LengthDataset("sharegpt", "ShareGPT (Vicuna, unfiltered), requests of at most 4096 tokens",
                  (1, 2, 6, 9, 13, 18, 24, 35, 57, 102, 242, 761, 1447, 2371, 2886, 3263, 3714, 4002),
                  (1, 5, 20, 39, 102, 161, 224, 280, 337, 403, 499, 680, 844, 953, 997, 1037, 1121, 2382)),
)}
ALIASES = {"splitwise": "splitwise-conv", "lmsys": "lmsys-chat-1m"}
# vLLM's name for fixed lengths (--input-len / --output-len): random token ids, constant lengths.
CONSTANT = "random"
# The generator's mean input / output lengths (2,000,000 draws), to which a test holds it.
GENERATED_MEANS = {"splitwise-conv": (1136.5, 211.5), "splitwise-code": (2058.9, 28.7),
                   "lmsys-chat-1m": (93.9, 208.6), "sharegpt": (250.5, 322.3)}


def dataset_names() -> list[str]:
    return [CONSTANT, *DATASETS, *ALIASES]


def resolve(name: str) -> str:
    """The canonical dataset name; a clear error lists the known ones."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key != CONSTANT and key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(dataset_names())}, "
                         "or --dataset-path FILE.csv for a length trace")
    return key


def read_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) lengths of a CSV trace: ContextTokens,GeneratedTokens (Splitwise's
    format, NanoFlow's traces) or input_len,output_len columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no requests (a header row and one row per request are expected)")
    for cols in (("ContextTokens", "GeneratedTokens"), ("input_len", "output_len")):
        if set(cols) <= set(rows[0]):
            try:
                pairs = np.array([(int(r[cols[0]]), int(r[cols[1]])) for r in rows], np.int64)
            except ValueError as e:
                raise ValueError(f"{path}: a length in columns {cols} is not an integer ({e})") from None
            keep = (pairs[:, 0] >= 1) & (pairs[:, 1] >= 1)
            if not keep.any():
                raise ValueError(f"{path}: no row has positive input and output lengths")
            return pairs[keep, 0], pairs[keep, 1]
    raise ValueError(f"{path}: columns {sorted(rows[0])} hold no lengths: name them ContextTokens,GeneratedTokens "
                     "or input_len,output_len")


def request_lengths(dataset: str, n: int, seed: int, input_len: int = 0, output_len: int = 0,
                    path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` (input, output) length pairs: from a trace file (rows drawn with replacement
    only when it has fewer than n), a built-in dataset, or constant lengths."""
    rng = np.random.default_rng(seed)
    if path is not None:
        ins, outs = read_trace(path)
        rows = rng.choice(len(ins), size=n, replace=n > len(ins))
        return ins[rows], outs[rows]
    key = resolve(dataset)
    if key == CONSTANT:
        if input_len < 1 or output_len < 1:
            raise ValueError(f"constant lengths need --input-len and --output-len >= 1, got {input_len} / {output_len}")
        return np.full(n, input_len, np.int64), np.full(n, output_len, np.int64)
    return DATASETS[key].sample(n, rng)


def cap_lengths(ins: np.ndarray, outs: np.ndarray, max_model_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit every request in `max_model_len` (a prompt keeps at least one output token):
    the prompt is cut first to max_model_len - 1, then the output to what is left.
    Returns the capped lengths and how many requests changed."""
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2 (one prompt and one output token), got {max_model_len}")
    new_in = np.minimum(ins, max_model_len - 1)
    new_out = np.minimum(outs, max_model_len - new_in)
    return new_in, new_out, int(np.sum((new_in != ins) | (new_out != outs)))


def random_prompts(lengths: np.ndarray, vocab_size: int, seed: int) -> list[list[int]]:
    """Token-id prompts of these lengths, away from the vocabulary's ends (special tokens)."""
    rng = np.random.default_rng(seed)
    lo, hi = (10, vocab_size - 10) if vocab_size > 40 else (0, vocab_size)
    return [rng.integers(lo, hi, size=int(n)).tolist() for n in lengths]


def length_stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "median": float(np.median(x)), "p90": float(np.percentile(x, 90)),
            "min": int(np.min(x)), "max": int(np.max(x))}
