#!/usr/bin/env bash
# Download the wheels the device machine lacks into .device/wheels/.
#
#   scripts/device/prep_wheels.sh
#
# The device image has Python 3.12 with numpy, click, pygments, jinja2,
# typing-extensions, pyyaml, requests, tqdm, torch and sentencepiece, but no
# package registry. mtpcode (and llama-cpp-python, gguf, prompt-toolkit)
# need these five more, all pure-Python wheels:
#   gguf            mtpcode (GGUF reading/writing; needs numpy, pyyaml, requests, tqdm: present)
#   prompt-toolkit  mtpcode's REPL; also the held-out evaluation corpus of converters.corpus
#   wcwidth         prompt-toolkit
#   platformdirs    mtpcode (config and cache directories)
#   diskcache       llama-cpp-python (imported by llama_cpp/llama_cache.py at import time)
# and, for building llama-cpp-python without build isolation, a known scikit-build-core
# (its sdist asks for >= 0.9.2; the image's version is not recorded; it needs packaging
# and pathspec, which the image has):
#   scikit-build-core
# tomli is only needed before Python 3.11. Versions are the ones this
# project is developed and tested with. On the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="$ROOT/.device/wheels"
WHEELS=(gguf==0.19.0 prompt-toolkit==3.0.52 wcwidth==0.7.0 platformdirs==4.14.9 diskcache==5.6.3
        scikit-build-core==1.1.2)
mkdir -p "$DEST"
python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d "$DEST" "${WHEELS[@]}"
# Each wheel's declared needs, to check against the device's package list.
for w in "$DEST"/*.whl; do
    needs=$(unzip -p "$w" '*.dist-info/METADATA' | { grep '^Requires-Dist' || true; } | { grep -v 'extra ==' || true; } \
            | cut -d' ' -f2- | tr '\n' ' ')
    echo "$(basename "$w"): ${needs:-no requirements}"
done
du -sh "$DEST"
