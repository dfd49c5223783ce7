#!/usr/bin/env bash
# The one prepared GPU run for tritonbn (issues 8 and 9). On a CUDA machine, from any directory:
#
#     GIT_COMMIT=<sha> benchmarks/gpu_check.sh OUTDIR     # e.g. OUTDIR="$OUT" on the device machine
#
# Steps, in this order, each with a hard cap, all under one whole-script DEADLINE (s, default 565, under
# the 10-minute remote-command limit, which excludes the machine's start and the copy back):
#
#   step          budget (s, defaults; typical use)            writes
#   env           ~7-15 (imports torch, triton, torchvision)  OUTDIR/env.txt
#   warm_cache    WARM_TIMEOUT=90 (~20-30 on the H200 machine): compiles the ~890 kernel console only
#                 specializations the steps below launch (the CUDA tests', ResNet-50's, MobileNetV2's, the suite's
#                 shapes) on every CPU core into Triton's cache: serially, at their first launch, they
#                 would take minutes of the budget. Skipped with SMOKE=1
#   cuda_tests    TEST_TIMEOUT=140 (pytest -m cuda, ~125 tests,   OUTDIR/pytest_cuda.log
#                 in TEST_SHARDS=3 processes at once; 92 took
#                 103 s serially on 2026-11-28; --durations lists the slowest). Waits for the native
#                 extension's background build first
#   host_us       HOST_BUDGET=40 (+15 hard; --native: the       OUTDIR/host_us.json
#                 native call path timed next to the Python path and torch)
#   host_overhead 35 (GPU only): where one call's host time    console only
#                 goes: engine, Python node, launcher, launches, each timed on autograd's device thread
#   model         MODEL_BUDGET=220 (+20 hard), at most what    OUTDIR/model.json
#                 leaves 140 s for the rest. ResNet-50 eager+graph b32/b128 (torch, tritonbn, fuse_model;
#                 eager also both on the native call path, --native),
#                 its torch.compile at b128 (torch, then tritonbn; --compile-estimate 70: the job is
#                 started only with >= 80 s of the budget left, each compile in it with >= 70 s),
#                 then mobilenet_v2 eager+graph
#   bench         what is left minus 55 s, at most             OUTDIR/bench.json, bench.md
#                 BENCH_BUDGET=240 (+30 hard: bench's start-up, ~5-10 s, is outside its budget, and the
#                 last shape), of which FUSED_BUDGET=50 is kept for the fused rows
#                 (--quick --cuda-graphs --fused, fused rows on the ResNet-50 shapes). All 192 rows take
#                 ~230 s: on 2026-11-28 its 138 s reached 115 (19 of 30 plain shapes: 4 fp32 ones), so
#                 the time the CUDA tests' shards save goes here first
#   ab            what is left, if >= AB_MIN=105: benchmarks.ab  console only
#                 --preset AB_PRESET (default quick; empty: skip): AB_OVERHEAD=70 for its compiles and
#                 its bench processes' start-up, the rest (>= 35 s: >= 8 s per variant) timing
#   summary       15 (also after host_us, model and bench)     OUTDIR/summary.json
#
# The model step goes before the kernel suite: a torch.compile of ResNet-50 is all or nothing (~1-2 min),
# while the suite stops between shapes and its geomeans cover what it reached.
#
# and the whole console output -> OUTDIR/gpu_check.log. Eight files in one folder, no subfolders (the
# device machine returns at most 8). Installs nothing; runs the tree in place (PYTHONPATH=repo). A step
# that fails or hits its cap does not stop the next ones, and every benchmark writes its JSON as it goes,
# so a stopped step keeps what it measured; summary.json records what is missing and why. Exit status:
# non-zero if any step failed. Tune with DEADLINE, TEST_TIMEOUT, TEST_SHARDS, HOST_BUDGET, MODEL_BUDGET,
# BENCH_BUDGET, FUSED_BUDGET, PYTHON, and extra options per step: HOST_ARGS, MODEL_ARGS (e.g.
# --compile-estimate 90), BENCH_ARGS, AB_PRESET, AB_ARGS, AB_MIN, AB_OVERHEAD, TEST_PATHS (default tests).
# SMOKE=1 runs the same steps on a CPU (Triton interpreter, each benchmark's --smoke mode): the test suite
# does that to check this script end to end.
set -u

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${1:-$("$PY" -m benchmarks.summary --results-dir)}"
mkdir -p "$out" && out="$(cd "$out" && pwd)" || { echo "gpu_check: cannot create $out" >&2; exit 2; }
SMOKE="${SMOKE:-0}"
DEADLINE="${DEADLINE:-565}"
TEST_TIMEOUT="${TEST_TIMEOUT:-140}"
HOST_BUDGET="${HOST_BUDGET:-40}"
MODEL_BUDGET="${MODEL_BUDGET:-220}"
BENCH_BUDGET="${BENCH_BUDGET:-240}"
FUSED_BUDGET="${FUSED_BUDGET:-50}"
SUMMARY_RESERVE=25  # seconds kept back from the last benchmark for the summary and the file listing
if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1  # before triton is imported: CPU tensors take the Triton kernels
    smoke=(--smoke)
    TEST_PATHS="${TEST_PATHS:-tests/test_cuda_graphs.py}"
