#!/usr/bin/env bash
# One-command GPU check for tritonbn (issue #4). On a CUDA machine, from any directory:
#
#     benchmarks/gpu_check.sh OUTDIR            # e.g. benchmarks/gpu_check.sh "$OUT"
#
# 1. environment (GPU, driver, python, torch, triton, commit)  -> OUTDIR/env.txt
#    host time per call (benchmarks/host_overhead.py)          -> console / gpu_check.log
# 2. CUDA-marked tests (pytest -m cuda)                         -> OUTDIR/pytest_cuda.log
# 3. benchmark suite, --quick, under a time budget              -> OUTDIR/bench.{json,md,png}
# 4. end-to-end training check                                  -> OUTDIR/train.{json,md}
# and this whole console output                                  -> OUTDIR/gpu_check.log
# Eight files, no subfolders. Installs nothing; runs the tree in place (PYTHONPATH=repo). Every step runs
# even if an earlier one failed; the exit status is non-zero if any step failed. Sized for < 7 minutes on
# an H100. Every step has a hard timeout and the steps share DEADLINE (s, default 540: under a 10-minute
# remote-command limit even when every step runs into its cap). Tune with BENCH_BUDGET (s, default 240),
# TEST_TIMEOUT (s, default 120), TRAIN_TIMEOUT (s, default 120), DEADLINE, PYTHON, and BENCH_ARGS (extra
# bench options, e.g. BENCH_ARGS="--cuda-graphs" for kernel-only replay times).
set -u

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/benchmarks/results/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out" && out="$(cd "$out" && pwd)" || { echo "gpu_check: cannot create $out" >&2; exit 2; }
cd "$repo" || exit 2
PY="${PYTHON:-python3}"
BENCH_BUDGET="${BENCH_BUDGET:-240}"
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-120}"
DEADLINE="${DEADLINE:-540}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the interpreter would silently turn every GPU number into a CPU one

exec > >(tee -a "$out/gpu_check.log") 2>&1
tee_pid=$!
t_all=$SECONDS
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
left() { echo $((DEADLINE - (SECONDS - t_all))); }  # seconds until the whole-script deadline
declare -a names=() codes=() secs=()
step() {  # step NAME CMD...: run, record status and duration, never abort
    local name="$1" t0=$SECONDS rc
    shift
    echo
    echo "=== [$(date +%H:%M:%S)] $name: $*"
    "$@"
    rc=$?
    names+=("$name") codes+=("$rc") secs+=("$((SECONDS - t0))")
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    return 0
}

# --- 1. environment -----------------------------------------------------------------------------------
if [ -z "${GIT_COMMIT:-}" ]; then
    GIT_COMMIT="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
    [ "$GIT_COMMIT" != unknown ] && [ -n "$(git -C "$repo" status --porcelain -- tritonbn benchmarks 2>/dev/null)" ] \
        && GIT_COMMIT="$GIT_COMMIT-dirty"
fi
export GIT_COMMIT
env_report() {
    echo "date:       $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:       $(uname -srm)"
    echo "commit:     $GIT_COMMIT"
    echo "outdir:     $out"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import platform, sys
print("python:    ", sys.version.split()[0], sys.executable)
import torch
print("torch:     ", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda ok:   ", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:    ", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB", f"L2 {getattr(p, 'L2_cache_size', 0) / 1e6:.0f} MB")
import triton
print("triton:    ", triton.__version__)
for mod in ("matplotlib", "pytest", "pytest_timeout"):
    try:
        m = __import__(mod)
        print(f"{mod + ':':<11}", getattr(m, "__version__", "?"))
    except Exception as e:
        print(f"{mod + ':':<11}", "missing", type(e).__name__)
try:
    import tritonbn
    print("tritonbn:  ", getattr(tritonbn, "__version__", "?"), tritonbn.__file__)
except Exception as e:
    print("tritonbn:   IMPORT FAILED", type(e).__name__, e)
EOF
}
env_to_file() {
    env_report 2>&1 | tee "$out/env.txt"
    return "${PIPESTATUS[0]}"
}
step env env_to_file

# --- 1b. host time per call: tritonbn's Python vs one Triton launch vs the whole module call ---------
step host_overhead timeout -k 5 60 "$PY" -m benchmarks.host_overhead

# --- 2. CUDA tests --------------------------------------------------------------------------------------
run_tests() {
    local extra=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra=(--timeout 60)  # per test, where the plugin exists
    local cap
    cap=$(min "$TEST_TIMEOUT" $(($(left) - TRAIN_TIMEOUT - 120)))  # leave the bench at least 2 minutes
    [ "$cap" -lt 30 ] && cap=30
    timeout -k 10 "$cap" "$PY" -m pytest -m cuda -q -p no:cacheprovider "${extra[@]}" tests \
        >"$out/pytest_cuda.log" 2>&1
    local rc=$?
    tail -n 25 "$out/pytest_cuda.log"
    [ "$rc" -eq 124 ] && echo "pytest: killed after ${cap}s"
    [ "$rc" -eq 5 ] && { echo "pytest: no CUDA-marked tests collected"; return 0; }
    return "$rc"
}
step cuda_tests run_tests

# --- 3. benchmark ---------------------------------------------------------------------------------------
# bench stops starting new shapes at BENCH_BUDGET and writes what it has; the hard timeout is a backstop
# (SIGTERM also makes it write its files before exiting).
budget=$(min "$BENCH_BUDGET" $(($(left) - TRAIN_TIMEOUT - 60)))
[ "$budget" -lt 60 ] && budget=60
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
step bench timeout -k 15 "$((budget + 40))" "$PY" -m benchmarks.bench --quick --out "$out" --time-budget "$budget" \
    ${BENCH_ARGS:-}

# --- 4. training check ----------------------------------------------------------------------------------
step train_check timeout -k 10 "$(min "$TRAIN_TIMEOUT" $(($(left) - 10)))" "$PY" -m benchmarks.train_check --out "$out"

# --- summary (last in the log, where a truncated console still shows it) -----------------------------
echo
echo "================ gpu_check summary ($((SECONDS - t_all))s total) ================"
grep -E '^(device|torch|triton|commit): ' "$out/env.txt" 2>/dev/null
if [ -f "$out/bench.md" ]; then
    sed -n '/^Status:/p;/^Copy bandwidth/p' "$out/bench.md"
    sed -n '/^## Summary/,/^## /p' "$out/bench.md" | sed '$d' | grep -E '^\|' | grep -v '^|---'
fi
[ -f "$out/train.md" ] && grep -E '^\| (config|fp32|bf16)' "$out/train.md"
fail=0
printf '%-12s %-6s %s\n' step exit seconds
for i in "${!names[@]}"; do
    printf '%-12s %-6s %s\n' "${names[$i]}" "${codes[$i]}" "${secs[$i]}"
    [ "${codes[$i]}" -ne 0 ] && fail=1
done
echo "files in $out: $(cd "$out" && ls | tr '\n' ' ')"
echo "gpu_check: $([ $fail -eq 0 ] && echo PASSED || echo FAILED)"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null  # let tee finish gpu_check.log before the caller collects OUTDIR
exit $fail
