#!/usr/bin/env bash
# Make a slimmed copy of llama-cpp-python's sdist that fits in one device call.
#
#   scripts/device/slim_sdist.sh [VERSION]        (default 0.3.36)
#
# The device machine has nvcc, CMake, ninja and scikit-build-core but no
# package registry, and at most 64 MiB of working tree travels with a call;
# the sdist is about 77 MB (217 MB unpacked). Everything removed here is
# outside what `pip install` builds: llama.cpp's vocabulary test models,
# docs, web UI, examples, tests, benches, Python conversion scripts and CI
# files, and the sdist's own .git, docs and examples. All of ggml's backend
# sources stay (small, and each builds only when its GGML_<NAME> option is
# on), so the slim copy builds whatever the full sdist builds: libllama,
# libggml with any backend, and libmtmd when LLAVA_BUILD is on.
#
# Output (in the git-ignored folder .device/):
#   .device/sdist/llama_cpp_python-VERSION.tar.gz        the original, from PyPI
#   .device/llama_cpp_python-VERSION-slim.tar.gz         the slim copy (pip installs it as it would the sdist)
#   .device/slim-size.txt                                sizes before and after
set -euo pipefail
VERSION="${1:-0.3.36}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEV="$ROOT/.device"
NAME="llama_cpp_python-$VERSION"
SDIST="$DEV/sdist/$NAME.tar.gz"
OUT="$DEV/$NAME-slim.tar.gz"
mkdir -p "$DEV/sdist"
if [ ! -f "$SDIST" ]; then
    python -m pip download --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$VERSION" -d "$DEV/sdist" \
        || python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DEV/sdist"
fi
[ -f "$SDIST" ] || { echo "slim_sdist: $SDIST was not downloaded" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar xzf "$SDIST" -C "$WORK"
SRC="$WORK/$NAME"
[ -f "$SRC/CMakeLists.txt" ] && [ -d "$SRC/vendor/llama.cpp/ggml" ] || { echo "slim_sdist: unexpected sdist layout" >&2; exit 1; }
before=$(du -sb "$SRC" | cut -f1)

# The Python package's own extras (version metadata comes from llama_cpp/__init__.py, not git).
rm -rf "$SRC/.git" "$SRC/.github" "$SRC/docs" "$SRC/examples" "$SRC/docker" "$SRC/tests" "$SRC/mkdocs.yml"

L="$SRC/vendor/llama.cpp"
# Top-level models/ holds only vocabulary GGUFs and chat templates for llama.cpp's tests
# (src/models/*.cpp, the model graphs, stay).
rm -rf "$L/models" "$L/docs" "$L/media" "$L/examples" "$L/benches" "$L/tests" "$L/pocs" \
       "$L/gguf-py" "$L/conversion" "$L/scripts" "$L/ci" "$L/skills" "$L/requirements" "$L/grammars" \
       "$L/.github" "$L/.gemini" "$L/.devops" "$L"/convert_*.py "$L/requirements.txt" "$L/flake.nix" \
       "$L/build-xcframework.sh"
# tools/: only mtmd is built from the Python package (LLAVA_BUILD); the web UI,
# server and command-line tools are llama.cpp's standalone build.
for t in "$L"/tools/*; do
    case "$(basename "$t")" in mtmd|CMakeLists.txt) ;; *) rm -rf "$t" ;; esac
done

# Nothing that the build needs may be gone: every add_subdirectory of the parts
# that are configured must still exist.
for d in "$L/ggml/src/ggml-cpu" "$L/ggml/src/ggml-cuda" "$L/src/models" "$L/common" "$L/vendor" "$L/tools/mtmd" \
         "$SRC/llama_cpp"; do
    [ -e "$d" ] || { echo "slim_sdist: $d missing after slimming" >&2; exit 1; }
done
after=$(du -sb "$SRC" | cut -f1)
# a reproducible archive: the same sdist gives the same bytes (sorted names, one fixed time
# after 1980, as ZIP-based wheels need, no owners)
tar --sort=name --mtime=@1704067200 --owner=0 --group=0 --numeric-owner -cf - -C "$WORK" "$NAME" | gzip -n >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
packed=$(stat -c %s "$OUT")
orig=$(stat -c %s "$SDIST")
{
    echo "llama-cpp-python $VERSION sdist: $orig bytes packed, $before bytes unpacked"
    echo "slim copy: $packed bytes packed ($(awk "BEGIN{printf \"%.1f\", $packed/1048576}") MiB), $after bytes unpacked"
    echo "sha256 $(sha256sum "$OUT" | cut -d' ' -f1)  $(basename "$OUT")"
} | tee "$DEV/slim-size.txt"

# What travels with scripts/device/device-check.sh: the working tree (tracked and
# untracked-but-not-ignored files) plus the carried slim sdist and wheels; the limit is 64 MiB.
cd "$ROOT"
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s 2>/dev/null \
        | awk '{s += $1} END {print s + 0}')
wheels=$(du -cb "$DEV"/wheels/*.whl 2>/dev/null | tail -1 | cut -f1)
total=$((tree + packed + ${wheels:-0}))
echo "travels per device call: working tree $tree + slim sdist $packed + wheels ${wheels:-0} = $total bytes" \
     "($(awk "BEGIN{printf \"%.1f\", $total/1048576}") MiB of 64 MiB)" | tee -a "$DEV/slim-size.txt"