else
    unset TRITON_INTERPRET  # the interpreter would silently turn every GPU number into a CPU one
    smoke=()
    TEST_PATHS="${TEST_PATHS:-tests}"
fi

exec > >(tee -a "$out/gpu_check.log") 2>&1
tee_pid=$!
t_all=$SECONDS
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
max() { if [ "$1" -gt "$2" ]; then echo "$1"; else echo "$2"; fi; }
left() { echo $((DEADLINE - (SECONDS - t_all))); }  # seconds until the whole-script deadline
declare -a names=() codes=() secs=()
step() {  # step NAME CMD...: run, record status and duration, never abort
    local name="$1" t0=$SECONDS rc
    shift
    echo
    echo "=== [$(date +%H:%M:%S) +$((SECONDS - t_all))s, $(left)s left] $name: $*"
    "$@"
    rc=$?
    names+=("$name") codes+=("$rc") secs+=("$((SECONDS - t0))")
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    return 0
}
summarize() {  # summary.json from whatever pieces exist: cheap (no torch), so after every benchmark
    timeout -k 5 15 "$PY" -m benchmarks.summary "$out" >/dev/null 2>&1 || echo "gpu_check: summary failed"
}

# --- env ------------------------------------------------------------------------------------------------
if [ -z "${GIT_COMMIT:-}" ]; then
    GIT_COMMIT="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
    [ "$GIT_COMMIT" != unknown ] && [ -n "$(git -C "$repo" status --porcelain -- tritonbn benchmarks 2>/dev/null)" ] \
        && GIT_COMMIT="$GIT_COMMIT-dirty"
fi
export GIT_COMMIT
env_report() {
    echo "date:       $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:       $(uname -srm), $(nproc) CPUs"
    echo "commit:     $GIT_COMMIT"
    echo "outdir:     $out"
    echo "deadline:   ${DEADLINE}s; smoke: $SMOKE"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import sys
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
for mod in ("torchvision", "matplotlib", "pytest", "pytest_timeout"):
    try:
        m = __import__(mod)
        print(f"{mod + ':':<11}", getattr(m, "__version__", "?"))
    except Exception as e:
        print(f"{mod + ':':<11}", "missing", type(e).__name__, str(e)[:120])
try:
    import tritonbn
    print("tritonbn:  ", getattr(tritonbn, "__version__", "?"), tritonbn.__file__,
          "fuse_model:", hasattr(tritonbn, "fuse_model"))
except Exception as e:
    print("tritonbn:   IMPORT FAILED", type(e).__name__, e)
EOF
}
env_to_file() {
    env_report 2>&1 | tee "$out/env.txt"
    return "${PIPESTATUS[0]}"
}
step env env_to_file

# --- Triton cache, compiled in parallel ahead of the first launches ------------------------------------
# The native call path's C++ extension (tritonbn.native: its CUDA tests, host_us and model_bench --native) builds meanwhile, in the background:
# ~30-60 s on one core that would otherwise come out of the CUDA tests' cap.
native_pid=
if [ "$SMOKE" != 1 ]; then
    timeout -k 5 150 "$PY" -c "from tritonbn import native; native.module() or print('native:', native.build_error)" \
        >"${TMPDIR:-/tmp}/tritonbn_native_build.log" 2>&1 &
    native_pid=$!
    step warm_cache timeout -k 5 "${WARM_TIMEOUT:-90}" "$PY" -m benchmarks.warm_cache
fi

