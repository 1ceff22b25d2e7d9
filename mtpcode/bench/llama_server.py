"""llama-cpp-python's own server with its weights in the buffers mtpcode's engine uses.

    python -m mtpcode.bench.llama_server --model main.gguf [llama_cpp.server's options ...]

``python -m llama_cpp.server`` always loads with llama.cpp's extra CPU buffer
types on; mtpcode turns them off on CPUs with AMX, where decoding a quantized
model with them segfaults (docs/design.md §6) and kernels round differently per
buffer type. The benchmarks that compare the two servers (``bench.typists``)
start this instead, so that both read the same weights from the same buffers:
it builds the model parameters as the engine does (``extra_bufts`` "auto") and
then runs llama_cpp.server unchanged, with the same command line.
"""

from __future__ import annotations

import runpy

import llama_cpp.llama as high_level

from mtpcode.llama import model_params, use_extra_bufts


def main() -> None:
    params, overrides = model_params(extra_bufts=use_extra_bufts("auto"))
    # Llama() reads its defaults from here; the server creates one model, with this object
    high_level.llama_cpp.llama_model_default_params = lambda: params
    main.overrides = overrides  # type: ignore[attr-defined]  # alive as long as the process
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
