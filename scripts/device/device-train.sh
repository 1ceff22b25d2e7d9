#!/usr/bin/env bash
# Train the built-in model's successor on the GPU machine, in one device call.
#
#   scripts/device/device-train.sh              on the device: results under $OUT
#   DRY=1 scripts/device/device-train.sh        here: the same steps on the CPU with a tiny shape
#                                               (a minute or two), results under $OUT or .device/dry-train
#
# Steps: install the carried wheels (prompt-toolkit is a held-out package), build the
# package corpus (converters.corpus: named installed packages, versions and licenses
# recorded, click/prompt_toolkit/pygments held out), train the SentencePiece tokenizer
# on it, train the MTP model for TRAIN_SECONDS of measured steps (converters.train
# --time-budget), evaluate every head on each held-out package, simulate greedy
# self-speculative decoding on held-out prompts, and pack the bf16 checkpoint into
# parts that fit $OUT's limits (8 files of 16 MiB, 64 MiB in all).
#
# What comes back: train.log (everything printed), summary.json, model.tar.sha256
# and model.tar.part-0, -1, ... Join them here with scripts/device/unpack_train.sh.
#
# Settings (environment): TRAIN_SECONDS (training loop budget, default 270 on the
# GPU), SEED, and SHAPE_ARGS to replace the shape flags.
#
# Steps (environment, train, pack, summary) run even after one fails, so that what exists
# comes back (a failed training still packs its log); the script ends by naming every step
# that failed and exits 1 if there was any (0 only when every step passed).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
DRY="${DRY:-0}"
if [ "$DRY" = 1 ]; then
    OUT="${OUT:-$ROOT/.device/dry-train}"
else
    : "${OUT:?OUT is not set: run this through the device tool, or set DRY=1}"
fi
WORK="${WORK:-/tmp/mtp-train}"
SEED="${SEED:-0}"
SITE="${SITE:-/tmp/site}"  # where the carried wheels go
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/run"
LOG="$OUT/train.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0)) s] $*"; }
FAILED=()  # "step (exit N)" for every step that failed

# step NAME COMMAND...: run it, record a failure, go on
step() {
    local name="$1"
    shift
    stamp "=== $name"
    "$@"
    local rc=$?
    stamp "=== $name: exit $rc"
    [ $rc = 0 ] || FAILED+=("$name (exit $rc)")
    return $rc
}

