#!/usr/bin/env bash
# One device call: the GPU-marked tests, engine throughput on Llama-3-8B shapes with the
# Pallas and the hybrid kernel sets (FUSE_QKV=0: also Pallas with three QKV GEMMs, the ablation), then
# (time left) the GEMM configuration search at M >= 1024.
# Usage (device machine): OUT=/some/dir [KERNEL_SETS='pallas xla'] [FUSE_QKV=0] [TUNE_MS=none] bash bench/gpu_session.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 NANOFLOW_TEST_GPU=1 PIP_NO_INDEX=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"

throughput() {  # $1: result name; the rest: extra bench.throughput flags
  local name=$1; shift
  timeout 170 python3 -m bench.throughput --model llama-3-8b --weights random --dtype bfloat16 \
    --num-prompts 128 --input-len 512 --output-len 256 --max-num-seqs 128 --max-num-batched-tokens 2048 \
    --token-buckets 128,2048 --num-kv-pages 16384 "$@" \
    --out "$OUT/throughput_llama3_8b_${name}.json" 2>&1 | grep -v "^WARNING" | tail -6 | tee -a "$OUT/throughput.log"
}
for k in ${KERNEL_SETS:-pallas hybrid}; do throughput "$k" --kernels "$k"; done
if [ "${FUSE_QKV:-1}" = 0 ]; then throughput pallas_unfused_qkv --kernels pallas --fuse-qkv 0; fi
if [ "${TUNE_MS:-1024,2048}" != none ]; then
  timeout 160 python3 -m bench.gemm_tune --ms "${TUNE_MS:-1024,2048}" --budget-s 120 --out "$OUT/gemm_tune2.json" 2>&1 \
    | grep "^M=" | tee "$OUT/gemm_tune2.log"
fi
