#!/usr/bin/env bash
# Named benchmark recipes for one GPU machine; results and logs go to $OUT.
#
# Usage: OUT=/some/dir bash bench/gpu_session.sh RECIPE [RECIPE ...]
#   tests       the GPU-marked tests (tests/test_gpu.py), then the pipeline tests on the GPU
#               (two real streams), then the auto-search's profiling tests -> gpu_tests.log
#   pipelines   one mixed batch's iteration time in each pipeline mode, Llama-3-8B shapes
#               (bench.pipelines) at each batch size of TOKENS (default "2048"; e.g. "768 2048");
#               PROGRAMS='A|B;A|B' adds nanoflow runs on those SM budgets
#                                                                        -> pipelines_llama3_8b_t<T>.{json,png}
#   throughput  engine throughput, Llama-3-8B shapes, random bf16 weights, Pallas kernels
#               (the workload of bench/RESULTS.md)                      -> throughput_llama3_8b_pallas.json
#   floor       the engine-floor workloads (Llama-3-8B shapes, random bf16, 256 seqs, 2048 tokens):
#               512 x (1024 in, 512 out) with two traced windows of 12 steps (pure decode and mixed):
#               device idle between iterations and each operation against its floor (bench.iteration)
#               with a cold persistent compilation cache; then 16 requests on the warm cache (start-up
#               and first token, warm); then 512 x (512 in, 1024 out). KV_PAGES (default 26000) fits an H100
#               -> throughput_llama3_8b_{1024_512,warm_start,512_1024}.json, *_iteration.png, window traces
#   fp8         the KV cache in fp8 against bf16 on the floor workload (512 x 1024 in / 512 out, 2048 tokens):
#               bf16 with KV_PAGES pages and 256 seqs, fp8 with twice the pages (the same bytes) and 512
#               seqs, then fp8 with 256 seqs (FP8_SEQS, default "512 256"); BF16_SEQS (default "256") adds
#               bf16 runs at more seqs with pages to match (BF16_SEQS="256 512" where memory allows, an H200);
#               FLOOR_WINDOWS (e.g. "300:12,580:12") traces those steps of each run, per operation
#                          -> throughput_llama3_8b_1024_512_{bf16,bf16_512seqs,fp8_512seqs,fp8}.json
#   offload     the KV offload's cost on that workload, which never reuses a page (every finished request's
#               pages go to an LRU of OFFLOAD_GB, default 24, of host memory): through the staging ring
#               (copies inside the steps) and the direct gather before the step, against the bf16 run
#               (fp8's, when run after it in the same call); OFFLOAD_PATHS, default "ring direct"
#                                        -> throughput_llama3_8b_1024_512_{offload_ring,offload_direct}.json
#   kernels     the kernel table: decode attention, memory-bound and prefill sections, then the
#               Mosaic GEMMs at M = 256..2048 against the library, judged by bench.targets;
#               RUNS=N (default 1) repeats it N times and also judges the medians
#                                                                        -> kernels_{memory,gemm}[_rK].json
#   tune        the GEMM configuration search at M = 256, 512 (weights rotated past L2), then
#               engine throughput with its winners through $NANOFLOW_GEMM_TABLE
#                                                                        -> gemm_tune.json, gemm_table.json
#   ab          the A/B of bench.gemm_tune's CANDIDATES on one CUPTI timeline, then the GEMM
#               table with its winners                                   -> gemm_ab.json, gemm_ab_table.json
#   tp_tests    (4 GPUs) the tensor-parallel tests of tests/parallel/host_devices on the GPUs
#                                                                        -> tp_tests.log
#   tp          Llama-3-8B throughput (the `throughput` workload) at TP = each of TP_SIZES
#               (default "1 2 4", those the machine has GPUs for), pipeline TP_PIPELINE
#               (default sequential)                                     -> throughput_llama3_8b_tp<N>_<pipeline>.json
#   tp70b       (4 GPUs) Llama-2-70B, random bf16, TP=4, 256 x (1024 in, 512 out), pipeline
#               TP_PIPELINE                                              -> throughput_llama2_70b_tp4_<pipeline>.json
#   The tp recipes set NCCL_NVLS_ENABLE=0. One command may run 10 minutes: give tp one size
#   or one pipeline at a time (TP_SIZES=2 TP_PIPELINE=nanoflow ...).
#   fused       the horizontal-fusion mechanism (bench.overlap --mechanisms fused): per stage, a Triton GEMM
#               (1024 x 4096 -> 28,672) and decode attention (256 x 1,280 keys) back to back against one launch
#               whose programs split between them, at several splits (FUSED_SPLITS); the pair's capped
#               kernels alone; FUSED_S (s, default 400) caps it
#                                                                        -> overlap_fused.json
#   profile     the model-based auto-search's measurements for Llama-3-8B shapes: every kernel's time
#               against tokens and SM budget, the interference of overlapped pairs, and the predicted
#               choice (nanoflow_jax.autosearch --search --verify 0); cut off by its time limit, it
#               resumes from pipelines/*.profile.partial.json when run again
#                                                                        -> pipelines/*.{profile,interference}.json
#   search      the full auto-search from profile's files (measuring what is missing): the two-stage
#               search, its 3 best nanoflow budgets timed with every mode, the choice written (copy it
#               to configs/pipelines/)                                  -> pipelines/<shape>-<gpu>.json, search.log
#   serving     the offline engine throughput (bench.throughput), then the HTTP server on the same
#               workload and settings: bench.serving at saturation (rate inf, with the ratio to the
#               offline tokens/s), then a sweep at 1/4, 1/2 and 3/4 of the saturated request rate
#               (TTFT p99 at half load); then saturation again with --stream-interval 2, and with the
#               engine on a thread of the server (--no-engine-process)
#                                        -> throughput_llama3_8b_serving_offline.json, serving_llama3_8b_sweep.png,
#                                           serving_llama3_8b_{saturation,sweep,saturation_interval2,saturation_thread}.json
#   rollouts    RL rollouts, Llama-3-8B shapes, random weights: 256 prompts x n=8 x 512 tokens as
#               grouped requests vs 2,048 separate ones, and update_params (bench.rollouts)
#                                                                        -> rollouts_llama3_8b.json
#   multiround  32 conversations x 3 rounds of LMSYS-like turns, 8 at once, Llama-3-8B shapes, a KV
#               pool smaller than all conversations: prefill tokens, tokens/s and TTFT without the
#               prefix cache, with it, and with host + disk offload; the offload overhead on
#               single-round work; host and disk bandwidth. MR_CONVERSATIONS, MR_ROUNDS, MR_REPEATS
#               (single-round runs each side) and MR_TIMEOUT (s) shrink it to a short call
#                                                                        -> multiround_llama3_8b.json
# CALL_S=N: the call's own limit (seconds). Every step's timeout is cut to what is left of it,
# and a step with under 30 s left is skipped, so recipes chained in one call stop in time and
# return what they measured.
# Example: OUT=$OUT CALL_S=590 bash bench/gpu_session.sh fused fp8 multiround
set -u
: "${OUT:?set OUT to the results directory}"
[ $# -gt 0 ] || { sed -n '2,/^# Example/p' "$0"; exit 2; }
call_end=$(( $(date +%s) + ${CALL_S:-100000} - 10 ))
timeout() {  # timeout SECONDS COMMAND...: the coreutils one, capped by CALL_S
  local want=$1 left=$(( call_end - $(date +%s) ))
  shift
  if (( left < 30 )); then echo "skipped, the call's time is spent: $*" | cut -c1-160 | tee -a "$OUT/skipped.log" >&2; return 124; fi
  command timeout "$(( want < left ? want : left ))" "$@"
}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NANOFLOW_TEST_GPU=1 PIP_NO_INDEX=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
gpus=$(nvidia-smi -L | wc -l)
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on the lent machines

throughput() {  # $1: result name; the rest: extra bench.throughput flags
  local name=$1; shift
  timeout 240 python3 -m bench.throughput --model llama-3-8b --weights random --dtype bfloat16 \
    --num-prompts 128 --input-len 512 --output-len 256 --max-num-seqs 128 --max-num-batched-tokens 2048 \
    --token-buckets 128,2048 --num-kv-pages 16384 "$@" \
    --out "$OUT/throughput_llama3_8b_${name}.json" 2>&1 | grep -v "^WARNING" | tail -6 | tee -a "$OUT/throughput.log"
}

floor() {  # the issue workloads of the engine floor; extra arguments go to every run
  local common=(--model llama-3-8b --weights random --dtype bfloat16 --kernels pallas --max-num-seqs 256
                --max-num-batched-tokens 2048 --num-kv-pages "${KV_PAGES:-26000}" --compilation-cache-dir /tmp/nf_cache)
  rm -rf /tmp/nf_cache
  timeout 330 python3 -m bench.throughput "${common[@]}" --num-prompts 512 --input-len 1024 --output-len 512 \
    --max-model-len 1536 --profile-steps "${WINDOWS:-300:12,580:12}" --profile-dir "$OUT" "$@" \
    --out "$OUT/throughput_llama3_8b_1024_512.json" 2>&1 | grep -v "^WARNING" | tail -4 | tee -a "$OUT/floor.log"
  timeout 150 python3 -m bench.throughput "${common[@]}" --num-prompts 16 --input-len 1024 --output-len 16 \
    --max-model-len 1536 "$@" --out "$OUT/throughput_llama3_8b_warm_start.json" 2>&1 | tail -2 | tee -a "$OUT/floor.log"
  [ -n "${FLOOR_SHORT:-}" ] ||   # FLOOR_SHORT=1: without the 512/1024 run
  timeout 240 python3 -m bench.throughput "${common[@]}" --num-prompts 512 --input-len 512 --output-len 1024 \
    --max-model-len 1536 "$@" --out "$OUT/throughput_llama3_8b_512_1024.json" 2>&1 | tail -2 | tee -a "$OUT/floor.log"
  python3 - "$OUT" <<'PY' | tee -a "$OUT/floor.log"
import json, sys
for name in ("1024_512", "warm_start", "512_1024"):
    try:
        r = json.load(open(f"{sys.argv[1]}/throughput_llama3_8b_{name}.json"))
    except (OSError, ValueError) as e:
        print(name, "missing:", e); continue
    print(name, f"{r['total_tokens_per_s']:.0f} tok/s", f"{100 * r.get('fraction_of_optimal', 0):.1f}% of optimal",
          f"{r['ms_per_iteration']:.1f} ms/it", f"startup {r['startup_s']:.1f} s", f"first token {r['first_token_s']} s",
          "idle", r["device_idle"].get("share"), "floor", r.get("floor"))
PY
}

gemm_table() {  # $1: result name; the GEMM section alone (Mosaic, M = 256..2048)
  timeout 360 python3 -m bench.kernels --sections gemm --gemm-backends mosaic --gemm-ms 256,512,1024,2048 \
    --budget-s 330 --out "$OUT/kernels_$1.json" >> "$OUT/kernels.log" 2>&1
}

kernels() {
  local runs=() sfx
  for r in $(seq 1 "${RUNS:-1}"); do
    sfx=$([ "${RUNS:-1}" = 1 ] || echo "_r$r")
    # The short sections first, so a GEMM table cut by its budget loses none of them.
    timeout 150 python3 -m bench.kernels --sections decode_attention,memory_bound,prefill_attention \
      --budget-s 130 --out "$OUT/kernels_memory$sfx.json" >> "$OUT/kernels.log" 2>&1
    gemm_table "gemm$sfx"
    runs+=(--run "$OUT/kernels_gemm$sfx.json,$OUT/kernels_memory$sfx.json")
  done
  grep "^\[" "$OUT/kernels.log"
  [ "${RUNS:-1}" = 1 ] || python3 -m bench.targets "${runs[@]}"
}

autosearch() {  # the model-based auto-search; its files go to $OUT/pipelines
  mkdir -p "$OUT/pipelines"
  timeout 590 python3 -m nanoflow_jax.autosearch --model llama-3-8b --search --out-dir "$OUT/pipelines" "$@" 2>&1 \
    | grep -v "^WARNING" | tail -25 | tee -a "$OUT/search.log"
}

server_up() {  # $1: log name; the rest: extra server flags. Starts the server, waits for /health; sets $server_pid
  python3 -m nanoflow_jax.serve --model llama-3-8b --weights random --dtype bfloat16 --kernels pallas \
    --max-num-seqs 128 --max-num-batched-tokens 2048 --token-buckets 128,2048 --num-kv-pages 16384 \
    --max-model-len 768 --port 8000 --log-level warning "${@:2}" > "$OUT/$1.log" 2>&1 &
  server_pid=$!
  python3 -c "
import sys, time, httpx
for _ in range(300):
    try:
        if httpx.get('http://127.0.0.1:8000/health', timeout=2).status_code == 200: sys.exit(0)
    except httpx.HTTPError: pass
    time.sleep(1)
sys.exit('serving: the server did not come up; see $1.log')" || { kill "$server_pid"; return 1; }
}

server_down() {
  kill -TERM "$server_pid"; wait "$server_pid"; echo "server exit code $?" | tee -a "$OUT/serving.log"
}

serving() {  # one workload (512 requests of 512 + 256 tokens) offline, then online over HTTP
  python3 -c "import fastapi, uvicorn, pydantic, prometheus_client, httpx" 2> /dev/null || {
    echo "serving: the serve extra is not installed: carry its wheels (fastapi, starlette, uvicorn, httptools, pydantic, opentelemetry-api, annotated-doc," \
      "pydantic-core, annotated-types, typing-inspection) in .whl and pip install them first" | tee -a "$OUT/serving.log"
    return 1; }
  local work=(--input-len 512 --output-len 256) rates
  throughput serving_offline --kernels pallas --num-prompts 512 "${work[@]}" --max-model-len 768
  saturate() {  # $1: result name
    timeout 150 python3 -m bench.serving --port 8000 --num-prompts 512 "${work[@]}" --request-rate inf \
      --offline-json "$OUT/throughput_llama3_8b_serving_offline.json" \
      --out "$OUT/$1.json" 2>&1 | grep "^rate" | tee -a "$OUT/serving.log"
  }
  server_up serve || return 1
  saturate serving_llama3_8b_saturation
  rates=$(python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['runs'][0]['request_throughput']
print(','.join(f'{f * r:.3f}' for f in (0.25, 0.5, 0.75)))" "$OUT/serving_llama3_8b_saturation.json") &&
  timeout 200 python3 -m bench.serving --port 8000 --num-prompts 256 "${work[@]}" --request-rate "$rates" \
    --goodput ttft:500 tpot:50 --out "$OUT/serving_llama3_8b_sweep.json" \
    --plot "$OUT/serving_llama3_8b_sweep.png" 2>&1 | grep "^rate" | tee -a "$OUT/serving.log"
  server_down
  # Streams updated every second token: fewer updates, less host time a token, the same tokens.
  server_up serve_interval2 --stream-interval 2 || return 1
  saturate serving_llama3_8b_saturation_interval2
  server_down
  # The engine on a thread of the server process (one GIL for the HTTP work and the engine's).
  server_up serve_thread --no-engine-process || return 1
  saturate serving_llama3_8b_saturation_thread
  server_down
}

# One run of the floor workload (512 x 1024 in / 512 out, 2048 tokens): NAME PAGES SEQS KV_DTYPE [FLAGS...]
floor_run() {
  local name=$1 n=$2 seqs=$3 dtype=$4
  shift 4
  [ -f "$OUT/throughput_llama3_8b_1024_512_$name.json" ] && return   # already run in this call
  [ -n "${FLOOR_WINDOWS:-}" ] && mkdir -p "$OUT/$name"
  timeout 200 python3 -m bench.throughput --model llama-3-8b --weights random --dtype bfloat16 --kernels pallas \
    --max-num-seqs "$seqs" --max-num-batched-tokens 2048 --num-kv-pages "$n" --kv-cache-dtype "$dtype" \
    --num-prompts 512 --input-len 1024 --output-len 512 --max-model-len 1536 \
    ${FLOOR_WINDOWS:+--profile-steps "$FLOOR_WINDOWS" --profile-dir "$OUT/$name"} "$@" \
    --out "$OUT/throughput_llama3_8b_1024_512_$name.json" 2>&1 | grep -v "^WARNING" | tail -2 | tee -a "$OUT/floor_runs.log"
}

for recipe in "$@"; do
  case "$recipe" in
    tests)
      timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
      timeout 200 python3 -m pytest -q tests/models/test_nanobatch.py tests/models/test_streams.py \
        tests/engine/test_pipelines.py 2>&1 | tail -8 | tee -a "$OUT/gpu_tests.log"
      timeout 300 python3 -m pytest -q -m gpu tests/search 2>&1 | tail -8 | tee -a "$OUT/gpu_tests.log" ;;
    pipelines)
      progs=(); IFS=';' read -ra specs <<< "${PROGRAMS:-}"
      for s in "${specs[@]}"; do [ -n "$s" ] && progs+=(--programs "$s"); done
      for t in ${TOKENS:-2048}; do
        timeout 280 python3 -m bench.pipelines "${progs[@]}" --tokens "$t" --out "$OUT/pipelines_llama3_8b_t$t.json" \
          --plot "$OUT/pipelines_llama3_8b_t$t.png" 2>&1 | grep -v "^WARNING" | tail -1 | tee -a "$OUT/pipelines.log"
      done ;;
    throughput)
      throughput pallas --kernels pallas ;;
    floor)
      floor ;;
    kernels)
      kernels ;;
    tune)
      timeout 260 python3 -m bench.gemm_tune --ms 256,512 --budget-s 230 --out "$OUT/gemm_tune.json" \
        --table-out "$OUT/gemm_table.json" 2>&1 | grep "^M=" | tee "$OUT/gemm_tune.log"
      [ -f "$OUT/gemm_table.json" ] && NANOFLOW_GEMM_TABLE="$OUT/gemm_table.json" throughput pallas_gemm_table --kernels pallas ;;
    tp_tests)
      [ "$gpus" -ge 4 ] || { echo "tp_tests needs 4 GPUs, this machine has $gpus" >&2; continue; }
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/parallel/host_devices -m "not slow" 2>&1 \
        | tail -8 | tee "$OUT/tp_tests.log" ;;
    tp)
      for n in ${TP_SIZES:-1 2 4}; do
        [ "$n" -le "$gpus" ] || continue
        throughput "tp${n}_${TP_PIPELINE:-sequential}" --kernels pallas --tensor-parallel-size "$n" \
          --pipeline "${TP_PIPELINE:-sequential}"
      done ;;
    tp70b)
      [ "$gpus" -ge 4 ] || { echo "tp70b needs 4 GPUs, this machine has $gpus" >&2; continue; }
      timeout 580 python3 -m bench.throughput --model llama-2-70b --weights random --dtype bfloat16 \
        --tensor-parallel-size 4 --input-len 1024 --output-len 512 --num-prompts 256 --max-num-seqs 256 \
        --max-num-batched-tokens 2048 --token-buckets 256,2048 --kernels pallas --pipeline "${TP_PIPELINE:-sequential}" \
        --out "$OUT/throughput_llama2_70b_tp4_${TP_PIPELINE:-sequential}.json" 2>&1 | grep -v "^WARNING" | tail -8 \
        | tee -a "$OUT/throughput.log" ;;
    ab)
      timeout 300 python3 -m bench.gemm_tune --ab --out "$OUT/gemm_ab.json" --table-out "$OUT/gemm_ab_table.json" 2>&1 \
        | grep -v "^WARNING\|UserWarning\|_warn_once" | tail -8 | tee "$OUT/gemm_ab.log"
      [ -f "$OUT/gemm_ab_table.json" ] && NANOFLOW_GEMM_TABLE="$OUT/gemm_ab_table.json" gemm_table gemm_ab \
        && grep "^\[" "$OUT/kernels.log" ;;
    multiround)
      timeout "${MR_TIMEOUT:-580}" python3 -m bench.multiround --model llama-3-8b --weights random --dtype bfloat16 \
        --num-conversations "${MR_CONVERSATIONS:-32}" --rounds "${MR_ROUNDS:-3}" --repeats "${MR_REPEATS:-2}" \
        --concurrency 8 --max-output-len 256 --max-num-seqs 64 \
        --max-num-batched-tokens 2048 --token-buckets 64,2048 --num-kv-pages 768 --kv-offload-host-gb 16 \
        --kv-offload-disk-path "$OUT/kv_disk" --kv-offload-disk-gb 32 --bandwidth-pages 256 \
        --out "$OUT/multiround_llama3_8b.json" 2>&1 | grep -v "^WARNING" | tail -8 | tee "$OUT/multiround.log"
      rm -rf "$OUT/kv_disk" ;;
    profile)
      autosearch --interference measure --verify 0 ;;
    search)
      prof=$(ls "$OUT"/pipelines/*.profile.json 2>/dev/null | head -1)
      inter=$(ls "$OUT"/pipelines/*.interference.json 2>/dev/null | head -1)
      autosearch ${prof:+--profile "$prof"} --interference "${inter:-measure}" --verify 3 ;;
    serving)
      serving ;;
    fp8)
      pages=${KV_PAGES:-26000}
      for seqs in ${BF16_SEQS:-256}; do
        floor_run "bf16$([ "$seqs" = 256 ] || echo "_${seqs}seqs")" $((pages * seqs / 256)) "$seqs" auto
      done
      for seqs in ${FP8_SEQS:-512 256}; do
        floor_run "fp8$([ "$seqs" = 256 ] || echo "_${seqs}seqs")" $((2 * pages)) "$seqs" fp8
      done ;;
    offload)
      pages=${KV_PAGES:-26000}
      floor_run bf16 "$pages" 256 auto
      for path in ${OFFLOAD_PATHS:-ring direct}; do
        floor_run "offload_$path" "$pages" 256 auto --kv-offload-host-gb "${OFFLOAD_GB:-24}" \
          $([ "$path" = direct ] && echo --kv-offload-pages-per-step 0)
      done ;;
    fused)
      timeout "${FUSED_S:-400}" python3 -m bench.overlap --mechanisms fused --layers 8 --no-trace \
        --splits "${FUSED_SPLITS:-100/32,108/24,88/44,100/32x2,116/16x2,all}" --out "$OUT/overlap_fused.json" 2>&1 \
        | grep '^{' | tee "$OUT/overlap_fused.log" ;;
    rollouts)
      timeout 560 python3 -m bench.rollouts --out "$OUT/rollouts_llama3_8b.json" 2>&1 | grep -v "^WARNING" \
        | grep -E '"(output_tokens_per_s|speedup_grouped_over_separate|same_tokens|median_s|first_s|elapsed_s)"' \
        | tee "$OUT/rollouts.log" ;;
    *)
      echo "unknown recipe '$recipe': use tests, pipelines, throughput, fp8, offload, kernels, tune, ab, fused, profile, search, serving, rollouts, multiround, tp_tests, tp or tp70b" >&2; exit 2 ;;
  esac
done
