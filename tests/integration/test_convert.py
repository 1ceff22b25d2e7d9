"""The converter: real checkpoints in Meta's format -> real GGUF files -> llama.cpp."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from converters.checkpoint import _SHARD_DIM
from converters.convert import convert_checkpoint
from converters.params import ModelParams
from converters.reference import greedy_decode
from mtpcode.bundle import open_bundle
from mtpcode.errors import DataError, NoInputError, OutputError, UsageError

PROMPTS = [
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "for i in range(10):\n    print(i * i)\n",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtpcode", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("mtpcode: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def no_leftovers(parent: Path) -> bool:
    """Nothing half-written: no bundle, no temporary conversion directory."""
    return not any(p.name.startswith(".") and "convert" in p.name for p in parent.iterdir())


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- params.json ----------------------------------------------------------------------------------


def test_params_defaults_and_unknown_keys():
    p = ModelParams.from_dict({"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": -1, "norm_eps": 1e-5,
                               "multiple_of": 256, "max_batch_size": 32, "some_future_key": [1]},
                              default_vocab_size=32000)
    assert (p.kv_heads, p.ffn_dim_multiplier, p.rope_theta, p.n_future_tokens) == (32, None, 10000.0, 1)
    assert p.vocab_size == 32000
    assert p.ffn_hidden == 11008  # Llama 2 7B
    assert ModelParams.from_dict({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000,
                                  "multiple_of": 4096, "ffn_dim_multiplier": 1.3}).ffn_hidden == 28672  # Llama 2 70B


@pytest.mark.parametrize("bad, fragment", [
    ({"n_layers": 4, "n_heads": 4, "vocab_size": 10}, "missing required key(s) dim"),
    ({"dim": 64, "n_layers": 4, "n_heads": 3, "vocab_size": 10}, "not divisible"),
    ({"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 3, "vocab_size": 10}, "multiple of n_kv_heads"),
    ({"dim": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 10, "n_future_tokens": 4}, "n_future_tokens"),
    ({"dim": 64.5, "n_layers": 4, "n_heads": 4, "vocab_size": 10}, "integer"),
])
def test_params_errors(bad, fragment):
    with pytest.raises(DataError, match="params.json") as exc:
        ModelParams.from_dict(bad)
    assert fragment in str(exc.value)


# --- the bundle matches the reference -------------------------------------------------------------

SHAPES = {
    "n1": dict(n_future_tokens=1, n_layers=4),
    "n2-gqa": dict(n_future_tokens=2, n_heads=8, n_kv_heads=2),
    "n4-ffnmult-theta": dict(n_future_tokens=4, ffn_dim_multiplier=1.3, rope_theta=1e6, dim=192, n_heads=6,
                             n_kv_heads=6),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_bundle_layout_and_manifest(make_bundle, make_checkpoint, shape):
    bundle = open_bundle(make_bundle(**shape))
    _, ref = make_checkpoint(**shape)
    p = ref.params
    m = bundle.manifest
    assert (m.n_future_tokens, m.n_trunk, m.n_embd, m.n_vocab) == (p.n_future_tokens, p.n_trunk, p.dim, p.vocab_size)
    assert [h.file for h in m.heads] == [f"head-{k}.gguf" for k in range(1, p.n_future_tokens)]
    main = gguf.GGUFReader(bundle.main_path)
    assert main.fields["llama.block_count"].parts[-1][0] == p.n_trunk + 1
    assert main.fields["mtpcode.role"].contents() == "main"
    names = {t.name for t in main.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", f"blk.{p.n_trunk}.ffn_up.weight"} <= names
    for k, path in enumerate(bundle.head_paths, start=1):
        head = gguf.GGUFReader(path)
        assert head.fields["llama.block_count"].parts[-1][0] == 1
        assert head.fields["mtpcode.head_index"].parts[-1][0] == k
        assert head.fields["mtpcode.fingerprint"].contents() == m.fingerprint
        assert "output.weight" not in {t.name for t in head.tensors}  # tied: token_embd is the unembedding
        # head k's block is extra_heads[k-1], exactly
        wq = next(t for t in head.tensors if t.name == "blk.0.attn_q.weight")
        expected = ref.extra_heads[k - 1].attention.wq.weight.detach().numpy()
        np.testing.assert_array_equal(np.asarray(wq.data).reshape(expected.shape), expected)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_main_gguf_logits_match_reference(make_bundle, make_checkpoint, shape):
    """main.gguf in llama-cpp-python's unmodified high-level Llama = the reference next-token head.

    Tolerance: max |Δlogit| <= 2e-3 × the logits' max magnitude (llama.cpp keeps
    the KV cache in F16); argmax identical at every position.
    """
    from llama_cpp import Llama

    bundle = make_bundle(**shape)
    _, ref = make_checkpoint(**shape)
    llm = Llama(str(bundle / "main.gguf"), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        for prompt in PROMPTS:
            ids = llm.tokenize(prompt.encode())
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
            with torch.no_grad():
                want = ref(torch.tensor([ids]))[0, 0].numpy()
            assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
            assert (got.argmax(-1) == want.argmax(-1)).all()
    finally:
        llm.close()


def test_llama_greedy_completion_equals_reference(tiny_bundle, tiny_reference, tokenizer_path):
    import sentencepiece as spm
    from llama_cpp import Llama

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    llm = Llama(str(tiny_bundle / "main.gguf"), n_ctx=256, verbose=False, n_threads=2)
    try:
        for prompt in PROMPTS:
            ids = llm.tokenize(prompt.encode())
            assert ids == [sp.bos_id()] + sp.encode(prompt)  # llama.cpp tokenizes like SentencePiece
            got: list[int] = []
            for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
                got.append(token)
                if len(got) == 24 or token == sp.eos_id():
                    break
            assert got == greedy_decode(tiny_reference, ids, 24, eos_id=sp.eos_id())
    finally:
        llm.close()


# --- shards ---------------------------------------------------------------------------------------


def test_model_parallel_shards_merge_to_the_same_bundle(make_checkpoint, make_bundle, tmp_path):
    src, _ = make_checkpoint()
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(src / "params.json", sharded)
    shutil.copy(src / "tokenizer.model", sharded)
    state = torch.load(src / "consolidated.pth", weights_only=True)
    shards: list[dict] = [{}, {}]
    for name, t in state.items():
        dim = next((d for suffix, d in _SHARD_DIM.items() if name == suffix or name.endswith("." + suffix)), None)
        for i, part in enumerate([t, t] if dim is None else torch.chunk(t, 2, dim=dim)):
            shards[i][name] = part.clone()
    for i, s in enumerate(shards):
        torch.save(s, sharded / f"consolidated.{i:02d}.pth")
    out = convert_checkpoint(sharded, tmp_path / "bundle", quant="F32").out_dir
    reference = make_bundle()
    for file in ["main.gguf", "head-1.gguf", "head-3.gguf"]:
        a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out / file).tensors}
        b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(reference / file).tensors}
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{file}:{name}")


# --- bad input: one clear line, non-zero exit, nothing written ------------------------------------


def _bad_state(src: Path, dst: Path, edit) -> Path:
    copy_checkpoint(src, dst)
    state = torch.load(dst / "consolidated.pth", weights_only=True)
    edit(state)
    torch.save(state, dst / "consolidated.pth")
    return dst


def test_bad_inputs_give_one_line_and_write_nothing(make_checkpoint, tmp_path):
    src, _ = make_checkpoint()
    cases: list[tuple[Path, list[str], int, str]] = []

    d = copy_checkpoint(src, tmp_path / "no-params")
    (d / "params.json").unlink()
    cases.append((d, [], 66, "params.json not found"))

    d = copy_checkpoint(src, tmp_path / "no-ckpt")
    (d / "consolidated.pth").unlink()
    cases.append((d, [], 66, "no consolidated.pth"))

    d = copy_checkpoint(src, tmp_path / "sub" / "no-tok")
    (d / "tokenizer.model").unlink()
    cases.append((d, [], 66, "no tokenizer.model"))

    d = _bad_state(src, tmp_path / "bad-shape", lambda s: s.__setitem__(
        "layers.1.attention.wq.weight", torch.zeros(128, 96, dtype=torch.bfloat16)))
    cases.append((d, [], 65, "layers.1.attention.wq.weight has shape [128, 96]"))

    d = _bad_state(src, tmp_path / "missing-head",
                   lambda s: [s.pop(k) for k in list(s) if k.startswith("extra_heads.2.")])
    cases.append((d, [], 65, "n_future_tokens=4"))

    def add_head(s):
        for k in [k for k in s if k.startswith("extra_heads.0.")]:
            s[k.replace("extra_heads.0.", "extra_heads.3.")] = s[k].clone()
    d = _bad_state(src, tmp_path / "extra-head", add_head)
    cases.append((d, [], 65, "extra_heads [0, 1, 2, 3]"))

    d = copy_checkpoint(src, tmp_path / "vocab")
    params = json.loads((d / "params.json").read_text())
    params["vocab_size"] = 600
    (d / "params.json").write_text(json.dumps(params))
    cases.append((d, [], 65, "vocab_size=600"))

    d = copy_checkpoint(src, tmp_path / "corrupt")
    (d / "consolidated.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    cases.append((d, [], 65, "not a readable PyTorch checkpoint"))

    cases.append((src, ["--quant", "Q3_X"], 2, "unknown quantization type"))

    for ckpt, extra, code, fragment in cases:
        out = tmp_path / "out" / ckpt.name
        proc = run_cli("convert", str(ckpt), "--out", str(out), "--quant", "F32", *extra)
        assert_one_line_error(proc, code, fragment)
        assert not out.exists(), ckpt.name
        assert not out.parent.exists() or no_leftovers(out.parent)


def test_code_executing_pickle_is_refused_not_run(make_checkpoint, tmp_path):
    src, _ = make_checkpoint()
    d = copy_checkpoint(src, tmp_path / "evil")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    state = torch.load(d / "consolidated.pth", weights_only=True)
    state["evil"] = Evil()
    torch.save(state, d / "consolidated.pth", pickle_module=pickle)
    proc = run_cli("convert", str(d), "--out", str(tmp_path / "out"), "--quant", "F32")
    assert_one_line_error(proc, 65, "refused to load")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force_and_unwritable_output(make_checkpoint, tmp_path):
    src, _ = make_checkpoint()
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("convert", str(src), "--out", str(out), "--quant", "F32")
    assert_one_line_error(proc, 73, "--force")
    assert (out / "keep.txt").read_text() == "mine"

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not _can_write(locked):  # root ignores permissions; a read-only parent is the real case then
            proc = run_cli("convert", str(src), "--out", str(locked / "b"), "--quant", "F32")
            assert_one_line_error(proc, 73, "cannot write")
        proc = run_cli("convert", str(src), "--out", "/proc/mtpcode-bundle", "--quant", "F32")
        assert proc.returncode == 73 and "Traceback" not in proc.stderr, proc.stderr
    finally:
        locked.chmod(0o700)

    proc = run_cli("convert", str(src), "--out", str(out), "--quant", "F32", "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists()
    assert open_bundle(out).manifest.quantization == "F32"
    assert proc.stdout.strip() == str(out.resolve())


def _can_write(path: Path) -> bool:
    try:
        (path / ".probe").touch()
        (path / ".probe").unlink()
        return True
    except OSError:
        return False


def test_interrupt_mid_conversion_leaves_nothing(make_checkpoint, tmp_path):
    src, _ = make_checkpoint()
    out = tmp_path / "bundle"

    def progress(stage, done, total):
        if stage.startswith("writing head-2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, out, quant="Q8_0", progress=progress)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_after_success(make_checkpoint, tmp_path):
    """A failing --force conversion keeps the old bundle."""
    src, _ = make_checkpoint()
    out = convert_checkpoint(src, tmp_path / "b", quant="F32").out_dir
    before = (out / "mtp.json").read_text()

    def progress(stage, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, out, quant="Q8_0", force=True, progress=progress)
    assert (out / "mtp.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_cli_registers_and_summarises(make_checkpoint):
    src, _ = make_checkpoint()
    proc = run_cli("convert", str(src), "--quant", "Q8_0", "--name", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert "main.gguf" in proc.stderr and "parameters" in proc.stderr and "Q8_0" in proc.stderr
    bundle = Path(proc.stdout.strip())
    assert open_bundle(bundle).manifest.quantization == "Q8_0"
    listing = run_cli("models", "list")
    assert "tiny" in listing.stdout


def test_library_errors_are_typed(make_checkpoint, tmp_path):
    src, _ = make_checkpoint()
    with pytest.raises(NoInputError):
        convert_checkpoint(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(UsageError):
        convert_checkpoint(src, tmp_path / "o", quant="nope")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError):
        convert_checkpoint(src, tmp_path / "exists")


def test_llama_buffers_and_unknown_params_keys_are_ignored(make_checkpoint, make_bundle, tmp_path):
    """Original Llama checkpoints carry rope.freqs; newer params.json files have extra keys."""
    src, _ = make_checkpoint()
    d = _bad_state(src, tmp_path / "with-buffers", lambda s: s.__setitem__("rope.freqs", torch.ones(16)))
    params = json.loads((d / "params.json").read_text())
    params.update(max_batch_size=32, use_scaled_rope=False)
    (d / "params.json").write_text(json.dumps(params))
    out = convert_checkpoint(d, tmp_path / "b", quant="F32").out_dir
    assert open_bundle(out).manifest.fingerprint == open_bundle(make_bundle()).manifest.fingerprint
    assert "rope_freqs.weight" not in {t.name for t in gguf.GGUFReader(out / "main.gguf").tensors}
