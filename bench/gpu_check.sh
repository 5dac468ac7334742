#!/usr/bin/env bash
# The one prepared GPU script: versions, CUDA-extension build, GPU tests, compute-sanitizer
# memcheck, kernel benchmarks, end-to-end benchmark, report. Run from anywhere:
#
#     OUT=/some/dir bash bench/gpu_check.sh
#
# Every stage runs under `timeout`, sized from one global deadline (BUDGET_S, default 385 s) so a
# hang or a slow stage cannot eat the budget of the stages after it. The benchmark scripts also
# get a soft --time-budget a little under their timeout, and rewrite their JSON after every row,
# so a stage cut short still leaves its results. Files written (6, at most 2 directories deep):
#
#   $OUT/log.txt                          everything (stage headers, versions, bench output, summary)
#   $OUT/pytest.txt                       pytest output
#   $OUT/sanitizer.txt                    compute-sanitizer memcheck (every backend), racecheck + synccheck (cuda)
#   $OUT/report.md                        markdown tables (bench/report.py)
#   $OUT/bench/results/<card>-<date>.json every row + card, driver, versions, copy bandwidth
#   $OUT/bench/results/<card>-<date>.png  per-layer time vs N plot
#
# Knobs (environment): BUDGET_S, QUICK=1 (quick kernel + e2e sweeps), PYTEST_ARGS (default
# "tests/ -x -q"), KERNEL_ARGS / E2E_ARGS (extra flags appended, e.g. E2E_ARGS="--layers 8"),
# SKIP="build pytest sanitize kernels topics scope fold filter e2e" (any subset), PYTHON (default python3).
# On a machine without nvidia-smi it runs the same stages on CPU at tiny sizes (for debugging).

set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
OUT="${OUT:-/tmp/lag_gpu_check}"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-385}"
QUICK="${QUICK:-0}"
SKIP="${SKIP:-}"
PYTEST_ARGS="${PYTEST_ARGS:-tests/ -x -q}"
mkdir -p "$OUT/bench/results"
LOG="$OUT/log.txt"
: > "$LOG"
T0=$(date +%s)
SUMMARY=""
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }
now() { echo $(( $(date +%s) - T0 )); }

# stage NAME CAP RESERVE CMD...: run CMD (output appended to $LOG) under a timeout of
# min(CAP, time left - RESERVE), RESERVE being what the later stages need at least.
stage() {
    local name=$1 cap=$2 reserve=$3; shift 3
    local left=$(( BUDGET_S - $(now) - reserve ))
    local t=$(( cap < left ? cap : left ))
    if [[ " $SKIP " == *" $name "* ]]; then
        say "=== [$name] skipped (SKIP)"; SUMMARY+="$name: skipped (SKIP)\n"; return 0
    fi
    if (( t < 10 )); then
        say "=== [$name] skipped: only ${t}s left in the ${BUDGET_S}s budget"
        SUMMARY+="$name: skipped (budget)\n"; FAILED=1; return 0
    fi
    export STAGE_T=$t
    say "=== [$name] start at $(now)s, timeout ${t}s: $*"
    local s=$(date +%s)
    timeout -k 5 "$t" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    local d=$(( $(date +%s) - s ))
    [[ $rc == 124 || $rc == 137 ]] && say "=== [$name] TIMED OUT after ${d}s" || say "=== [$name] rc=$rc in ${d}s"
    SUMMARY+="$name: rc=$rc ${d}s (timeout ${t}s)\n"
    (( rc != 0 )) && FAILED=1
    return 0
}

# ---- versions -----------------------------------------------------------------------------------
GPU=0
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi > /dev/null 2>&1; then GPU=1; fi
say "=== lag_triton gpu_check.sh  $(date -Is)  budget ${BUDGET_S}s  quick=$QUICK  gpu=$GPU  out=$OUT"
say "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
if (( GPU )); then
    timeout 15 nvidia-smi 2>&1 | tee -a "$LOG" > /dev/null
    CARD=$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
else
    CARD=cpu
