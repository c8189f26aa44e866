#!/usr/bin/env bash
# One device call: the GPU-marked tests; engine throughput on Llama-3-8B shapes per kernel
# set; then (TUNE_MS) the GEMM configuration search with the weights rotated past L2,
# whose winners ($OUT/gemm_table.json) get a second Pallas throughput run in the same
# call through $NANOFLOW_GEMM_TABLE (copy them into _TUNED when they win). Extra runs:
# FUSE_QKV=0 (three QKV GEMMs), DECODE_ONLY=0 (no decode-only steps), FUSE_ROPE_KV=1 (K's
# RoPE in the cache write), PROFILE=1 (the decode-step breakdown), SWEEP=1 (decode-attention
# launch sweep at the engine's 128 x 640 and at 64 x 4096), KERNELS=1 (bench.kernels' GEMM
# (Mosaic only, M in KERNEL_MS), attention and memory-bound tables, slope timing; KERNELS=memory:
# without the GEMMs; KERNEL_RUNS=N: N runs, judged alone and by their medians), TIMELINE=1 (bench.timeline: GEMM GPU time per call from CUPTI records),
# AB=kind:M,... (bench.gemm_ab on those candidate keys, then bench.kernels' GEMMs with the winners;
# AB_THROUGHPUT=1: also the engine with them, for the decode rows AB=plain:128,silu:128,residual:128;
# AB_KERNELS=0 skips the GEMM table).
# Usage (device machine): OUT=/some/dir [KERNEL_SETS='pallas hybrid'] [TUNE_MS=256,512|none]
#   [TUNE_STEPS=tiles,chain,cluster,split,confirm] [FUSE_QKV=0] [DECODE_ONLY=0] [FUSE_ROPE_KV=1] [PROFILE=1] [SWEEP=1] [KERNELS=1|memory] [TIMELINE=1] [AB=plain:2048,...] [AB_THROUGHPUT=1] [AB_KERNELS=0] [TESTS=0] bash bench/gpu_session.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 NANOFLOW_TEST_GPU=1 PIP_NO_INDEX=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
# Kernel profilers, if the machine has them (a per-kernel timeline would settle the GEMM gap).
for tool in ncu nsys; do command -v "$tool" >/dev/null && echo "profiler: $tool" | tee -a "$OUT/nvidia_smi.txt"; done
if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0 skips the GPU tests
  timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi

throughput() {  # $1: result name; the rest: extra bench.throughput flags
  local name=$1; shift
  timeout 240 python3 -m bench.throughput --model llama-3-8b --weights random --dtype bfloat16 \
    --num-prompts 128 --input-len 512 --output-len 256 --max-num-seqs 128 --max-num-batched-tokens 2048 \
    --token-buckets 128,2048 --num-kv-pages 16384 "$@" \
    --out "$OUT/throughput_llama3_8b_${name}.json" 2>&1 | grep -v "^WARNING" | tail -6 | tee -a "$OUT/throughput.log"
}
for k in ${KERNEL_SETS-pallas}; do  # KERNEL_SETS='' skips throughput
  throughput "$k" --kernels "$k"; done
if [ "${FUSE_QKV:-1}" = 0 ]; then throughput pallas_unfused_qkv --kernels pallas --fuse-qkv 0; fi
if [ "${FUSE_ROPE_KV:-0}" = 1 ]; then throughput pallas_fuse_rope_kv --kernels pallas --fuse-rope-kv 1; fi
if [ "${DECODE_ONLY:-1}" = 0 ]; then throughput pallas_no_decode_only --kernels pallas --decode-only-steps 0; fi
if [ "${TUNE_MS:-256,512}" != none ]; then
  timeout 260 python3 -m bench.gemm_tune --ms "${TUNE_MS:-256,512}" --steps "${TUNE_STEPS:-tiles,chain,cluster,split,confirm}" \
    --budget-s 230 --out "$OUT/gemm_tune.json" --table-out "$OUT/gemm_table.json" 2>&1 | grep "^M=" | tee "$OUT/gemm_tune.log"
  if [ -f "$OUT/gemm_table.json" ]; then
    NANOFLOW_GEMM_TABLE="$OUT/gemm_table.json" throughput pallas_gemm_table --kernels pallas
  fi
