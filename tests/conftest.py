"""Shared fixtures: tiny checkpoints in Meta's format and bundles converted from
them by the real converter. Everything is built once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Keep llama.cpp and torch to the two cores CI has, and make every test
# independent of the developer's own mtpcode configuration.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TOKENIZER_VOCAB = 512
# The default tiny shape: grouped-query attention, 4 future tokens.
DEFAULT_SHAPE: dict[str, Any] = dict(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, n_future_tokens=4)


@pytest.fixture(autouse=True)
def _isolated_mtpcode_home(tmp_path_factory, monkeypatch):
    """Point mtpcode's config and data directories at a temporary home."""
    home = tmp_path_factory.mktemp("mtpcode-home")
    monkeypatch.setenv("MTPCODE_HOME", str(home))
    for var in list(os.environ):
        if var.startswith("MTPCODE_") and var != "MTPCODE_HOME":
            monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """A SentencePiece BPE tokenizer (512 pieces, byte fallback) trained on stdlib source."""
    from converters.synthetic import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model", TOKENIZER_VOCAB)


def _key(shape: dict[str, Any]) -> str:
    return "-".join(f"{k}={shape[k]}" for k in sorted(shape))


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_path) -> Callable[..., tuple[Path, Any]]:
    """Factory: ``make_checkpoint(**shape) -> (checkpoint_dir, reference MTPTransformer)``, cached per shape.

    Shape keys are ModelParams fields plus ``seed``, ``dtype`` and ``logit_scale``;
    unspecified ones come from DEFAULT_SHAPE.
    """
    from converters.synthetic import make_checkpoint as build

    cache: dict[str, tuple[Path, Any]] = {}

    def factory(**shape: Any) -> tuple[Path, Any]:
        full = {**DEFAULT_SHAPE, **shape}
        key = _key(full)
        if key not in cache:
            out = tmp_path_factory.mktemp("ckpt") / "model"
            cache[key] = build(out, tokenizer_path, **full)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory, make_checkpoint) -> Callable[..., Path]:
    """Factory: ``make_bundle(quant="F32", **shape) -> bundle_dir``, converted by the real converter, cached."""
    from converters.convert import convert_checkpoint

    cache: dict[str, Path] = {}

    def factory(quant: str = "F32", **shape: Any) -> Path:
        key = _key({**DEFAULT_SHAPE, **shape, "quant": quant})
        if key not in cache:
            ckpt, _ = make_checkpoint(**shape)
            out = tmp_path_factory.mktemp("bundle") / f"tiny-{quant.lower()}"
            convert_checkpoint(ckpt, out, quant=quant, threads=2)
            cache[key] = out
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_bundle(make_bundle) -> Path:
    """F32 bundle of the default tiny shape (dim 128, 6 layers, GQA, 3 extra heads)."""
    return make_bundle()


@pytest.fixture(scope="session")
def tiny_reference(make_checkpoint):
    """The float32 PyTorch reference model of ``tiny_bundle``."""
    return make_checkpoint()[1]


@pytest.fixture(scope="session")
def agree_bundle(make_checkpoint, tmp_path_factory) -> Path:
    """A bundle whose heads often agree with the main model (see runtime_helpers), so drafts get accepted."""
    from runtime_helpers import agreeing_checkpoint

    from converters.convert import convert_checkpoint

    ckpt, _ = make_checkpoint()
    root = tmp_path_factory.mktemp("agree")
    src = agreeing_checkpoint(ckpt, root / "ckpt", tie=0.15)
    return convert_checkpoint(src, root / "bundle", quant="F32", threads=1).out_dir


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path):
    """An Engine on ``tiny_bundle`` (2 threads), shared by a test module's tests."""
    from mtpcode.runtime import Engine

    with Engine(tiny_bundle, n_threads=2) as e:
        yield e
