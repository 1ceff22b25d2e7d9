#!/usr/bin/env bash
# Both GPU jobs in one device call: the training run (device-train.sh) uses the GPU while the
# 16 CPU cores build llama.cpp with CUDA (device-check.sh's build stage); the check's timing
# stages wait until the training is done, so neither measures beside the other.
#
#   scripts/device/device-round.sh            on the device: results under $OUT
#   DRY=1 scripts/device/device-round.sh      here: both dry runs side by side, results in .device/dry-round
#
# $OUT returns at most 8 files, so what comes back is:
#   model.tar.part-0 ... and model.tar.sha256   the trained checkpoint (scripts/device/unpack_train.sh)
#   results.tar.gz                              check/ (check.log, stages.json, one JSON per stage) and
#                                               train/ (train.log, summary.json)
#   round.log                                   this script's own lines and both scripts' exit statuses
#
# Settings (environment): DEADLINE for the check (default 540 s; training counts inside it),
# TRAIN_SECONDS for the training loop (default 200 s here; device-train.sh's own default is 270),
# STAGES for the check (device-check.sh), SKIP_TRAIN=1 for the check alone (a rerun on a warm machine),
# TRAIN_WAIT_UNTIL (default 570 s from the start): the latest moment to wait for the training.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
DRY="${DRY:-0}"
if [ "$DRY" = 1 ]; then
    OUT="${OUT:-$ROOT/.device/dry-round}"
else
    : "${OUT:?OUT is not set: run this through the device tool, or set DRY=1}"
fi
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/mtpcode-round.XXXXXX)"
mkdir -p "$WORK/check" "$WORK/train"
LOG="$OUT/round.log"
: >"$LOG"
T0=$(date +%s)
say() { echo "[round $(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }
BUSY="$WORK/training.running"
say "device-round: DRY=$DRY, repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u)"

TRAIN_PID=""
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
    touch "$BUSY"
    (
        # its own site folder: the check installs the same wheels into /tmp/site at the same time
        if [ "$DRY" != 1 ]; then export TRAIN_SECONDS="${TRAIN_SECONDS:-200}"; fi
        OUT="$WORK/train" SITE=/tmp/site-train \
            bash scripts/device/device-train.sh >"$WORK/train/stdout.log" 2>&1
        echo $? >"$WORK/train/exit"
        rm -f "$BUSY"
    ) &
    TRAIN_PID=$!
    say "training started in the background (TRAIN_SECONDS=${TRAIN_SECONDS:-its default})"
fi

OUT="$WORK/check" GPU_BUSY_FILE="$BUSY" bash scripts/device/device-check.sh
CHECK_RC=$?
say "device-check exit $CHECK_RC"

TRAIN_RC="not run"
if [ -n "$TRAIN_PID" ]; then
    # the device call ends at 600 s: leave time to pack whatever exists
    while kill -0 "$TRAIN_PID" 2>/dev/null && [ $(($(date +%s) - T0)) -lt "${TRAIN_WAIT_UNTIL:-570}" ]; do sleep 1; done
    if kill -0 "$TRAIN_PID" 2>/dev/null; then
        say "training still running at $(($(date +%s) - T0)) s: stopped, its log returns without a model"
        pkill -P "$TRAIN_PID" 2>/dev/null; kill "$TRAIN_PID" 2>/dev/null
    fi
    wait "$TRAIN_PID" 2>/dev/null
    TRAIN_RC="$(cat "$WORK/train/exit" 2>/dev/null || echo '?')"
    say "device-train exit $TRAIN_RC; its last lines:"
    tail -25 "$WORK/train/train.log" 2>/dev/null | tee -a "$LOG"
    mv "$WORK"/train/model.tar.* "$OUT/" 2>/dev/null || say "no model parts to return"
    rm -f "$WORK/train/stdout.log"  # the same lines as train.log
fi
tar czf "$OUT/results.tar.gz" -C "$WORK" check train
say "\$OUT: $(ls "$OUT" | tr '\n' ' ')($(du -sh "$OUT" | cut -f1))"
rm -rf "$WORK"
if [ "$CHECK_RC" != 0 ] || { [ -n "$TRAIN_PID" ] && [ "$TRAIN_RC" != 0 ]; }; then
    say "device-round FAILED: check exit $CHECK_RC, train exit $TRAIN_RC"
    exit 1
fi
say "device-round passed"
