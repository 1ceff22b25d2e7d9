#!/usr/bin/env bash
# GPU offload checked and measured in one device call (well inside its 10 minutes).
#
#   scripts/device/device-check.sh            on the device: results under $OUT
#   DRY=1 scripts/device/device-check.sh      here: the CPU parts with the installed llama_cpp and
#                                             small sizes (a few minutes), results in .device/dry-check
#
# Needs (prepared here, carried with the call): .device/llama_cpp_python-0.3.36-slim.tar.gz
# (scripts/device/slim_sdist.sh) and .device/wheels/ (scripts/device/prep_wheels.sh).
#
# Stages, each under its own time limit; none starts after DEADLINE seconds (default 540),
# so the call ends with whatever was measured:
#   build    llama-cpp-python from the slim sdist with -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90,
#            16-way parallel, timed (skipped when /tmp/site already has a CUDA build: a rerun on
#            a warm machine; the CMake build folder .device/build is kept between calls too)
#   install  mtpcode without dependencies over the device's packages (with the C trunk capture)
#   diagnose (only when STAGES names it) the commands that crashed on the first GPU run, under
#            variants, and the first crash under cuda-gdb
#   tests    the runtime's greedy-equality tests with every layer offloaded
#            (MTPCODE_TEST_GPU_LAYERS=-1; the tests must read that variable)
#   capture  the trunk rows copied out of device tensors vs the CPU's (python -m mtpcode.bench.gpu capture)
#   engine   the built-in model on the GPU: plain vs heads, tokens/s, greedy identity (mtpcode.bench.gpu engine)
#   bench    `mtpcode bench --gpu-layers -1` with the built-in model (when bench has --gpu-layers)
#   costs    the cost table on the GPU: built-in model and the 7B shape in Q4_K_M and Q8_0
#   fa-off   the same with flash attention off (the default with offload decided from both)
#   cpu      the same cost table on the device's 16 CPU cores
#   cpu-full `mtpcode bench --synthetic 7b` on 16 cores at full depth, if time is left
#
# $OUT receives check.log (everything printed), stages.json (per stage: exit status and
# seconds; the build's time; the slim source's size) and one JSON per measuring stage.
#
# A failed stage does not stop the later ones (except build and install, which they all
# need); the script ends by naming every stage that failed or did not run for lack of time,
# and exits 1 if there was any (0 only when every stage passed).
#
# Settings (environment): DEADLINE (seconds, default 540); STAGES, the measuring stages to
# run (default all: "tests capture engine costs fa-off bench cpu cpu-full"; build and install
# always run); GPU_BUSY_FILE, a file that exists while something else uses the GPU (the
# training run of device-round.sh): the timing stages (engine onwards) wait until it is
# gone, or until 120 s before DEADLINE, and the log says when they ran beside it;
# COST_QUANTS, the 7B shape's types in the cost stages (default Q4_K_M,Q8_0; empty: the
# built-in model only); PREBUILT, llama_cpp built with CUDA off the device (default:
# .device/llama_cpp-cuda-sm90.tar.xz when carried), unpacked instead of building.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
DRY="${DRY:-0}"
if [ "$DRY" = 1 ]; then
    OUT="${OUT:-$ROOT/.device/dry-check}"
    SITE="${SITE:-/tmp/mtpcode-dry-site}"
    GPU_LAYERS=0
    THREADS=2
else
    : "${OUT:?OUT is not set: run this through the device tool, or set DRY=1}"
    SITE=/tmp/site
    GPU_LAYERS=-1
    THREADS=16
fi
DEADLINE="${DEADLINE:-540}"
STAGES="${STAGES:-tests capture engine costs fa-off bench cpu cpu-full}"
GPU_BUSY_FILE="${GPU_BUSY_FILE:-}"
SLIM="$ROOT/.device/llama_cpp_python-0.3.36-slim.tar.gz"
mkdir -p "$OUT" "$SITE"
LOG="$OUT/check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
export ROOT DRY OUT SITE GPU_LAYERS THREADS SLIM PY
T0=$(date +%s)
STAGES_LOG=/tmp/mtpcode-stages.jsonl
: >"$STAGES_LOG"
FAILED=()  # "stage (why)" for every stage that failed or was not run
elapsed() { echo $(($(date +%s) - T0)); }
stamp() { echo "[$(elapsed) s] $*"; }

