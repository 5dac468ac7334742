#!/usr/bin/env bash
# What the session's one GPU call runs (writes under $OUT): the CUDA extension builds in the
# background while the GPU test files run in parallel workers (Triton compilation is CPU-bound),
# then bench/gpu_check.sh runs the sanitizer, kernel tables, end-to-end benchmark and report;
# bench/profile_layer.py splits one layer's time into kernels and bench/probe_topk.py times one
# top-k merge step by tile shape. It writes 7 files (the device tool returns at most 8): log.txt,
# pytest.txt (with the extension build line), sanitizer.txt, probes.txt (profile + top-k probe),
# report.md and bench/results/<card>-<date>.{json,png}; with TUNE_S > 0 also tuned.json (an 8th).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT="${OUT:-/tmp/lag_gpu_run}"
mkdir -p "$OUT"
# One deadline for the whole run (the device tool's call limit is 600 s): each step's timeout is its cap,
# cut to what the deadline leaves after the steps behind it are given their reserve.
DEADLINE_S="${DEADLINE_S:-560}"
T0=$(date +%s)
# left CAP RESERVE: min(CAP, seconds to the deadline - RESERVE), at least 1
left() { local t=$(( DEADLINE_S - ($(date +%s) - T0) - $2 )); (( t > $1 )) && t=$1; echo $(( t > 1 ? t : 1 )); }
timeout -k 5 "$(left "${BUILD_S:-400}" 150)" python3 -c "import time; t=time.time(); from lag_triton.kernels.cuda import extension_unavailable_reason as r; print('cuda extension:', r() or 'ok', f'{time.time()-t:.0f}s')" > "$OUT/build.log" 2>&1 &
# parallel workers where pytest-xdist is installed (the GPU machine's image has it; the test extra does not)
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-12}")
LAG_FUZZ_EXAMPLES="${LAG_FUZZ_EXAMPLES:-5}" timeout -k 5 "$(left "${PYTEST_S:-150}" 400)" python3 -m pytest tests/test_kernels.py tests/test_arrow_filter.py tests/test_cuda_backend.py \
    tests/test_backends_model.py tests/test_compile.py tests/test_scopes.py tests/test_op_checks.py \
    tests/test_ops_fuzz.py tests/test_large_offsets.py tests/test_patch_safety.py::test_patched_on_cpu_then_moved_to_the_gpu_routes_with_the_gpu_backend $XDIST -q -rfE --tb=short -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest.txt"
tail -n 30 "$OUT/pytest.txt"
wait  # the extension build (its own timeout above)
cat "$OUT/build.log" | tee -a "$OUT/pytest.txt"
rm -f "$OUT/build.log"
SKIP="build pytest ${SKIP:-}" BUDGET_S="$(left "${BENCH_S:-350}" 80)" OUT="$OUT" bash bench/gpu_check.sh
# per-kernel device time vs host time of one layer (what limits the per-layer figures); the folded
# variant at decode, where it takes a launch off the Arrow select and the rerank
timeout -k 5 "$(left "${PROFILE_S:-30}" 50)" python3 bench/profile_layer.py --n 1000,10000 --t 1,32,2048 > "$OUT/probes.txt" 2>&1
timeout -k 5 "$(left "${FOLD_PROFILE_S:-25}" 30)" python3 bench/profile_layer.py --backends triton-fold --n 1000,100000 --t 1,32 >> "$OUT/probes.txt" 2>&1
# cost of one running top-k merge step by tile shape (what the Arrow kernel repeats per tile / merge chunk);
# its rows go into the results JSON, or into $OUT when the benchmarks wrote none
RESULTS=$(ls "$OUT"/bench/results/*.json 2>/dev/null | head -1)
timeout -k 5 "$(left "${PROBE_S:-30}" 15)" python3 bench/probe_topk.py --out "${RESULTS:-$OUT/probe_topk.json}" >> "$OUT/probes.txt" 2>&1
[[ -n "$RESULTS" ]] && timeout -k 2 "$(left 20 0)" python3 bench/report.py "$RESULTS" --md "$OUT/report.md" > /dev/null 2>&1
# optional (TUNE_S > 0): a per-GPU launch table for the Triton kernels, the 8th file (lag_triton/kernels/triton/tuned/);
# the deadline does not cover it: DEADLINE_S + TUNE_S must stay under the call's limit
if (( ${TUNE_S:-0} > 10 )); then
    timeout -k 5 "$TUNE_S" python3 bench/tune_kernels.py --time-budget $(( TUNE_S - 10 )) --out "$OUT/tuned.json" >> "$OUT/probes.txt" 2>&1
fi
echo "gpu_run: $(( $(date +%s) - T0 ))s of the ${DEADLINE_S}s deadline"
