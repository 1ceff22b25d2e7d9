"""The trunk capture: the C eval callback (mtpcode/_capture.c) and its Python fallback.

Both must copy exactly the rows of the named tensor that llama.cpp computed,
report a wrong tensor instead of writing past the buffer, and give the engine
the same output. The C one must actually be built by the install.
"""

from __future__ import annotations

import numpy as np
import pytest

import mtpcode.llama as llama
from mtpcode.bundle import open_bundle
from mtpcode.errors import MtpError
from mtpcode.llama import Context, Model, TrunkCapture, native_capture_available
from mtpcode.runtime import Engine

PROMPT = "def area(w, h):\n    return w * h\n\nprint(area(2, 3))\n"


def test_the_c_callback_is_built_by_the_install() -> None:
    # setup.py builds it as an optional extension: an install without a C
    # compiler falls back silently, so CI asserts it is really there.
    assert native_capture_available()


def _capture_rows(bundle, tensor: str, native: bool, n_rows: int = 40) -> np.ndarray:
    m = open_bundle(bundle).manifest
    trunk = np.full((64, m.n_embd), np.nan, dtype=np.float32)
    with Model(bundle / "main.gguf") as model:
        capture = TrunkCapture(tensor, trunk, native=native)
        with Context(model, n_ctx=64, n_batch=16, n_threads=1, capture=capture) as ctx:
            ids = np.arange(3, 3 + n_rows) % model.n_vocab
            for start in range(0, n_rows, 16):  # several decodes append at write_pos
                n = min(16, n_rows - start)
                ctx.batch.tokens[:n] = ids[start: start + n]
                ctx.decode(n, start, last_logits_only=True)
    return trunk


@pytest.mark.parametrize("native", [True, False])
def test_capture_copies_the_trunk_rows_of_the_reference_model(tiny_bundle, tiny_reference, native) -> None:
    import torch

    m = open_bundle(tiny_bundle).manifest
    rows = _capture_rows(tiny_bundle, m.trunk_tensor, native)
    assert np.isnan(rows[40:]).all()  # nothing written past the evaluated rows
    ids = torch.arange(3, 43)[None] % m.n_vocab
    with torch.no_grad():
        want = tiny_reference.trunk(ids)[0].numpy()
    assert np.abs(rows[:40] - want).max() < 1e-3 * max(1.0, float(np.abs(want).max()))


def test_c_and_python_callbacks_capture_identical_rows(tiny_bundle) -> None:
    tensor = open_bundle(tiny_bundle).manifest.trunk_tensor
    a, b = _capture_rows(tiny_bundle, tensor, True), _capture_rows(tiny_bundle, tensor, False)
    assert np.array_equal(a, b, equal_nan=True) and not np.isnan(a[:40]).any()


@pytest.mark.parametrize("native", [True, False])
def test_wrong_tensor_is_an_error_not_a_crash(tiny_bundle, native) -> None:
    with pytest.raises(MtpError, match="does not have that tensor"):
        _capture_rows(tiny_bundle, "no-such-tensor", native)
    # a tensor that exists but is not rows of n_embd floats (the logits)
    with pytest.raises(MtpError, match="result_output"):
        _capture_rows(tiny_bundle, "result_output", native)


@pytest.mark.parametrize("native", [True, False])
def test_capture_overflow_is_reported(tiny_bundle, native) -> None:
    m = open_bundle(tiny_bundle).manifest
    small = np.zeros((8, m.n_embd), dtype=np.float32)
    with Model(tiny_bundle / "main.gguf") as model, Context(model, n_ctx=64, n_batch=16, n_threads=1,
                 capture=TrunkCapture(m.trunk_tensor, small, native=native)) as ctx:
        ctx.batch.tokens[:12] = 5
        with pytest.raises(MtpError, match="overflow"):
            ctx.decode(12, 0, last_logits_only=True)


def test_engine_output_is_the_same_with_the_python_fallback(tiny_bundle, monkeypatch) -> None:
    from mtpcode.generation import GenerationOptions

    def tokens(engine: Engine) -> list[int]:
        done = list(engine.generate(PROMPT, GenerationOptions(max_tokens=24, heads=3, adaptive=False)))[-1]
        return engine.tokenize(PROMPT + done.text, add_bos=True)

    with Engine(tiny_bundle, n_ctx=128, n_threads=1) as native:
        assert native.native_capture
        want = tokens(native)
    monkeypatch.setattr(llama, "_native_capture", None)  # as on an install without a C compiler
    with Engine(tiny_bundle, n_ctx=128, n_threads=1) as fallback:
        assert not fallback.native_capture
        assert tokens(fallback) == want
