#!/usr/bin/env bash
# Join what device-train.sh returned into a checkpoint directory.
#
#   scripts/device/unpack_train.sh FROM_DIR CKPT_DIR
#
# FROM_DIR holds model.tar.part-0, -1, ... and model.tar.sha256 (the device tool's
# files_at folder, or .device/dry-train after a dry run). CKPT_DIR receives
# consolidated.pth (bf16), params.json, tokenizer.model, summary.json,
# train_log.jsonl and corpus.json, ready for `mtpcode convert CKPT_DIR --verify`.
set -euo pipefail
[ $# = 2 ] || { echo "usage: $0 FROM_DIR CKPT_DIR" >&2; exit 2; }
[ -d "$1" ] || { echo "unpack_train: $1 is not a directory" >&2; exit 66; }
FROM="$(cd "$1" && pwd)"
DEST="$2"
ls "$FROM"/model.tar.part-* >/dev/null 2>&1 || { echo "unpack_train: no model.tar.part-* in $FROM" >&2; exit 66; }
[ -f "$FROM/model.tar.sha256" ] || { echo "unpack_train: $FROM/model.tar.sha256 missing" >&2; exit 66; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# split's numeric suffixes sort in order (part-0 .. part-9)
cat $(ls "$FROM"/model.tar.part-* | sort) >"$TMP/model.tar"
(cd "$TMP" && sha256sum -c --quiet "$FROM/model.tar.sha256") \
    || { echo "unpack_train: the joined parts do not match model.tar.sha256 (a part missing or cut short?)" >&2; exit 65; }
mkdir -p "$DEST"
tar xf "$TMP/model.tar" -C "$DEST"
echo "unpacked into $DEST: $(ls "$DEST" | tr '\n' ' ')"