fi
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG" > /dev/null
import importlib, platform, shutil, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
for m in ("triton", "transformers", "peft", "numpy", "matplotlib", "safetensors"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "MISSING", e)
print("nvcc", shutil.which("nvcc"), "| ninja", shutil.which("ninja"), "| compute-sanitizer", shutil.which("compute-sanitizer"))
EOF
SLUG=$(echo "$CARD" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
RESULTS="$OUT/bench/results/${SLUG:-unknown}-$(date +%F).json"
say "results: $RESULTS"

# ---- CUDA extension build (JIT, cached for every later stage) -----------------------------------
if (( GPU )); then
    stage build 110 283 "$PY" -c "
import time; t = time.time()
from lag_triton.kernels.cuda import extension_unavailable_reason
print('cuda extension:', extension_unavailable_reason() or 'ok', f'({time.time() - t:.1f}s)')"
fi

# ---- GPU tests ------------------------------------------------------------------------------------
# shellcheck disable=SC2086
stage pytest 75 243 bash -c "$PY -m pytest $PYTEST_ARGS > '$OUT/pytest.txt' 2>&1; rc=\$?; tail -n 25 '$OUT/pytest.txt'; exit \$rc"

# ---- compute-sanitizer over one small run of each kernel -----------------------------------------
SAN=$(command -v compute-sanitizer || true)
[[ -z "$SAN" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SAN=/usr/local/cuda/bin/compute-sanitizer
if (( GPU )) && [[ -n "$SAN" ]]; then
    # memcheck over every backend; racecheck (shared-memory hazards) and synccheck (barriers not reached
    # by the whole block) over the CUDA kernels, whose shared memory is ours (Triton's is the compiler's)
    stage sanitize 80 238 bash -c "'$SAN' --tool memcheck --error-exitcode 1 --print-limit 20 $PY bench/sanitize_kernels.py --dtypes bf16 > '$OUT/sanitizer.txt' 2>&1; rc=\$?; for tool in racecheck synccheck; do echo \"=== \$tool (cuda)\" >> '$OUT/sanitizer.txt'; '$SAN' --tool \$tool --error-exitcode 1 --print-limit 20 $PY bench/sanitize_kernels.py --backends cuda --dtypes bf16 >> '$OUT/sanitizer.txt' 2>&1 || rc=1; done; grep -E '^=== |sanitize|ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race|hazard|error' '$OUT/sanitizer.txt' | tail -n 40; exit \$rc"
else
    say "=== [sanitize] compute-sanitizer not found or no GPU: running bench/sanitize_kernels.py --small without it"
    stage sanitize 45 238 bash -c "$PY bench/sanitize_kernels.py --small > '$OUT/sanitizer.txt' 2>&1; rc=\$?; cat '$OUT/sanitizer.txt'; exit \$rc"
fi

# ---- kernel tables ---------------------------------------------------------------------------------
KQ=""; EQ=""
(( QUICK )) && { KQ="--quick"; EQ="--quick"; }
export PY KQ EQ RESULTS KERNEL_ARGS="${KERNEL_ARGS:-}" E2E_ARGS="${E2E_ARGS:-}"
# shellcheck disable=SC2016
stage kernels 90 188 bash -c '"$PY" bench/bench_kernels.py $KQ --out "$RESULTS" --time-budget $(( STAGE_T - 15 )) $KERNEL_ARGS'
# prefill whose routing concentrates on a few adapters (a prompt about 4 documents): what grouping tokens by adapter buys
TOPIC_SWEEP="--n 1000,100000 --t 2048 --shapes 3072:8192"
(( GPU )) || TOPIC_SWEEP="--n 64 --t 80 --shapes 64:128"
export TOPIC_SWEEP
# shellcheck disable=SC2016
# (no plain-compile: a cold compile outlasts this stage's timeout; the kernels stage has its rows)
stage topics 30 160 bash -c '"$PY" bench/bench_kernels.py --ops layer,lora_apply $TOPIC_SWEEP --prompt-topics 4 --backends plain,torch,triton,cuda --out "$RESULTS" --time-budget $(( STAGE_T - 8 ))'

# the cost of a scope (each batch row restricted to a quarter of the adapters) on the same shapes
SCOPE_SWEEP="--n 1000,100000 --t 1,2048 --shapes 3072:8192"
(( GPU )) || SCOPE_SWEEP="--n 64 --t 1,80 --shapes 64:128"
export SCOPE_SWEEP
# shellcheck disable=SC2016
stage scope 25 135 bash -c '"$PY" bench/bench_kernels.py --ops layer,arrow_topk $SCOPE_SWEEP --scope-fraction 0.25 --backends plain,triton,cuda --out "$RESULTS" --time-budget $(( STAGE_T - 8 ))'

# split reductions folded into their launch and the one-launch Arrow (LAG_TRITON_FOLD_SPLITS, opt-in until
# this measures it) on the decode cells; the triton rows of the same cells come from the kernels stage
FOLD_SWEEP="--n 1000,10000,100000 --t 1,32 --shapes 3072:8192"
(( GPU )) || FOLD_SWEEP="--n 64 --t 1 --shapes 64:128"
export FOLD_SWEEP
# shellcheck disable=SC2016
stage fold 30 105 bash -c '"$PY" bench/bench_kernels.py --ops layer,arrow_topk,spectr_rerank $FOLD_SWEEP --backends triton-fold --out "$RESULTS" --time-budget $(( STAGE_T - 6 ))'

# the filtering GEMM (LAG_TRITON_FILTER_GEMM, opt-in until this measures it: the [T, N] scores never
# written) on the prefill cells of large libraries, against the triton rows of the kernels stage
FILTER_SWEEP="--n 10000,100000 --t 2048 --shapes 3072:8192"
(( GPU )) || FILTER_SWEEP="--n 300 --t 5 --shapes 64:128"
export FILTER_SWEEP
# shellcheck disable=SC2016
stage filter 40 65 bash -c '"$PY" bench/bench_kernels.py --ops arrow_topk $FILTER_SWEEP --backends triton-filter --out "$RESULTS" --time-budget $(( STAGE_T - 6 ))'

# ---- end to end -------------------------------------------------------------------------------------
# shellcheck disable=SC2016
stage e2e 90 8 bash -c '"$PY" bench/bench_e2e.py $EQ --out "$RESULTS" --time-budget $(( STAGE_T - 25 )) $E2E_ARGS'

# ---- report -------------------------------------------------------------------------------------------
if [[ -f "$RESULTS" ]]; then
    timeout 30 "$PY" bench/report.py "$RESULTS" --md "$OUT/report.md" --png "${RESULTS%.json}.png" 2>&1 | tee -a "$LOG"
    [[ -f "$OUT/report.md" ]] && tee -a "$LOG" < "$OUT/report.md"
fi

say "=== summary (total $(now)s of ${BUDGET_S}s)"
say "$(printf "$SUMMARY")"
exit $FAILED
