#!/usr/bin/env bash
# One device call: the GPU-marked tests; the chained-vs-single timing probe
# (bench/chain_probe.py) and the kernels each chain launches; Nsight Compute counters of
# our GEMMs and the library's on the same shapes (bench/ncu_gemm.py).
# Usage (device machine): OUT=/some/dir [CASES=op:M,...] [SECTIONS="SpeedOfLight ..."] bash bench/ncu_gemm.sh
set -u
# No preallocation: ncu saves and restores the memory a kernel may touch on every replay pass.
export PYTHONPATH=. PYTHONUNBUFFERED=1 NANOFLOW_TEST_GPU=1 PIP_NO_INDEX=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" | tee -a "$OUT/nvidia_smi.txt"
timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 150 python3 -m bench.chain_probe --mode time --out "$OUT/chain_probe.json" 2>&1 | grep "^{" | tee "$OUT/chain_probe.log"
XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 -m bench.chain_probe --mode time --out "$OUT/chain_probe_nograph.json" 2>&1 | grep "^{" | tee -a "$OUT/chain_probe.log"
timeout 120 "$NCU" --profile-from-start off --clock-control none --csv --metrics gpu__time_duration.sum \
  python3 -m bench.chain_probe --mode profile --out "$OUT/chain_order.json" > "$OUT/chain_kernels.csv" 2> "$OUT/chain_ncu.err"
echo "chain ncu rc=$? lines: $(wc -l < "$OUT/chain_kernels.csv")"
python3 -m bench.ncu_summary "$OUT/chain_kernels.csv" --out "$OUT/chain_kernels.json"
sections=""
for s in ${SECTIONS:-SpeedOfLight LaunchStats}; do sections="$sections --section $s"; done
# shellcheck disable=SC2086
timeout 170 "$NCU" --profile-from-start off --clock-control none --csv --page details $sections \
  python3 -m bench.ncu_gemm --cases "${CASES:-qkv:1024,qkv:2048,down_res:1024,gate_up_silu:1024}" \
  --out "$OUT/ncu_meta.json" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc=$? csv lines: $(wc -l < "$OUT/ncu.csv")"; tail -3 "$OUT/ncu.err"
python3 -m bench.ncu_summary "$OUT/ncu.csv" --order "$OUT/ncu_meta.json" --out "$OUT/ncu_summary.json"
