"""Training data for the built-in model: the running interpreter's standard
library source, a deterministic held-out split of it, and a SentencePiece
tokenizer trained on the training split only.

Everything here is deterministic for a given interpreter: the file list is
sorted, the split is a hash of each file's path relative to the stdlib root,
and the tokenizer trainer runs single-threaded with a fixed seed.
"""

from __future__ import annotations

import hashlib
import io
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Directories that are tests, third-party code or vendored/generated data.
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
)
# Files that are data dressed up as Python (pydoc_data/topics.py is a 750 kB string).
MAX_FILE_BYTES = 300_000
HELDOUT_PERCENT = 5

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel_path: str, percent: int = HELDOUT_PERCENT) -> bool:
    """Whether a file (path relative to the corpus root, '/'-separated) is held out.

    A hash of the path decides, so the split does not depend on which other
    files exist or in which order they are listed.
    """
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


@dataclass(frozen=True)
class SourceFile:
    rel_path: str
    text: str


def iter_sources(root: Path | None = None) -> Iterator[SourceFile]:
    """Yield the corpus's ``*.py`` files in sorted path order.

    Skips test directories, site-packages, files over ``MAX_FILE_BYTES`` and
    files that are not UTF-8.
    """
    root = Path(root) if root is not None else stdlib_root()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                paths.append(Path(dirpath) / name)
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield SourceFile(path.relative_to(root).as_posix(), text)


def split_sources(root: Path | None = None) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, heldout) lists of the corpus's files."""
    train: list[SourceFile] = []
    heldout: list[SourceFile] = []
    for src in iter_sources(root):
        (heldout if is_heldout(src.rel_path) else train).append(src)
    return train, heldout


def _training_lines(files: Sequence[SourceFile]) -> Iterator[str]:
    # SentencePiece trains on "sentences"; for code a line (with its leading
    # indentation, without the newline) is the natural unit. Newlines are
    # encoded through byte fallback as <0x0A>, a single token.
    for src in files:
        for line in src.text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    files: Sequence[SourceFile], out_path: Path, vocab_size: int = 2048, seed: int = 0,
    character_coverage: float = 0.9995, num_threads: int = 1,
) -> Path:
    """Train a BPE SentencePiece model on ``files`` and write it to ``out_path``.

    Byte fallback keeps every input encodable; whitespace is kept exactly
    (no dummy prefix, no collapsing of runs) because indentation is syntax.
    Ids follow Llama: unk 0, bos 1, eos 2. ``character_coverage``: the share of
    character occurrences whose characters get pieces of their own (the rest
    are spelled in byte pieces); a small corpus with many rare characters
    needs a lower value than the default.
    """
    return train_code_tokenizer(_training_lines(files), out_path, vocab_size,
                                character_coverage=character_coverage, num_threads=num_threads)


def train_code_tokenizer(lines: Iterable[str], out_path: Path, vocab_size: int, *,
                         character_coverage: float = 0.9995, num_threads: int = 1,
                         max_sentence_length: int = 4096) -> Path:
    """The project's one SentencePiece recipe for code, trained on ``lines`` and written to ``out_path``.

    BPE with byte fallback (every input stays encodable), digits split, and
    whitespace kept exactly (no dummy prefix, no collapsing of runs, pieces of
    whitespace only) because indentation is syntax. Ids follow Llama: unk 0,
    bos 1, eos 2, no padding. Lines longer than ``max_sentence_length`` bytes
    are left out of training.
    """
    import sentencepiece as spm  # (the convert extra: only to train or read a tokenizer)

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_length,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path


def load_tokenizer(path: Path):
    """A ``sentencepiece.SentencePieceProcessor`` for ``path``."""
    import sentencepiece as spm  # (the convert extra: only to train or read a tokenizer)

    return spm.SentencePieceProcessor(model_file=str(path))


def encode_files(sp: Any, files: Sequence[SourceFile], threads: int = 1, chunk: int = 2000) -> np.ndarray:
    """One token stream: each file as ``[bos] + tokens + [eos]``, concatenated (uint16/int32).

    Encoded ``chunk`` files at a time on ``threads`` SentencePiece threads, so a
    large corpus never holds all its token lists at once."""
    dtype = np.uint16 if sp.get_piece_size() < 65536 else np.int32
    out = []
    for i in range(0, len(files), chunk):
        texts = [f.text for f in files[i:i + chunk]]
        for ids in sp.encode(texts, num_threads=threads):
            out.append(np.asarray([BOS_ID, *ids, EOS_ID], dtype=dtype))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


@dataclass
class Corpus:
    """Token streams of the train and held-out splits plus the tokenizer path."""

    tokenizer_path: Path
    train: np.ndarray
    heldout: np.ndarray
    n_train_files: int
    n_heldout_files: int
    n_train_bytes: int


def prepare_corpus(
    work_dir: Path, vocab_size: int = 2048, root: Path | None = None, seed: int = 0,
    max_files: int | None = None,
) -> Corpus:
    """Train (or reuse) the tokenizer and token streams cached in ``work_dir``.

    ``max_files`` keeps only the first files of each split (for fast tests).
    The cache is keyed by vocab size, file limit and corpus root, so changing
    any of them retrains.
    """
    work_dir = Path(work_dir)
    root = Path(root) if root is not None else stdlib_root()
    key = hashlib.sha256(f"{root}|{vocab_size}|{max_files}|{seed}".encode()).hexdigest()[:12]
    cache = work_dir / f"corpus-{key}"
    tok_path = cache / "tokenizer.model"
    train_path, held_path = cache / "train.npy", cache / "heldout.npy"
    meta_path = cache / "meta.txt"
    train_files, held_files = split_sources(root)
    if max_files is not None:
        train_files, held_files = train_files[:max_files], held_files[: max(1, max_files // 10)]
    if not (tok_path.exists() and train_path.exists() and held_path.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        train_tokenizer(train_files, tok_path, vocab_size=vocab_size, seed=seed)
        sp = load_tokenizer(tok_path)
        np.save(held_path, encode_files(sp, held_files))
        np.save(train_path, encode_files(sp, train_files))
        meta_path.write_text(f"root={root}\nvocab_size={vocab_size}\nmax_files={max_files}\n")
    return Corpus(
        tokenizer_path=tok_path,
        train=np.load(train_path),
        heldout=np.load(held_path),
        n_train_files=len(train_files),
        n_heldout_files=len(held_files),
        n_train_bytes=sum(len(s.text.encode("utf-8")) for s in train_files),
    )
