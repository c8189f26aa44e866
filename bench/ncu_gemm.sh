#!/usr/bin/env bash
# One device call: GPU time of our GEMMs against XLA's dot and cuBLAS on every Llama-3-8B
# shape (bench/ncu_gemm.py under Nsight Compute, then its table in $OUT/ncu_gemm_table.json).
# SECTIONS="SpeedOfLight ..." profiles hardware counters instead (bench/ncu_summary.py reads
# them); PROBE=1 adds bench/chain_probe.py (one GEMM in each device_ms timing mode).
# Usage (device machine): OUT=/some/dir [CASES=op:M,...] [SECTIONS=...] [PROBE=1] bash bench/ncu_gemm.sh
set -u
# No preallocation: ncu saves and restores the memory a kernel may touch on every replay pass.
export PYTHONPATH=. PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" | tee -a "$OUT/nvidia_smi.txt"
cases=${CASES:-}
if [ -n "${SECTIONS:-}" ]; then
  what=""; for s in $SECTIONS; do what="$what --section $s"; done
else
  what="--metrics gpu__time_duration.sum"
fi
# shellcheck disable=SC2086
timeout 420 "$NCU" --profile-from-start off --clock-control none --csv --page details --print-units base $what \
  python3 -m bench.ncu_gemm ${cases:+--cases "$cases"} --out "$OUT/ncu_meta.json" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc=$? csv lines: $(wc -l < "$OUT/ncu.csv")"; tail -3 "$OUT/ncu.err"
if [ -z "${SECTIONS:-}" ]; then
  python3 -m bench.ncu_gemm --report "$OUT/ncu.csv" --meta "$OUT/ncu_meta.json" --out "$OUT/ncu_gemm_table.json"
else
  python3 -m bench.ncu_summary "$OUT/ncu.csv" --out "$OUT/ncu_summary.json"
fi
if [ "${PROBE:-0}" = 1 ]; then
  timeout 150 python3 -m bench.chain_probe --mode time --out "$OUT/chain_probe.json" 2>&1 | grep "^{"
fi