# --- CUDA tests -----------------------------------------------------------------------------------------
# In TEST_SHARDS pytest processes at once (default 3; one GPU, many cores), each taking every TEST_SHARDS-th
# of the collected CUDA tests: serially they took 103 s for 92 tests (2026-11-28) and there are ~125 now,
# mostly Python, imports and small launches, which overlap. One pytest_cuda.log: each shard's console,
# then one merged summary line (benchmarks.summary --merge-pytest).
run_tests() {
    local extra=() cap rc=0 shards="${TEST_SHARDS:-3}" tmp
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra=(--timeout 60)  # per test, where the plugin exists
    cap=$(max 30 "$(min "$TEST_TIMEOUT" $(($(left) - 330)))")  # leaves the benchmarks >= 5.5 minutes
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/tritonbn_cuda_tests.XXXXXX")"
    # shellcheck disable=SC2086  # TEST_PATHS is a list of paths
    timeout -k 5 90 "$PY" -m pytest -m cuda -q -p no:cacheprovider --collect-only $TEST_PATHS >"$tmp/collect.log" 2>&1
    rc=$?
    local ids=()
    mapfile -t ids < <(grep -E '^[^ ]+::' "$tmp/collect.log")
    if [ "$rc" -ne 0 ] || [ "${#ids[@]}" -eq 0 ]; then
        cp "$tmp/collect.log" "$out/pytest_cuda.log"
        tail -n 25 "$tmp/collect.log"
        rm -rf "$tmp"
        [ "$rc" -eq 5 ] && { echo "pytest: no CUDA-marked tests collected"; return 0; }
        echo "pytest: collecting the CUDA tests failed (exit $rc)"
        return $((rc == 0 ? 1 : rc))
    fi
    [ "$shards" -ge 1 ] 2>/dev/null || shards=1
    [ "$shards" -gt "${#ids[@]}" ] && shards=${#ids[@]}
    echo "pytest: ${#ids[@]} CUDA tests in $shards shards, ${cap}s cap"
    local pids=() i j
    for ((i = 0; i < shards; i++)); do
        local mine=()
        for ((j = i; j < ${#ids[@]}; j += shards)); do mine+=("${ids[$j]}"); done
        timeout -k 10 "$cap" "$PY" -m pytest -m cuda -q -p no:cacheprovider --durations=8 "${extra[@]}" \
            "${mine[@]}" >"$tmp/shard$i.log" 2>&1 &
        pids+=($!)
    done
    local merge=() r
    : >"$out/pytest_cuda.log"
    for ((i = 0; i < shards; i++)); do
        wait "${pids[$i]}"
        r=$?
        [ "$r" -eq 124 ] && echo "pytest shard $((i + 1)): killed after ${cap}s"
        [ "$rc" -eq 0 ] && rc=$r
        merge+=("$tmp/shard$i.log:$r")
        { echo "=== shard $((i + 1)) of $shards (exit $r)"; cat "$tmp/shard$i.log"; echo; } >>"$out/pytest_cuda.log"
    done
    timeout -k 5 30 "$PY" -m benchmarks.summary --merge-pytest "${merge[@]}" | tee -a "$out/pytest_cuda.log"
    grep -E '^(FAILED|ERROR) ' "$out/pytest_cuda.log" | head -n 25
    rm -rf "$tmp"
    return "$rc"
}
if [ -n "$native_pid" ]; then
    wait "$native_pid"; echo "native extension build: exit $? $(tail -c 300 "${TMPDIR:-/tmp}/tritonbn_native_build.log")"
fi
step cuda_tests run_tests

# --- host µs per call -----------------------------------------------------------------------------------
budget=$(max 10 "$(min "$HOST_BUDGET" $(($(left) - 300)))")
# shellcheck disable=SC2086  # HOST_ARGS is a list of options
step host_us timeout -k 10 $((budget + 15)) "$PY" -m benchmarks.host_us "${smoke[@]}" --out "$out" \
    --time-budget "$budget" --native ${HOST_ARGS:-}
summarize

# --- where tritonbn's host time goes (console only): short, and what issue 8's backward work needs next --
if [ "$SMOKE" != 1 ]; then
    step host_overhead timeout -k 5 35 "$PY" -m benchmarks.host_overhead
fi

# --- end-to-end training steps ----------------------------------------------------------------------------
# model_bench starts no job (and no compile) its budget cannot cover; the hard timeout is a backstop
# (SIGTERM makes it write what it has, the variants of an unfinished compile job included).
budget=$(max 60 "$(min "$MODEL_BUDGET" $(($(left) - 140)))")
# shellcheck disable=SC2086  # MODEL_ARGS is a list of options
step model timeout -k 15 $((budget + 20)) "$PY" -m benchmarks.model_bench "${smoke[@]}" --out "$out" \
    --time-budget "$budget" --compile-estimate 70 --native ${MODEL_ARGS:-}
summarize

# --- kernel suite: plain rows, then fused rows (ResNet-50 shapes) -------------------------------------
# bench stops starting new shapes at its budget (counted from the end of its start-up) and writes what it
# has; the hard timeout, 30 s over the budget, covers the start-up and the last shape and is a backstop
# (SIGTERM also makes it write its files before exiting).
budget=$(max 30 "$(min "$BENCH_BUDGET" $(($(left) - SUMMARY_RESERVE - 30)))")
fused=$(min "$FUSED_BUDGET" $((budget / 2)))
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
step bench timeout -k 15 $((budget + 30)) "$PY" -m benchmarks.bench "${smoke[@]}" --quick --cuda-graphs --fused \
    --fused-shapes "$([ "$SMOKE" = 1 ] && echo smoke_2d || echo rn50)" --no-png --out "$out" \
    --time-budget "$budget" --fused-budget "$fused" ${BENCH_ARGS:-}

# --- A/B of launcher tunings in the time left (console only) ----------------------------------------------
# What the steps above leave of the deadline (only when the kernel suite finished early) answers part of
# the open questions (benchmarks/ab.py, AB_PRESET: default "quick", the one-launch forward, the fused
# channels-last backward's half tiles and the bit-by-bit bitmask read on ResNet-50's small layers; empty:
# skip). Its table goes to the console and so to gpu_check.log, no file (the device machine returns 8).
# Its time: AB_OVERHEAD (70 s) for the compiles (--warm-timeout 30) and, per variant, a bench process's
# start-up (imports, CUDA context, copy bandwidth: ~5-10 s, outside bench's --time-budget, whose clock
# starts after it) and last shape (~10 s for each of the quick preset's 4 variants), the rest to timing
# (benchmarks.ab --time-budget, split equally). Started only with AB_MIN (105) s left: >= 35 s of timing,
# >= 8 s per variant, where one shape of each of the quick preset's modes (train_fwd; add_relu_fwd_bwd,
# bench's fused phase) takes ~1-3 s (benchmarks.ab ITEM_S). ab exits 1 when its first variant timed no row.
# Another AB_PRESET (more variants or modes) needs a larger AB_MIN: ab warns when a share is too small.
ab_left=$(($(left) - SUMMARY_RESERVE))
AB_MIN="${AB_MIN:-105}"
AB_OVERHEAD="${AB_OVERHEAD:-70}"
if [ -n "${AB_PRESET-quick}" ] && [ "$ab_left" -ge "$AB_MIN" ]; then
    ab_tmp="$(mktemp -d "${TMPDIR:-/tmp}/tritonbn_ab.XXXXXX")"
    # shellcheck disable=SC2086  # AB_ARGS is a list of options
    step ab timeout -k 10 "$ab_left" "$PY" -m benchmarks.ab "${smoke[@]}" --out "$ab_tmp" \
        --preset "${AB_PRESET-quick}" --warm-timeout 30 --time-budget "$(max 15 $((ab_left - AB_OVERHEAD)))" \
        ${AB_ARGS:-}
    rm -rf "$ab_tmp"
else
    echo "ab: not started (${ab_left}s left, AB_MIN ${AB_MIN}s; AB_PRESET '${AB_PRESET-quick}')"
fi

# --- summary.json ---------------------------------------------------------------------------------------
step summary timeout -k 5 15 "$PY" -m benchmarks.summary "$out"

# --- end: the step table last in the log, where a truncated console still shows it ------------------------
rm -f "$out"/*.tmp  # a write interrupted by a timeout; the previous complete file stands
echo
echo "================ gpu_check ($((SECONDS - t_all))s of ${DEADLINE}s) ================"
grep -E '^(device|torch|triton|commit|tritonbn): ' "$out/env.txt" 2>/dev/null
fail=0
printf '%-14s %-6s %s\n' step exit seconds
for i in "${!names[@]}"; do
    printf '%-14s %-6s %s\n' "${names[$i]}" "${codes[$i]}" "${secs[$i]}"
    [ "${codes[$i]}" -ne 0 ] && fail=1
done
nfiles=$(find "$out" -maxdepth 1 -type f | wc -l)
echo "files in $out ($nfiles): $(cd "$out" && ls | tr '\n' ' ')"
[ "$(find "$out" -mindepth 1 -type d | wc -l)" -eq 0 ] || echo "gpu_check: WARNING: subfolders in $out"
[ "$nfiles" -le 8 ] || echo "gpu_check: WARNING: more than 8 files; the device machine returns only 8"
echo "gpu_check: $([ $fail -eq 0 ] && echo PASSED || echo FAILED)"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null  # let tee finish gpu_check.log before the caller collects OUTDIR
exit $fail
