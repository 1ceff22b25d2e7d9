"""The bundle: a directory holding ``main.gguf``, one ``head-K.gguf`` per extra
head, and the manifest ``mtp.json`` that ties them together.

This module only reads and checks the manifest and the files' presence; it
needs neither torch nor llama.cpp. The runtime checks the GGUF contents
(embedding size, vocabulary, fingerprint) when it loads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtpcode.errors import ModelError, NoInputError

MANIFEST_NAME = "mtp.json"
MAIN_NAME = "main.gguf"
FORMAT = "mtpcode-bundle"
FORMAT_VERSION = 1

# Keys mtpcode adds to every GGUF of a bundle, so a head can be matched to its
# main model without the manifest.
KV_ROLE = "mtpcode.role"  # "main" or "head"
KV_HEAD_INDEX = "mtpcode.head_index"  # 0 for main, k for head-k
KV_N_FUTURE = "mtpcode.n_future_tokens"
KV_N_TRUNK = "mtpcode.n_trunk"
KV_FINGERPRINT = "mtpcode.fingerprint"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (the checksums in mtp.json)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def add_model_metadata(w: Any, p: Any, *, n_blocks: int, role: str, head_index: int, fingerprint: str) -> None:
    """Write the llama-architecture hyperparameters and mtpcode's keys of one bundle GGUF.

    ``w`` is a ``gguf.GGUFWriter``; ``p`` has ModelParams' fields (converters.params).
    The tokenizer and the tensors are the caller's.
    """
    w.add_context_length(p.max_seq_len)
    w.add_embedding_length(p.dim)
    w.add_block_count(n_blocks)
    w.add_feed_forward_length(p.ffn_hidden)
    w.add_head_count(p.n_heads)
    w.add_head_count_kv(p.kv_heads)
    w.add_layer_norm_rms_eps(p.norm_eps)
    w.add_rope_dimension_count(p.head_dim)
    w.add_rope_freq_base(p.rope_theta)
    w.add_vocab_size(p.vocab_size)
    w.add_string(KV_ROLE, role)
    w.add_uint32(KV_HEAD_INDEX, head_index)
    w.add_uint32(KV_N_FUTURE, p.n_future_tokens)
    w.add_uint32(KV_N_TRUNK, p.n_trunk)
    w.add_string(KV_FINGERPRINT, fingerprint)


def head_name(k: int) -> str:
    """File name of extra head ``k`` (1-based: head k predicts k+1 tokens ahead)."""
    return f"head-{k}.gguf"


def trunk_tensor_name(n_trunk: int) -> str:
    """llama.cpp's name for the residual stream after the last trunk block."""
    return f"l_out-{n_trunk - 1}"


@dataclass(frozen=True)
class FileEntry:
    file: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Contents of ``mtp.json``."""

    n_future_tokens: int
    n_trunk: int
    n_embd: int
    n_vocab: int
    quantization: str
    fingerprint: str
    main: FileEntry
    heads: tuple[FileEntry, ...]
    trunk_tensor: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.trunk_tensor:
            object.__setattr__(self, "trunk_tensor", trunk_tensor_name(self.n_trunk))

    @property
    def n_heads(self) -> int:
        """Number of extra heads (n_future_tokens - 1)."""
        return len(self.heads)

    def to_json(self) -> str:
        data = asdict(self)
        data["heads"] = [asdict(h) for h in self.heads]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        """Build from parsed JSON; raises ModelError naming the bad field."""
        if data.get("format") != FORMAT:
            raise ModelError(f"{where}: not an mtpcode bundle manifest (format={data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"{where}: bundle format version {version} is not supported by this mtpcode "
                f"(expects {FORMAT_VERSION}); reconvert the checkpoint or upgrade mtpcode"
            )
        try:
            main = FileEntry(**data["main"])
            heads = tuple(FileEntry(**h) for h in data["heads"])
            manifest = cls(
                n_future_tokens=int(data["n_future_tokens"]),
                n_trunk=int(data["n_trunk"]),
                n_embd=int(data["n_embd"]),
                n_vocab=int(data["n_vocab"]),
                quantization=str(data["quantization"]),
                fingerprint=str(data["fingerprint"]),
                main=main,
                heads=heads,
                trunk_tensor=str(data.get("trunk_tensor", "")),
                source=dict(data.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None
        if manifest.n_future_tokens != len(heads) + 1:
            raise ModelError(
                f"{where}: n_future_tokens={manifest.n_future_tokens} but {len(heads)} head files listed"
            )
        return manifest


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose manifest was read and whose files exist."""

    path: Path
    manifest: Manifest

    @property
    def main_path(self) -> Path:
        return self.path / self.manifest.main.file

    @property
    def head_paths(self) -> tuple[Path, ...]:
        return tuple(self.path / h.file for h in self.manifest.heads)

    @property
    def total_size(self) -> int:
        return self.manifest.main.size + sum(h.size for h in self.manifest.heads)


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read ``mtp.json`` in ``path`` and check every listed file is there with its size.

    A bare ``main.gguf`` path (or a directory with only ``main.gguf``) is not
    a bundle: the caller gets a ModelError that says how to make one.
    """
    root = Path(path)
    if not root.exists():
        raise NoInputError(f"model not found: {root}")
    if root.is_file():
        raise ModelError(f"{root} is a file; pass the bundle directory (the one holding {MANIFEST_NAME})")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelError(
            f"{root} has no {MANIFEST_NAME}: not an mtpcode bundle (make one with `mtpcode convert`)"
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{manifest_path}: malformed manifest (not a JSON object)")
    manifest = Manifest.from_dict(data, where=str(manifest_path))
    for entry in (manifest.main, *manifest.heads):
        file = root / entry.file
        if not file.is_file():
            raise ModelError(f"bundle {root} is missing {entry.file}; reconvert it with `mtpcode convert`")
        size = file.stat().st_size
        if size != entry.size:
            raise ModelError(
                f"{file}: size {size} bytes, manifest says {entry.size}: the file is truncated or "
                "was replaced; reconvert the bundle"
            )
    return Bundle(path=root, manifest=manifest)