write_stages() {
    "$PY" - "$STAGES_LOG" "$OUT/stages.json" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
json.dump({"stages": rows}, open(sys.argv[2], "w"), indent=1)
EOF
}

# stage NAME LIMIT_S 'COMMAND': run it (a command line; the functions below are exported) under
# min(LIMIT_S, time left), record exit status and seconds
stage() {
    local name="$1" limit="$2" cmd="$3"
    case " build install $STAGES " in
        *" $name "*) ;;
        *) stamp "not selected: $name (STAGES=$STAGES)"
           echo "{\"stage\": \"$name\", \"skipped\": \"not selected\"}" >>"$STAGES_LOG"; write_stages; return 0 ;;
    esac
    local left=$((DEADLINE - $(elapsed)))
    if [ "$left" -lt 20 ]; then
        stamp "SKIPPED $name: out of time ($left s left of $DEADLINE)"
        echo "{\"stage\": \"$name\", \"skipped\": \"out of time\"}" >>"$STAGES_LOG"
        write_stages
        FAILED+=("$name (not run: out of time)")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    stamp "=== $name (limit $limit s)"
    local t=$(date +%s)
    timeout -k 10 "$limit" bash -c "$cmd"
    local rc=$?
    local dt=$(($(date +%s) - t))
    [ $rc = 124 ] && stamp "$name: TIMED OUT after $limit s"
    stamp "=== $name: exit $rc, $dt s"
    echo "{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $dt, \"limit\": $limit}" >>"$STAGES_LOG"
    write_stages
    [ $rc = 0 ] || FAILED+=("$name (exit $rc$([ $rc = 124 ] && echo ', timed out'))")
    return $rc
}

stamp "device-check: DRY=$DRY, repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u)"
if [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
fi
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) CPUs; $(free -g | awk '/Mem:/ {print $2 " GiB"}')"
[ -f "$SLIM" ] && echo "slim sdist: $(stat -c %s "$SLIM") bytes"