fi
if [ "${SWEEP:-0}" = 1 ]; then
  timeout 200 python3 -m bench.decode_sweep --cases 128x640,64x4096 --out "$OUT/decode_sweep.json" 2>&1 | grep "^best" | tee "$OUT/decode_sweep.log"
fi
if [ "${TIMELINE:-0}" = 1 ]; then  # then once more on M = 1024 without XLA's CUDA graphs
  timeout "${TIMELINE_S:-200}" python3 -m bench.timeline --out "$OUT/timeline.json" 2>&1 | grep -v "^WARNING" | tail -22 | tee "$OUT/timeline.log"
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 90 python3 -m bench.timeline \
    --cases qkv:1024,o_res:1024,gate_up_silu:1024,down_res:1024 --out "$OUT/timeline_nograph.json" 2>&1 | tail -4 | tee -a "$OUT/timeline.log"
fi
if [ -n "${AB:-}" ]; then  # AB=kind:M,... : bench.gemm_ab on those keys, then the GEMM table with its winners
  timeout 300 python3 -m bench.gemm_ab --only "$AB" --out "$OUT/gemm_ab.json" --table-out "$OUT/gemm_ab_table.json" 2>&1 \
    | grep -v "^WARNING\|UserWarning\|_warn_once" | tail -8 | tee "$OUT/gemm_ab.log"
  if [ -f "$OUT/gemm_ab_table.json" ] && [ "${AB_THROUGHPUT:-0}" = 1 ]; then  # the engine with the winners
    NANOFLOW_GEMM_TABLE="$OUT/gemm_ab_table.json" throughput pallas_gemm_ab_table --kernels pallas
  fi
  [ -f "$OUT/gemm_ab_table.json" ] && [ "${AB_KERNELS:-1}" = 1 ] && NANOFLOW_GEMM_TABLE="$OUT/gemm_ab_table.json" timeout 200 python3 -m bench.kernels \
    --sections gemm --gemm-backends mosaic --gemm-ms 256,512,1024,2048 --budget-s 170 --out "$OUT/kernels_gemm_ab.json" 2>&1 | grep "^\["
fi
if [ "${KERNELS:-0}" != 0 ]; then
  runs=()  # KERNEL_RUNS=N: N whole runs in one call (files *_rK), judged alone and by their medians
  for r in $(seq 1 "${KERNEL_RUNS:-1}"); do
    sfx=$([ "${KERNEL_RUNS:-1}" = 1 ] || echo "_r$r")
    # The short sections first, so a GEMM table cut by its budget loses none of them.
    timeout 150 python3 -m bench.kernels --sections decode_attention,memory_bound,prefill_attention \
      --memory-ts "${MEMORY_TS:-256,512,1024,2048,8192,16384}" --budget-s 130 --out "$OUT/kernels_memory$sfx.json" >> "$OUT/kernels.log" 2>&1
    files="$OUT/kernels_memory$sfx.json"
    if [ "$KERNELS" = 1 ]; then
      timeout $(( ${GEMM_BUDGET_S:-330} + 30 )) python3 -m bench.kernels --sections gemm --gemm-backends mosaic --gemm-ms "${KERNEL_MS:-128,256,512,1024,2048}" \
        --budget-s "${GEMM_BUDGET_S:-330}" --out "$OUT/kernels_gemm$sfx.json" >> "$OUT/kernels.log" 2>&1
      files="$OUT/kernels_gemm$sfx.json,$files"
    fi
    runs+=(--run "$files")
  done
  grep "^\[" "$OUT/kernels.log"
  [ "${KERNEL_RUNS:-1}" = 1 ] || python3 -m bench.targets "${runs[@]}"
fi
if [ "${PROFILE:-0}" = 1 ]; then
  timeout 200 python3 -m bench.step_profile --out "$OUT/step_profile.json" 2>&1 | grep -v "^WARNING" | tail -16
fi
