"""`EngineConfig`: every engine knob in one place, checked once at start-up."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from nanoflow_jax import env
from nanoflow_jax.config import KERNEL_SETS, KV_CACHE_DTYPE_CHOICES, PIPELINE_CHOICES
from nanoflow_jax.models.ops import programs_key
from nanoflow_jax.parallel.mesh import check_size as check_tensor_parallel_size


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass
class EngineConfig:
    max_model_len: int = 2048           # prompt + output tokens of one request
    max_num_seqs: int = 64              # request rows in one iteration (the S bucket cap)
    max_num_batched_tokens: int = 512   # tokens in one iteration (the T bucket cap, the chunk size)
    block_size: int = 16                # tokens per KV page
    num_kv_pages: int | None = None     # explicit page count (page 0, the null page, included)
    kv_memory_fraction: float | None = None  # else: this fraction of free device memory
    seed: int = 0                       # seeds requests that bring no seed of their own
    max_logprobs: int = 20              # the most `logprobs` / `prompt_logprobs` a request may ask for
    # The host schedules iteration i+1 while the device runs i ($NANOFLOW_ASYNC=0: off, for ablations).
    async_scheduling: bool = dataclasses.field(default_factory=env.async_scheduling)
    kernels: str = "auto"               # forward_paged's kernel set: auto (pallas on GPU) | xla | pallas |
                                        # hybrid (Pallas, but XLA's matrix multiplies)
    pipeline: str = "auto"              # auto | sequential | nanobatch | nanoflow (models/nanobatch.py);
                                        # auto: configs/pipelines/ for this model and GPU, else sequential
    # Pallas SM budgets by op (models.ops.BUDGETED_OPS) for nano-batch A (the decodes) and B;
    # None: every kernel on the whole GPU.
    nano_programs: tuple[Mapping[str, int], Mapping[str, int]] | None = None
    # The next three are on or off by the engine's measured tokens/s (bench/RESULTS.md).
    fuse_qkv: bool = True               # one QKV GEMM instead of three
    decode_only_steps: bool = True      # Pallas: pure-decode batches get a step without the prefill
                                        # attention kernel (faster decode, more compiles at start-up)
    fuse_rope_kv: bool = False          # Pallas: K's RoPE inside the KV-cache write (no gain measured)
    token_buckets: tuple[int, ...] | None = None   # dense-batch sizes to compile (None: powers of 2)
    block_table_buckets: tuple[int, ...] | None = None  # block-table widths to compile
    min_token_bucket: int | None = None  # smallest T bucket (None: 16; 1 for XLA ops on CPU, whose
                                         # attention gathers pages per token, so padding costs)
    precompile: bool | None = None      # compile every bucket at start-up (None: on a GPU; on CPU a
                                        # bucket compiles when a batch first needs it)
    # Buckets compiled at once, on threads (XLA compiles without the GIL); None: one per
    # bucket up to the available CPU cores; 1: one after another.
    compile_workers: int | None = None
    compilation_cache_dir: str | None = None  # None: env.compilation_cache_dir()
    # Whole compiled steps stored in that folder too (engine/executable_store.py): a warm
    # start loads them without tracing or lowering. False: JAX's cache alone. None: on
    # accelerators only; XLA:CPU executables loaded whole can fail at dispatch ("Function
    # wrapped_iota not found", jaxlib 0.10.2), so on CPU the store is opt-in (True).
    cache_executables: bool | None = None
    show_progress: bool = True          # tqdm bar (stderr) while compiling the buckets
    # Devices one model is split over (heads and MLP columns; nanoflow_jax/parallel/); 1: one device.
    tensor_parallel_size: int = 1
    # Full KV pages stay cached by their tokens after use; a prompt that starts with cached
    # pages maps them and prefills only the rest (vLLM's automatic prefix caching).
    enable_prefix_caching: bool = True
    # Cached pages (a finished request's, and any evicted from the device) are copied to host
    # memory (an LRU of this many GiB; 0: off) and, with a folder, written to disk as well (an
    # LRU of kv_offload_disk_gb that survives restarts), to be loaded back instead of computed.
    kv_offload_host_gb: float = 0.0
    kv_offload_disk_path: str | None = None
    kv_offload_disk_gb: float = 0.0
    # Pages each step copies to host memory from the offload staging ring, inside its own
    # program (engine/kv_stage.py); None: 16 MiB of pages on a GPU, no ring on CPU; 0: no
    # ring, a gather before the step copies them (on a GPU it holds the step up: ablations).
    kv_offload_pages_per_step: int | None = None
    # The KV cache's dtype (vLLM's names): auto (the weights'), or fp8 / fp8_e4m3 (float8 e4m3,
    # unscaled, saturated at +-448): half a bf16 cache's bytes, so twice the pages, and decode
    # attention reads half the bytes; the kernels widen it to the weights' dtype as they read.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        if self.num_kv_pages is not None and self.num_kv_pages < 2:
            raise ValueError(f"num_kv_pages must be >= 2 (page 0 is the reserved null page), "
                             f"got {self.num_kv_pages}")
        if self.kv_memory_fraction is not None and not 0.0 < self.kv_memory_fraction < 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1), got {self.kv_memory_fraction}")
        if self.num_kv_pages is not None and self.kv_memory_fraction is not None:
            raise ValueError("give num_kv_pages or kv_memory_fraction, not both")
        if self.nano_programs is not None:
            if len(self.nano_programs) != 2:
                raise ValueError("EngineConfig.nano_programs takes two dicts of SM budgets: nano-batch A's and B's")
            for budgets in self.nano_programs:
                programs_key(budgets)
        if self.pipeline not in PIPELINE_CHOICES:
            raise ValueError(f"EngineConfig.pipeline must be one of {PIPELINE_CHOICES}, got {self.pipeline!r}")
        if self.kernels not in KERNEL_SETS:
            raise ValueError(f"EngineConfig.kernels must be one of {KERNEL_SETS}, got {self.kernels!r}")
        if self.min_token_bucket is not None and self.min_token_bucket < 1:
            raise ValueError(f"EngineConfig.min_token_bucket must be >= 1, got {self.min_token_bucket}")
        if self.compile_workers is not None and (
                isinstance(self.compile_workers, bool) or not isinstance(self.compile_workers, int)
                or self.compile_workers < 1):
            raise ValueError(f"EngineConfig.compile_workers must be a positive integer (threads compiling "
                             f"at once) or None (one per CPU core), got {self.compile_workers!r}")
        check_tensor_parallel_size(self.tensor_parallel_size)
        if self.kv_cache_dtype not in KV_CACHE_DTYPE_CHOICES:
            raise ValueError(f"EngineConfig.kv_cache_dtype must be one of {KV_CACHE_DTYPE_CHOICES}, "
                             f"got {self.kv_cache_dtype!r}")
        if not self.kv_offload_host_gb >= 0 or not self.kv_offload_disk_gb >= 0:
            raise ValueError("EngineConfig.kv_offload_host_gb and kv_offload_disk_gb must be >= 0 (GiB; 0 is off)")
        if self.kv_offload_pages_per_step is not None and (
                isinstance(self.kv_offload_pages_per_step, bool) or not isinstance(self.kv_offload_pages_per_step, int)
                or self.kv_offload_pages_per_step < 0):
            raise ValueError(f"EngineConfig.kv_offload_pages_per_step must be an integer >= 0 (0: no staging "
                             f"ring) or None (16 MiB of pages), got {self.kv_offload_pages_per_step!r}")
        if self.kv_offload_host_gb > 0 and not self.enable_prefix_caching:
            raise ValueError("kv_offload_host_gb needs enable_prefix_caching=True: offloaded pages are found "
                             "again by their prefix-cache keys")
        if self.kv_offload_disk_path is not None and not (self.kv_offload_disk_gb > 0 and self.kv_offload_host_gb > 0):
            raise ValueError("kv_offload_disk_path needs kv_offload_disk_gb > 0 (the disk budget) and "
                             "kv_offload_host_gb > 0 (pages reach the device through host memory)")
        if self.kv_offload_host_gb > 0 and self.tensor_parallel_size > 1:
            raise ValueError("kv_offload_host_gb works on one device: its page copies do not handle a KV cache "
                             "split over devices yet; use tensor_parallel_size=1 or kv_offload_host_gb=0")
        if self.max_num_seqs > self.max_num_batched_tokens:
            # Every row holds at least one token, so more rows than tokens could never fill.
            self.max_num_seqs = self.max_num_batched_tokens

    @property
    def max_pages_per_seq(self) -> int:
        return _cdiv(self.max_model_len, self.block_size)

    def resolved_token_buckets(self, small: bool = False) -> tuple[int, ...]:
        """T buckets; `small`: start at 1 when min_token_bucket is unset (XLA ops on CPU)."""
        cap = self.max_num_batched_tokens
        if self.token_buckets is not None:
            buckets = sorted({int(b) for b in self.token_buckets if 0 < int(b) <= cap} | {cap})
            return tuple(buckets)
        least = self.min_token_bucket if self.min_token_bucket is not None else 1 if small else 16
        buckets, b = [], min(least, cap)
        while b < cap:
            buckets.append(b)
            b *= 2
        return tuple(buckets + [cap])

    def resolved_width_buckets(self) -> tuple[int, ...]:
        cap = self.max_pages_per_seq
        if self.block_table_buckets is not None:
            return tuple(sorted({int(w) for w in self.block_table_buckets if 0 < int(w) <= cap} | {cap}))
        # Attention cost grows with the block-table width, so short contexts get a narrow
        # bucket; two widths keep the compile count small.
        return (cap,) if cap <= 16 else (_cdiv(cap, 4), cap)

    def seqs_for(self, tokens: int) -> int:
        """The S bucket paired with a T bucket: a batch of T tokens has at most T rows."""
        return min(tokens, self.max_num_seqs)

    @staticmethod
    def pages_for(num_tokens: int, block_size: int) -> int:
        return _cdiv(num_tokens, block_size)