# --- wheels and the llama-cpp-python build (device only)
if [ "$DRY" != 1 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .device/wheels/*.whl || { stamp "installing the carried wheels failed"; exit 1; }
fi
export PYTHONPATH="$SITE"
has_cuda_build() {
    (cd /tmp && "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)") 2>/dev/null
}
build_llama() {
    local nvcc
    nvcc="$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null | head -1)"
    [ -n "$nvcc" ] || { echo "no nvcc found"; return 1; }
    export CUDACXX="$nvcc" PATH="$(dirname "$nvcc"):$PATH"
    "$nvcc" --version | tail -2
    cmake --version | head -1
    # LLAVA_BUILD=OFF: libmtmd (multimodal) is not used by mtpcode and would only lengthen the build
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 \
        "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
        --config-settings=build-dir="$ROOT/.device/build" -v "$SLIM" >/tmp/llama-build.log 2>&1
    local rc=$?
    tail -40 /tmp/llama-build.log
    grep -c "nvcc" /tmp/llama-build.log | sed 's/^/nvcc command lines in the build log: /'
    return $rc
}
# llama_cpp built with CUDA off the device (scripts/device/build_cuda_lib.sh) and carried:
# unpacked into $SITE instead of building, when it loads here; else the build runs as usual.
PREBUILT="${PREBUILT:-$(ls "$ROOT"/.device/llama_cpp-cuda-sm90.tar.xz 2>/dev/null)}"
unpack_prebuilt() {
    tar xJf "$PREBUILT" -C "$SITE" || return 1
    (cd /tmp && "$PY" -c "import llama_cpp; print('carried build: llama_cpp', llama_cpp.__version__, 'GPU offload',
        bool(llama_cpp.llama_supports_gpu_offload()))")
}
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export -f has_cuda_build build_llama
if [ "$DRY" != 1 ]; then
    if has_cuda_build; then
        stamp "llama-cpp-python with CUDA already in $SITE: build skipped"
        echo '{"stage": "build", "skipped": "already built"}' >>"$STAGES_LOG"
    elif [ -n "$PREBUILT" ] && unpack_prebuilt && has_cuda_build; then
        stamp "llama-cpp-python with CUDA from the carried $(basename "$PREBUILT"): build skipped"
        echo '{"stage": "build", "skipped": "carried build"}' >>"$STAGES_LOG"
    else
        [ -z "$PREBUILT" ] || stamp "the carried $(basename "$PREBUILT") does not load here: building"
        stage build 480 build_llama || {
            stamp "device-check FAILED: build (see the log above); no later stage can run"; write_stages; exit 1; }
    fi
    has_cuda_build || { stamp "llama_cpp does not report GPU offload after the build"; exit 1; }
fi

# --- mtpcode over what the machine has (builds mtpcode/_capture.c)
install_mtpcode() {
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" "$ROOT"
    (cd /tmp && "$PY" - <<'EOF'
import llama_cpp, mtpcode, mtpcode.llama as L
print(f"mtpcode from {mtpcode.__file__}; llama_cpp {llama_cpp.__version__} from {llama_cpp.__file__}")
print(f"GPU offload: {bool(llama_cpp.llama_supports_gpu_offload())}; C trunk capture: {L.native_capture_available()}")
print(llama_cpp.llama_print_system_info().decode(errors="replace").strip())
EOF
    )
}
export -f install_mtpcode
stage install 120 install_mtpcode || { stamp "device-check FAILED: install; no later stage can run"; exit 1; }

# --- the runtime's greedy-equality tests with every layer offloaded
run_tests() {
    if ! grep -rqs --include='*.py' MTPCODE_TEST_GPU_LAYERS "$ROOT/tests"; then
        echo "tests/ do not read MTPCODE_TEST_GPU_LAYERS: these tests would run on the CPU only (see docs/gpu.md)"
        [ "$DRY" = 1 ] || return 3
    fi
    local select="greedy or exact or fewer_heads or accepting"
    [ "$DRY" = 1 ] && select="greedy_speculative_equals_plain and F32-True"
    # from /tmp, so that the installed mtpcode (with its C capture) is imported, not the source tree
    (cd /tmp && MTPCODE_TEST_GPU_LAYERS="$GPU_LAYERS" "$PY" -m pytest "$ROOT/tests/integration/test_runtime.py" \
        -p no:cacheprovider -q -rfE -k "$select")
}
export -f run_tests

# --- diagnose (selected by STAGES only): the commands that crashed with SIGSEGV on the first
# GPU run, each plain and under variants that tell GPU from build from process; a crash is
# run again under cuda-gdb for the native backtrace
diagnose() {
    local gdb t="$ROOT/tests/integration/test_runtime.py"
    gdb="$(command -v cuda-gdb || ls /usr/local/cuda/bin/cuda-gdb 2>/dev/null | head -1)"
    local -a names=(test-gpu test-gpu-nographs test-cpu test-novisible bench-gpu bench-cpu complete-gpu engine-gpu
                    engine-gpu-torch)
    local load="from mtpcode.runtime import Engine; from mtpcode.models import builtin_model_path as b;"
    load+=" e = Engine(b(), n_gpu_layers=-1, n_ctx=256); print(e.n_vocab); e.close()"
    local -a cmds=(
        "MTPCODE_TEST_GPU_LAYERS=-1 $PY -m pytest $t -p no:cacheprovider -q -x -k 'greedy_speculative_equals_plain and F32-False-auto'"
        "GGML_CUDA_DISABLE_GRAPHS=1 MTPCODE_TEST_GPU_LAYERS=-1 $PY -m pytest $t -p no:cacheprovider -q -x -k 'greedy_speculative_equals_plain and F32-False-auto'"
        "MTPCODE_TEST_GPU_LAYERS=0 $PY -m pytest $t -p no:cacheprovider -q -x -k 'greedy_speculative_equals_plain and F32-False-auto'"
        "CUDA_VISIBLE_DEVICES= MTPCODE_TEST_GPU_LAYERS=0 $PY -m pytest $t -p no:cacheprovider -q -x -k 'greedy_speculative_equals_plain and F32-False-auto'"
        "$PY -m mtpcode bench --gpu-layers -1 --n-prompts 1 -n 8 --repeat 1 --no-costs"
        "$PY -m mtpcode bench --gpu-layers 0 --n-prompts 1 -n 8 --repeat 1 --no-costs"
        "printf 'def fib(n):\\n' | $PY -m mtpcode complete --gpu-layers -1 -n 16"
        "$PY -c '$load'"
        "$PY -c 'import torch; $load'"
    )
    local i rc crashed=""
    cd /tmp
    : >/tmp/diag-results
    for i in "${!names[@]}"; do
        timeout -k 5 40 env PYTHONFAULTHANDLER=1 bash -c "${cmds[$i]}" >/tmp/diag-$i.log 2>&1
        rc=$?
        echo "diagnose ${names[$i]}: exit $rc"
        echo "${names[$i]} $rc" >>/tmp/diag-results
        [ $rc = 0 ] || tail -25 /tmp/diag-$i.log
        if [ $rc = 139 ] && [ -z "$crashed" ]; then crashed=$i; fi
    done
    if [ -n "$crashed" ] && [ -n "$gdb" ]; then
        echo "=== ${names[$crashed]} under cuda-gdb"
        # bash execs env, env execs python: gdb follows both execs into the crashing process
        timeout -k 5 120 "$gdb" -q -batch -ex "set pagination off" -ex run -ex "bt 40" -ex "info sharedlibrary" \
            --args bash -c "exec env ${cmds[$crashed]}" 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -120
    fi
}
export -f diagnose
stage diagnose 240 diagnose
# CUDA graphs off made the crashing test pass: the later stages run that way (and the log says so)
if grep -qx "test-gpu 139" /tmp/diag-results 2>/dev/null && grep -qx "test-gpu-nographs 0" /tmp/diag-results; then
    export GGML_CUDA_DISABLE_GRAPHS=1
    stamp "GGML_CUDA_DISABLE_GRAPHS=1 for the later stages (the diagnose stage's workaround)"
fi
stage tests 150 run_tests

GC=("$PY" -m mtpcode.bench.gpu)
if [ "$DRY" = 1 ]; then
    ENGINE_ARGS=(--n-prompts 2 --max-tokens 24 --repeat 1)
    COST_ARGS=(--shape tiny --quant Q8_0)
else
    ENGINE_ARGS=(--n-prompts 8 --max-tokens 128 --repeat 3)
    COST_ARGS=(--shape 7b "--quant=${COST_QUANTS-Q4_K_M,Q8_0}")  # COST_QUANTS= (empty): the built-in model only
fi
stage capture 60 "cd /tmp && ${GC[*]} capture --out '$OUT/capture.json' --gpu-layers $GPU_LAYERS"

# The timing stages need the GPU to themselves: wait while GPU_BUSY_FILE exists (see above).
wait_for_gpu() {
    [ -n "$GPU_BUSY_FILE" ] || return 0
    local t=$(date +%s)
    while [ -e "$GPU_BUSY_FILE" ] && [ $(elapsed) -lt $((DEADLINE - 120)) ]; do sleep 2; done
    if [ -e "$GPU_BUSY_FILE" ]; then
        stamp "the GPU is still busy ($GPU_BUSY_FILE) after $(($(date +%s) - t)) s: the timing stages run beside it"
    else
        stamp "waited $(($(date +%s) - t)) s for the GPU ($GPU_BUSY_FILE gone)"
    fi
}
wait_for_gpu
stage engine 150 "cd /tmp && ${GC[*]} engine --out '$OUT/engine_gpu.json' --gpu-layers $GPU_LAYERS ${ENGINE_ARGS[*]}"
stage costs 150 "cd /tmp && ${GC[*]} costs --out '$OUT/costs_gpu.json' --gpu-layers $GPU_LAYERS --threads 1 ${COST_ARGS[*]}"
# flash attention off, for the offload default to be decided from figures (the synthetic bundles are cached)
stage fa-off 120 "cd /tmp && ${GC[*]} costs --out '$OUT/costs_gpu_fa_off.json' --gpu-layers $GPU_LAYERS --threads 1 \
    --flash-attn off ${COST_ARGS[*]}"

run_bench() {
    if ! (cd /tmp && "$PY" -m mtpcode bench --help | grep -q -- "--gpu-layers"); then
        echo "mtpcode bench has no --gpu-layers yet: skipped (the engine stage measured the built-in model)"
        return 3
    fi
    local args=(--gpu-layers "$GPU_LAYERS" --json "$OUT/bench_builtin_gpu.json")
    [ "$DRY" = 1 ] && args+=(--n-prompts 2 -n 24 --repeat 1 --no-costs)
    # flash attention on: the GPU setting (the CPU default is off, see docs/gpu.md)
    (cd /tmp && MTPCODE_FLASH_ATTN=1 "$PY" -m mtpcode bench "${args[@]}")
}
export -f run_bench
stage bench 150 run_bench

# GGML_OP_OFFLOAD_MIN_BATCH: a CUDA build sends matrix products of host weights to the GPU from
# 32 rows up; far above any batch here, the CPU table is the CPU's alone
stage cpu 150 "cd /tmp && GGML_OP_OFFLOAD_MIN_BATCH=1000000 ${GC[*]} costs --out '$OUT/costs_cpu.json' --gpu-layers 0 --threads $THREADS ${COST_ARGS[*]}"
if [ "$DRY" != 1 ] && [ $((DEADLINE - $(elapsed))) -gt 150 ]; then
    stage cpu-full $((DEADLINE - $(elapsed) - 10)) "cd /tmp && GGML_OP_OFFLOAD_MIN_BATCH=1000000 $PY -m mtpcode bench --synthetic 7b \
        --quant Q4_K_M,Q8_0 --threads $THREADS --buffers off --no-repack --json '$OUT/bench_synthetic_cpu.json'"
fi

write_stages
report_costs() {
    "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for st in json.loads((out / "stages.json").read_text())["stages"]:
    print(f"{st['stage']:9s} " + (f"skipped ({st['skipped']})" if "skipped" in st else f"exit {st['exit']} in {st['seconds']} s"))
for name in ("costs_gpu.json", "costs_gpu_fa_off.json", "costs_cpu.json"):
    p = out / name
    if p.exists():
        d = json.loads(p.read_text())
        where = ("GPU" + ("" if d.get("flash_attn", True) else " FA off")) if d["gpu_layers"] else f"CPU {d['threads']} threads"
        for label, c in [("built-in", d["builtin"])] + [(f"{d['shape']} {q}", r["scaled"] | {"projection": r["projection"]})
                                                        for q, r in d["synthetic"].items()]:
            rel = " ".join(f"{v:.2f}" for v in c["verify_rel"].values())
            pj = c["projection"]["at_n"]
            print(f"{where:14s} {label:12s} 1 row {1e3 * float(c['verify_s']['1']):7.2f} ms | rows 1..8 / 1 row: {rel} "
                  f"| head {c['head_rel']:.3f} | projected {pj['speedup']:.2f}x")
EOF
}
report_costs || FAILED+=("summary (exit $?)")
n_files=$(find "$OUT" -type f | wc -l)
stamp "done: \$OUT holds $n_files files ($(du -sh "$OUT" | cut -f1))"
if [ ${#FAILED[@]} -gt 0 ]; then
    stamp "device-check FAILED: ${#FAILED[@]} stage(s): $(printf '%s; ' "${FAILED[@]}" | sed 's/; $//')"
    exit 1
fi
stamp "device-check passed: every stage exited 0"