stamp "device-train: DRY=$DRY, repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u)"
if [ "$DRY" != 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
    if ls .device/wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .device/wheels/*.whl || { echo "device-train: installing the wheels failed"; exit 1; }
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
check_environment() {
    "$PY" - <<'EOF'
import platform, torch, numpy, sentencepiece
print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"sentencepiece {sentencepiece.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
EOF
}
step environment check_environment

if [ "$DRY" = 1 ]; then
    TRAIN_SECONDS="${TRAIN_SECONDS:-40}"
    DEFAULT_SHAPE="--dim 64 --n-layers 5 --n-heads 4 --n-kv-heads 2 --vocab-size 512 --multiple-of 64
        --seq-len 128 --batch-size 8"
    # one thread: on a shared 2-core machine a second torch thread mostly waits
    RUN_ARGS=(--device cpu --threads 1 --packages python,six,attrs,packaging,urllib3,requests --warmup 30
              --eval-batches 4 --spec-prompts 6 --spec-tokens 32)
else
    TRAIN_SECONDS="${TRAIN_SECONDS:-270}"
    # 28.3M parameters: 12 trunk blocks + 4 head blocks of 1.57M, embedding and output of
    # 4096 x 384. Measured here on a random-init checkpoint: bf16 consolidated.pth 56.7 MB
    # (fits $OUT in 4 parts), Q8_0 bundle 33.9 MB (main.gguf 24.0 MB, each head 3.3 MB).
    DEFAULT_SHAPE="--dim 384 --n-layers 16 --n-heads 6 --n-kv-heads 2 --vocab-size 4096 --multiple-of 256
        --seq-len 1024 --batch-size 64"
    RUN_ARGS=(--device cuda --threads 16 --warmup 100 --tokenizer-mb 24 --eval-batches 16 --spec-prompts 48
              --spec-tokens 96)
fi
read -r -a SHAPE <<<"$(echo ${SHAPE_ARGS:-$DEFAULT_SHAPE})"

train() {
    echo "train: ${SHAPE[*]}, budget ${TRAIN_SECONDS} s"
    "$PY" -m converters.train --out "$WORK/run" --work-dir "$WORK/cache" --corpus packages \
        "${SHAPE[@]}" "${RUN_ARGS[@]}" --lr 3e-3 --min-lr 3e-4 --seed "$SEED" \
        --time-budget "$TRAIN_SECONDS" --eval-every 400 --log-every 25 --ckpt-every 1000000 \
        --ckpt-dtype bfloat16
}
step train train

# Pack: one tar of the checkpoint and its records (those there are), split into parts under 16 MiB.
pack() {
    local files=() missing=() f
    rm -f "$OUT"/model.tar.part-* "$OUT/model.tar.sha256" "$OUT/summary.json"  # no stale parts of an earlier run
    for f in consolidated.pth params.json tokenizer.model summary.json train_log.jsonl corpus.json; do
        if [ -f "$WORK/run/$f" ]; then files+=("$f"); else missing+=("$f"); fi
    done
    [ ${#files[@]} -gt 0 ] || { echo "nothing to pack in $WORK/run"; return 1; }
    tar cf "$WORK/model.tar" -C "$WORK/run" "${files[@]}" || return 1
    (cd "$WORK" && sha256sum model.tar) >"$OUT/model.tar.sha256" || return 1
    split -b 15M -d -a 1 "$WORK/model.tar" "$OUT/model.tar.part-" || return 1
    [ ! -f "$WORK/run/summary.json" ] || cp "$WORK/run/summary.json" "$OUT/summary.json"
    local n_files total
    n_files=$(find "$OUT" -type f | wc -l)
    total=$(du -cb "$OUT"/* | tail -1 | cut -f1)
    echo "packed: $(ls "$OUT" | tr '\n' ' ')"
    echo "\$OUT holds $n_files files, $total bytes (limits: 8 files, 16 MiB each, 67108864 bytes in all)"
    if [ "$n_files" -gt 8 ] || [ "$total" -gt 67108864 ]; then
        echo "\$OUT is over its limits: some files will not come back"
        return 1
    fi
    [ ${#missing[@]} = 0 ] || { echo "not packed (missing): ${missing[*]}"; return 1; }
}
step pack pack

summarize() {
    "$PY" - "$WORK/run/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"steps {s['steps']}, {s['tokens_seen'] / 1e6:.1f}M tokens, {s['train_seconds']} s, {s['n_params'] / 1e6:.2f}M params")
if "time_budget" in s:
    print(f"measured {s['time_budget']['tokens_per_s']:,.0f} tokens/s over the calibration steps")
for name, r in s.get("heldout_by_package", {}).items():
    print(f"{name:16s} top-1 " + " / ".join(f"{x:.1%}" for x in r["top1"]) + "   loss " + " / ".join(f"{x:.2f}" for x in r["loss"]))
if "speculative" in s:
    sp = s["speculative"]
    print(f"simulated greedy speculation: {sp['tokens_per_forward']:.2f} tokens per main forward "
          f"({sp['prompts']} held-out prompts, median {sp['per_prompt_median']:.2f})")
EOF
}
step summary summarize

if [ ${#FAILED[@]} -gt 0 ]; then
    stamp "device-train FAILED: ${#FAILED[@]} step(s): $(printf '%s; ' "${FAILED[@]}" | sed 's/; $//')"
    exit 1
fi
stamp "device-train passed: every step exited 0"
