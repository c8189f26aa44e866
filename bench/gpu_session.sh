#!/usr/bin/env bash
# One device call: the GPU-marked tests, then an engine throughput run on Llama-3-8B shapes.
# Usage (device machine): OUT=/some/dir bash bench/gpu_session.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 NANOFLOW_TEST_GPU=1 PIP_NO_INDEX=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 220 python3 -m bench.throughput --model llama-3-8b --weights random --dtype bfloat16 \
  --num-prompts 128 --input-len 512 --output-len 256 --max-num-seqs 128 --max-num-batched-tokens 2048 \
  --token-buckets 128,2048 --num-kv-pages 16384 --kernels "${KERNELS:-pallas}" \
  --out "$OUT/throughput_llama3_8b_${KERNELS:-pallas}.json" 2>&1 | tail -45 | tee "$OUT/throughput.log"
if [ ! -s "$OUT/throughput_llama3_8b_${KERNELS:-pallas}.json" ]; then  # fall back to the XLA kernels, smaller chunks
  timeout 150 python3 -m bench.throughput --model llama-3-8b --weights random --dtype bfloat16 \
    --num-prompts 64 --input-len 256 --output-len 128 --max-num-seqs 64 --max-num-batched-tokens 512 \
    --token-buckets 64,512 --num-kv-pages 8192 --kernels xla \
    --out "$OUT/throughput_llama3_8b_xla.json" 2>&1 | tail -45 | tee -a "$OUT/throughput.log"
fi
