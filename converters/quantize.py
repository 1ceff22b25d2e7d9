"""Quantization through llama.cpp's own quantizer (``llama_model_quantize``)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from mtpcode.errors import ModelError, UsageError

# Type name -> (llama_ftype, float type of the file we write before quantizing).
# Float types are written directly; the others go through llama.cpp.
QUANT_TYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "BF16": 32,
    "Q8_0": 7,
    "Q6_K": 18,
    "Q5_K_M": 17,
    "Q5_K_S": 16,
    "Q5_0": 8,
    "Q4_K_M": 15,
    "Q4_K_S": 14,
    "Q4_0": 2,
    "IQ4_XS": 30,
    "Q3_K_M": 12,
    "Q2_K": 10,
}
FLOAT_QUANTS = ("F32", "F16", "BF16")
DEFAULT_QUANT = "Q4_K_M"


def normalize_quant(name: str) -> str:
    """Canonical spelling of a quant type name; UsageError listing the choices if unknown."""
    key = name.strip().upper()
    if key not in QUANT_TYPES:
        raise UsageError(f"unknown quantization type {name!r}; choose one of {', '.join(QUANT_TYPES)}")
    return key


def quantize_file(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp; ModelError if llama.cpp refuses."""
    # (llama.cpp: only to quantize, not to read a type's name)
    import llama_cpp

    # (llama.cpp's backend, through the native layer)
    from mtpcode.llama import init_backend

    init_backend()  # routes llama.cpp's per-tensor log away from stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads or os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelError(f"llama.cpp failed to quantize {src.name} to {quant} (llama_model_quantize returned {rc})")
