"""The trainer: a tiny real training run on stdlib source, its checkpoint in
Meta's exact format, conversion by the project's converter, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from converters import data  # noqa: E402
from converters.train import LOG_NAME, STATE_NAME, TrainConfig, train  # noqa: E402

TINY = TrainConfig(
    steps=24, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=512, n_future_tokens=4,
    seq_len=64, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=4, max_files=30, seed=7,
)
RUN = dict(ckpt_every=8, eval_every=12, eval_batches=2, log_every=4, quiet=True, threads=1)

BLOCK_KEYS = (
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
    "attention_norm.weight", "ffn_norm.weight",
)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, work_dir) -> Path:
    out = tmp_path_factory.mktemp("run") / "full"
    train(TINY, out, work_dir=work_dir, **RUN)
    return out


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]


def test_split_is_deterministic_and_disjoint():
    train_files, held = data.split_sources()
    assert train_files and held
    names = {s.rel_path for s in train_files}
    assert names.isdisjoint(s.rel_path for s in held)
    assert all(data.is_heldout(s.rel_path) for s in held)
    assert not any("/test/" in f"/{s.rel_path}" or "site-packages" in s.rel_path for s in train_files)
    assert 0.01 < len(held) / (len(held) + len(train_files)) < 0.12


def test_tokenizer_keeps_code_exactly(trained):
    sp = data.load_tokenizer(trained / "tokenizer.model")
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    text = "class A:\n    def f(self, x):\n\t\treturn  x + 12345  # é ✓\n\n"
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    pieces = [sp.id_to_piece(i) for i in ids]
    assert not pieces[0].startswith("\u2581")  # no dummy prefix
    assert "<0x0A>" in pieces  # newlines survive (byte fallback)
    assert {"1", "2", "3", "4", "5"} <= set(pieces)  # digits split


def test_loss_decreases_for_every_head(trained):
    train_logs = [r for r in _log(trained) if "train_loss" in r]
    first, last = train_logs[0]["train_loss"], train_logs[-1]["train_loss"]
    assert len(first) == TINY.n_future_tokens
    for k in range(TINY.n_future_tokens):
        assert last[k] < first[k] - 0.5, (k, first[k], last[k])
    evals = [r for r in _log(trained) if "heldout_loss" in r]
    assert evals and all(len(r["heldout_top1"]) == TINY.n_future_tokens for r in evals)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["steps"] == TINY.steps
    assert summary["tokens_seen"] == TINY.steps * TINY.batch_size * TINY.seq_len


def test_checkpoint_has_meta_names_and_shapes(trained):
    params = json.loads((trained / "params.json").read_text())
    assert set(params) == {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                           "ffn_dim_multiplier", "norm_eps", "rope_theta", "n_future_tokens"}
    assert params["n_future_tokens"] == 4 and params["n_layers"] == 6
    state = torch.load(trained / "consolidated.pth", weights_only=True)
    p = TINY.model_params()
    n_trunk, hd = p.n_trunk, p.head_dim
    expected = {"tok_embeddings.weight": (p.vocab_size, p.dim), "norm.weight": (p.dim,),
                "output.weight": (p.vocab_size, p.dim)}
    block_shapes = {
        "attention.wq.weight": (p.n_heads * hd, p.dim), "attention.wk.weight": (p.kv_heads * hd, p.dim),
        "attention.wv.weight": (p.kv_heads * hd, p.dim), "attention.wo.weight": (p.dim, p.n_heads * hd),
        "feed_forward.w1.weight": (p.ffn_hidden, p.dim), "feed_forward.w2.weight": (p.dim, p.ffn_hidden),
        "feed_forward.w3.weight": (p.ffn_hidden, p.dim), "attention_norm.weight": (p.dim,),
        "ffn_norm.weight": (p.dim,),
    }
    prefixes = [f"layers.{i}." for i in range(n_trunk + 1)]
    prefixes += [f"extra_heads.{k}." for k in range(p.n_future_tokens - 1)]
    for prefix in prefixes:
        for name, shape in block_shapes.items():
            expected[prefix + name] = shape
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v.dtype == torch.float32 for v in state.values())


def test_checkpoint_converts_with_project_converter(trained, tmp_path):
    from converters.convert import convert_checkpoint
    from mtpcode.bundle import open_bundle

    result = convert_checkpoint(trained, tmp_path / "bundle", quant="F32")
    bundle = open_bundle(result.out_dir)
    m = bundle.manifest
    assert (m.n_future_tokens, m.n_trunk, m.n_embd, m.n_vocab) == (4, 2, TINY.dim, TINY.vocab_size)
    assert len(m.heads) == 3

    # llama.cpp must tokenize code exactly as the SentencePiece model the
    # trainer used (no dummy prefix, whitespace runs, byte fallback).
    from mtpcode.llama import Model

    sp = data.load_tokenizer(trained / "tokenizer.model")
    _, held = data.split_sources()
    texts = [src.text[:3000] for src in held[:4]] + ["  x\n\n\tif a:\n        b = 'é✓' + \"\\x00\"\n"]
    with Model(result.out_dir / "main.gguf") as model:
        for text in texts:
            assert model.tokenize(text, add_bos=False) == sp.encode(text)
            assert model.tokenize(text)[:1] == [data.BOS_ID]


def test_resume_continues_the_same_trajectory(trained, tmp_path, work_dir):
    out = tmp_path / "resumed"
    assert train(TINY, out, work_dir=work_dir, stop_at=10, **RUN) is None
    assert torch.load(out / STATE_NAME, weights_only=True)["step"] == 10
    summary = train(TINY, out, work_dir=work_dir, resume=True, **RUN)
    assert summary["steps"] == TINY.steps
    a = torch.load(trained / "consolidated.pth", weights_only=True)
    b = torch.load(out / "consolidated.pth", weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0, msg=name)


def test_resume_refuses_changed_settings(trained, tmp_path, work_dir):
    from mtpcode.errors import UsageError

    out = tmp_path / "r"
    train(TINY, out, work_dir=work_dir, stop_at=2, **RUN)
    changed = TrainConfig(**{**TINY.__dict__, "lr": 1e-3})
    with pytest.raises(UsageError, match="lr"):
        train(changed, out, work_dir=work_dir, resume=True, **RUN)


# --- the package corpus, the time budget and the GPU-ready options (run here on the CPU)

PKG = TrainConfig(
    steps=8, dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=384, n_future_tokens=4,
    seq_len=64, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=30, seed=3, corpus="packages",
    packages="six,attrs,packaging", eval_packages="click", char_coverage=0.99,
)


@pytest.fixture(scope="module")
def package_run(tmp_path_factory) -> Path:
    from dataclasses import replace

    from converters.train import CALIBRATION_STEPS, decay_start

    out = tmp_path_factory.mktemp("pkgrun") / "run"
    # a one-second budget: the shortest run whose decay starts after the timed steps,
    # whatever this machine's speed
    summary = train(PKG, out, work_dir=tmp_path_factory.mktemp("pkgcache"), time_budget=1.0,
                    ckpt_dtype="bfloat16", spec_prompts=3, spec_tokens=16, **{**RUN, "eval_every": 100})
    shortest = next(n for n in range(1, 1000) if decay_start(replace(PKG, steps=n)) > CALIBRATION_STEPS)
    assert summary["steps"] == shortest
    return out


def test_time_budget_sets_the_steps_and_records_them(package_run):
    summary = json.loads((package_run / "summary.json").read_text())
    budget = summary["time_budget"]
    assert budget["steps"] == summary["steps"] == summary["config"]["steps"]
    assert budget["seconds_per_step"] > 0 and budget["tokens_per_s"] > 0
    assert [r for r in _log(package_run) if r.get("event") == "time_budget"]
    saved = torch.load(package_run / STATE_NAME, weights_only=True)
    assert saved["config"]["steps"] == summary["steps"]  # --resume --steps N repeats it


def test_package_run_evaluates_each_heldout_package(package_run):
    summary = json.loads((package_run / "summary.json").read_text())
    by_pkg = summary["heldout_by_package"]
    assert set(by_pkg) == {"click"}
    assert len(by_pkg["click"]["top1"]) == PKG.n_future_tokens
    assert all(0 <= x <= 1 for x in by_pkg["click"]["top1"])
    record = json.loads((package_run / "corpus.json").read_text())
    assert [p["name"] for p in record["packages"] if p["role"] == "eval"] == ["click"]
    assert {p["name"] for p in record["packages"] if p["role"] == "train"} == {"six", "attrs", "packaging"}
    spec = summary["speculative"]
    assert spec["prompts"] == 3 and spec["tokens_per_forward"] >= 1.0


def test_bf16_checkpoint_converts(package_run, tmp_path):
    from converters.convert import convert_checkpoint
    from mtpcode.bundle import open_bundle

    state = torch.load(package_run / "consolidated.pth", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    result = convert_checkpoint(package_run, tmp_path / "bundle", quant="F32")
    assert open_bundle(result.out_dir).manifest.n_vocab == PKG.vocab_size


def test_simulated_speculation_is_plain_greedy(package_run):
    from converters.params import ModelParams
    from converters.reference import MTPTransformer, greedy_decode
    from converters.train import speculative_tokens_per_forward

    params = ModelParams.load(package_run / "params.json")
    state = torch.load(package_run / "consolidated.pth", weights_only=True)
    model = MTPTransformer.from_state_dict(params, state)
    prompts = [[1, 5, 9, 33, 70], [1, 100, 101, 102]]
    result = speculative_tokens_per_forward(model, prompts, 20, keep_outputs=True)
    for prompt, out in zip(prompts, result["outputs"]):
        assert out == greedy_decode(model, prompt, 20)
    assert result["tokens"] == 40
    assert 1.0 <= result["tokens_per_forward"] <= PKG.n_future_tokens


def test_cuda_is_refused_clearly_without_a_gpu():
    from converters.train import resolve_device
    from mtpcode.errors import UsageError

    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UsageError, match="no CUDA device"):
        resolve_device("cuda")
