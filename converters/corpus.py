"""A reproducible training corpus of Python source from named installed packages.

    python -m converters.corpus --out corpus.json [--packages a,b,c] [--eval-packages click,...]

Training data comes from a list of named distributions found on the machine
(``DEFAULT_PACKAGES``; ``python`` is the running interpreter's standard
library). For every package the builder records its version and its license
(from the distribution's metadata), and it uses only packages whose license
is permissive (MIT, BSD, Apache, PSF, ISC, ...); others are listed with the
reason they were left out.

Evaluation holds out whole packages (``EVAL_PACKAGES``: click, prompt_toolkit
and pygments), and none of their code may reach training: asking to train on
one of them is an error, a training file whose path runs through a directory
named like one of them (a vendored copy, e.g. ``pip/_vendor/pygments``) is
dropped, and so is any training file whose content equals a held-out file.

Files are de-duplicated by content (line endings and trailing whitespace
normalised) across all packages: the first occurrence in the package order
given wins, held-out packages first. Very large files and generated-looking
files (protobuf modules, very long lines) are skipped; a per-package byte cap
keeps a few huge packages from dominating, choosing files by a hash of their
path so the choice does not depend on listing order.

Everything is deterministic for a given set of installed packages; each
package's ``digest`` (SHA-256 over its kept files' paths and contents) says
whether two machines saw the same data.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import platform
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters import data
from mtpcode.errors import DataError, UsageError
from mtpcode.files import atomic_write_text

# Packages used to evaluate the model: never trained on.
EVAL_PACKAGES = ("click", "prompt_toolkit", "pygments")

# The drafting policy's tuning set (docs/PERFORMANCE.md: its constants were chosen on prompts
# from these): left out of DEFAULT_PACKAGES so that a model trained on the default list has
# not seen them. The first GPU-trained built-in model (2026-12-04) predates this and saw them.
TUNING_PACKAGES = ("setuptools", "pytest", "jinja2", "packaging")

# Distributions with permissively licensed Python source, most of them on the
# GPU machine's image; missing ones are recorded and skipped. "python" is the
# standard library of the running interpreter.
DEFAULT_PACKAGES = (
    "python", "numpy", "scipy", "pandas", "scikit-learn", "sympy", "networkx", "statsmodels", "scikit-image",
    "matplotlib", "seaborn", "xarray", "patsy", "formulaic", "torch", "torchvision", "torchaudio", "torchmetrics",
    "lightning", "pytorch-lightning", "torch-geometric", "transformers", "accelerate", "peft",
    "sentence-transformers", "timm", "safetensors", "huggingface-hub", "tokenizers", "einops", "jax", "flax",
    "optax", "chex", "equinox", "diffrax", "lineax", "optimistix", "numpyro", "jaxtyping", "orbax-checkpoint",
    "etils", "treescope", "triton", "numba", "cupy-cuda13x", "onnx", "onnxscript", "onnx-ir", "gpytorch",
    "botorch", "linear-operator", "h5py", "pyarrow", "tensorboard", "requests", "urllib3", "httpx", "httpcore",
    "anyio", "aiohttp", "yarl", "multidict", "attrs", "rich", "typer", "markupsafe", "werkzeug",
    "markdown", "markdown-it-py", "pyyaml", "pip", "wheel", "build", "pyparsing",
    "python-dateutil", "pluggy", "fsspec", "filelock", "cloudpickle", "toolz", "sortedcontainers",
    "wrapt", "tabulate", "humanize", "imageio", "tifffile", "lazy-loader", "contourpy", "cycler", "fonttools",
    "pillow", "psutil", "cython", "pybind11", "meson", "pyproject-hooks", "pathspec", "absl-py", "ml-dtypes",
    "opt-einsum", "regex", "lxml", "simplejson", "six", "idna", "charset-normalizer", "typing-extensions",
    "joblib", "threadpoolctl", "narwhals", "sacrebleu",
)
assert not set(DEFAULT_PACKAGES) & set(TUNING_PACKAGES + EVAL_PACKAGES)

MAX_FILE_BYTES = 300_000
MAX_LINE_CHARS = 2_000   # a longer line is data (tables, minified code), not code to learn from
MAX_MEAN_LINE = 100      # mean characters per line above this: generated or data
MAX_NON_ASCII = 0.05     # share of non-ASCII characters above this: Unicode tables or translations, not code
DEFAULT_PACKAGE_CAP = 30_000_000  # bytes of source kept per package
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "_vendor", "vendor", "_vendored",
                       "vendored", "third_party", "thirdparty", "_thirdparty", "externals", "_extern", "extern"})

# License names (SPDX ids, classifier and free-text spellings, lower-cased) that
# allow training on the code; anything with a copyleft or unknown term is not used.
_PERMISSIVE = re.compile(
    r"^(mit|mit-0|mit license|mit-cmu|bsd|bsd-2-clause|bsd-3-clause|0bsd|bsd license|new bsd|simplified bsd|"
    r"bsd-3-clause-clear|apache|apache-2\.0|apache 2\.0|apache software license|apache license 2\.0|"
    r"apache license, version 2\.0|psf|psf-2\.0|python-2\.0|python software foundation license|isc|"
    r"isc license \(iscl\)|zlib|zlib/libpng license|cc0-1\.0|unlicense|the unlicense \(unlicense\)|bsl-1\.0|"
    r"boost software license 1\.0 \(bsl-1\.0\)|hpnd|historical permission notice and disclaimer \(hpnd\)|"
    r"cnri-python|public domain|llvm-exception)$"
)


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (``Prompt_Toolkit`` -> ``prompt-toolkit``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _split_top(expr: str, word: str) -> list[str]:
    """Split an SPDX expression on a top-level operator (outside parentheses)."""
    parts, depth, start = [], 0, 0
    tokens = list(re.finditer(rf"\(|\)|\s{word}\s", expr))
    for m in tokens:
        if m.group() == "(":
            depth += 1
        elif m.group() == ")":
            depth -= 1
        elif depth == 0:
            parts.append(expr[start:m.start()])
            start = m.end()
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def _strip_parens(expr: str) -> str:
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        expr = expr[1:-1].strip()
    return expr


def is_permissive(license_text: str) -> bool:
    """Whether a license (SPDX expression, classifier names joined by '; ', or a name) allows training.

    ``A OR B`` needs one permissive alternative, ``A AND B`` (and several
    classifiers) needs all parts permissive; ``WITH`` exceptions must be known too.
    """
    text = license_text.strip()
    if not text or text == "unknown":
        return False
    if ";" in text:
        return all(is_permissive(part) for part in text.split(";"))
    text = _strip_parens(text)
    alternatives = _split_top(text, "OR")
    if len(alternatives) > 1:
        return any(is_permissive(a) for a in alternatives)
    conjuncts = _split_top(text, "AND")
    if len(conjuncts) > 1:
        return all(is_permissive(c) for c in conjuncts)
    pieces = [p.strip() for p in re.split(r"\s+WITH\s+", text)]
    return all(bool(_PERMISSIVE.match(_strip_parens(p).lower())) for p in pieces)


def license_of(meta: Any) -> str:
    """A distribution's license: its License-Expression, else its license classifiers, else its License field."""
    expr = (meta.get("License-Expression") or "").strip()
    if expr:
        return expr
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    classifiers = [c for c in classifiers if c not in ("OSI Approved",)]
    if classifiers:
        return "; ".join(classifiers)
    text = (meta.get("License") or "").strip()
    if text and text.upper() != "UNKNOWN":
        first = text.splitlines()[0].strip()
        return first[:80]
    return "unknown"


def normalized_hash(text: str) -> str:
    """Content hash used for de-duplication: line endings and trailing whitespace do not count."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return hashlib.sha256("\n".join(lines).strip("\n").encode("utf-8")).hexdigest()


def _path_key(rel_path: str) -> str:
    return hashlib.sha256(rel_path.encode("utf-8")).hexdigest()


def skip_reason(text: str, rel_path: str) -> str | None:
    """Why a source file should not be used, or None."""
    if rel_path.endswith(("_pb2.py", "_pb2_grpc.py")):
        return "generated"
    lines = text.split("\n")
    if any(len(line) > MAX_LINE_CHARS for line in lines):
        return "generated"
    if len(text) / max(1, len(lines)) > MAX_MEAN_LINE:
        return "generated"
    if not text.strip():
        return "empty"
    non_ascii = len(text) - len(text.encode("ascii", errors="ignore"))
    if non_ascii > MAX_NON_ASCII * len(text):
        return "non_ascii"
    return None


@dataclass
class Package:
    """One named package: where it came from, what was kept and why the rest was not."""

    name: str
    role: str  # "train" or "eval"
    status: str = "used"  # used | missing | license | empty
    version: str = ""
    license: str = ""
    files: list[data.SourceFile] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_bytes(self) -> int:
        return sum(len(f.text.encode("utf-8")) for f in self.files)

    def digest(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.rel_path.encode("utf-8") + b"\0" + normalized_hash(f.text).encode() + b"\n")
        return h.hexdigest()

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def record(self) -> dict[str, Any]:
        """The JSON record of this package (no file contents)."""
        out: dict[str, Any] = {"name": self.name, "role": self.role, "status": self.status,
                               "version": self.version, "license": self.license}
        if self.status == "used":
            out.update(files=len(self.files), bytes=self.n_bytes, digest=self.digest())
        if self.skipped:
            out["skipped"] = dict(sorted(self.skipped.items()))
        return out


def distribution_index(path: Sequence[str] | None = None) -> dict[str, md.Distribution]:
    """Installed distributions by canonical name; of several copies on the path the first wins, as for import."""
    found = md.distributions(path=list(path)) if path is not None else md.distributions()
    index: dict[str, md.Distribution] = {}
    for dist in found:
        index.setdefault(canonical(dist.metadata["Name"] or ""), dist)
    return index


def _distribution_files(dist: md.Distribution) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of a distribution's installed ``*.py`` files, sorted by path."""
    out = []
    for entry in dist.files or []:
        rel = entry.as_posix()
        if not rel.endswith(".py") or rel.startswith("..") or ".dist-info/" in rel or ".egg-info/" in rel:
            continue
        if any(part in SKIP_DIRS for part in rel.split("/")[:-1]):
            continue
        out.append((rel, Path(str(dist.locate_file(entry)))))
    return sorted(out)


def _stdlib_files() -> list[tuple[str, Path]]:
    """The standard library's files, without converters.data's held-out split (5% of the files by
    a hash of the path: mtpcode bench's default prompts come from it, so they stay unseen)."""
    root = data.stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in data.SKIP_DIRS or part in SKIP_DIRS for part in rel.split("/")[:-1]) or data.is_heldout(rel):
            continue
        out.append((rel, path))
    return out


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def load_package(name: str, role: str, index: dict[str, md.Distribution]) -> tuple[Package, list[tuple[str, Path]]]:
    """Resolve a package by name (in ``index``, see :func:`distribution_index`): its record
    (version, license, status) and its candidate files."""
    if canonical(name) == "python":
        pkg = Package("python", role, version=platform.python_version(), license="PSF-2.0")
        return pkg, _stdlib_files()
    dist = index.get(canonical(name))
    if dist is None:
        return Package(name, role, status="missing"), []
    pkg = Package(dist.metadata["Name"] or name, role, version=dist.version, license=license_of(dist.metadata))
    return pkg, _distribution_files(dist)


@dataclass
class CorpusFiles:
    """The corpus: training and held-out files with the record of every package."""

    packages: list[Package]

    @property
    def train(self) -> list[data.SourceFile]:
        return [f for p in self.packages if p.role == "train" and p.status == "used" for f in p.files]

    @property
    def heldout(self) -> dict[str, list[data.SourceFile]]:
        return {p.name: p.files for p in self.packages if p.role == "eval" and p.status == "used"}

    def manifest(self) -> dict[str, Any]:
        used = [p for p in self.packages if p.status == "used"]
        return {
            "format": "mtpcode-corpus", "format_version": 1,
            "python": platform.python_version(),
            "eval_packages": [p.name for p in self.packages if p.role == "eval"],
            "train_files": len(self.train),
            "train_bytes": sum(p.n_bytes for p in used if p.role == "train"),
            "heldout_files": sum(len(v) for v in self.heldout.values()),
            "heldout_bytes": sum(p.n_bytes for p in used if p.role == "eval"),
            "digest": hashlib.sha256("".join(p.digest() for p in used).encode()).hexdigest(),
            "packages": [p.record() for p in self.packages],
        }


def build_corpus(packages: Iterable[str] = DEFAULT_PACKAGES, eval_packages: Iterable[str] = EVAL_PACKAGES, *,
                 max_package_bytes: int = DEFAULT_PACKAGE_CAP, path: Sequence[str] | None = None,
                 require_eval: bool = True) -> CorpusFiles:
    """Collect, filter and de-duplicate the sources of ``packages`` (training) and ``eval_packages`` (held out).

    ``path``: where to look for distributions (default ``sys.path``).
    ``require_eval``: a held-out package that is not installed is a DataError
    (evaluation would silently shrink); off, it is recorded as missing.
    """
    eval_list = list(dict.fromkeys(eval_packages))
    train_list = list(dict.fromkeys(packages))
    eval_names = {canonical(n) for n in eval_list}
    # import names of held-out packages, to catch vendored copies ("pip/_vendor/pygments/...")
    eval_dirs = {canonical(n).replace("-", "_") for n in eval_list}
    clash = [n for n in train_list if canonical(n) in eval_names]
    if clash:
        raise UsageError(f"{', '.join(clash)}: held out for evaluation, so never trained on; "
                         "remove it from the training packages")
    index = distribution_index(path)
    seen: dict[str, str] = {}  # content hash -> package that kept it
    heldout_hashes: set[str] = set()
    result: list[Package] = []
    for role, names in (("eval", eval_list), ("train", train_list)):
        for name in names:
            pkg, candidates = load_package(name, role, index)
            result.append(pkg)
            if pkg.status == "missing":
                if role == "eval" and require_eval:
                    raise DataError(f"held-out package {name} is not installed here; install it or "
                                    "pass --eval-packages without it")
                continue
            if role == "train" and not is_permissive(pkg.license):
                pkg.status = "license"
                continue
            kept: list[data.SourceFile] = []
            for rel, abs_path in candidates:
                dirs = {part.lower() for part in rel.split("/")[:-1]}
                if role == "train" and dirs & eval_dirs:
                    pkg.skip("heldout_copy")
                    continue
                text = _read(abs_path)
                if text is None:
                    pkg.skip("unreadable_or_large")
                    continue
                reason = skip_reason(text, rel)
                if reason:
                    pkg.skip(reason)
                    continue
                digest = normalized_hash(text)
                if digest in heldout_hashes and role == "train":
                    pkg.skip("heldout_copy")
                    continue
                if digest in seen:
                    pkg.skip("duplicate")
                    continue
                seen[digest] = pkg.name
                if role == "eval":
                    heldout_hashes.add(digest)
                kept.append(data.SourceFile(f"{canonical(pkg.name)}/{rel}", text))
            if role == "train":
                kept = _cap(kept, max_package_bytes, pkg)
            pkg.files = sorted(kept, key=lambda f: f.rel_path)
            if not pkg.files:
                pkg.status = "empty"
    return CorpusFiles(result)


def _cap(files: list[data.SourceFile], cap: int, pkg: Package) -> list[data.SourceFile]:
    """Keep files in order of a hash of their path until ``cap`` bytes (deterministic, listing-order free)."""
    total = sum(len(f.text.encode("utf-8")) for f in files)
    if total <= cap:
        return files
    out, size = [], 0
    for f in sorted(files, key=lambda f: _path_key(f.rel_path)):
        n = len(f.text.encode("utf-8"))
        if size + n > cap:
            pkg.skip("over_cap")
            continue
        out.append(f)
        size += n
    return out


def tokenizer_sample(files: Sequence[data.SourceFile], max_bytes: int) -> list[data.SourceFile]:
    """The files the tokenizer trains on: all of them, or those first in path-hash order up to ``max_bytes``."""
    if sum(len(f.text) for f in files) <= max_bytes:
        return list(files)
    out, size = [], 0
    for f in sorted(files, key=lambda f: _path_key(f.rel_path)):
        if size + len(f.text) > max_bytes:
            continue
        out.append(f)
        size += len(f.text)
    return sorted(out, key=lambda f: f.rel_path)


@dataclass
class PackageCorpus(data.Corpus):
    """data.Corpus of a package corpus, plus the held-out stream of each held-out package."""

    heldout_parts: dict[str, np.ndarray] = field(default_factory=dict)
    manifest_path: Path | None = None


MANIFEST_NAME = "corpus.json"


def prepare_package_corpus(work_dir: Path, vocab_size: int, packages: Sequence[str] = DEFAULT_PACKAGES,
                           eval_packages: Sequence[str] = EVAL_PACKAGES, *, seed: int = 0,
                           max_package_bytes: int = DEFAULT_PACKAGE_CAP, tokenizer_bytes: int = 40_000_000,
                           char_coverage: float = 0.9995, threads: int = 1, path: Sequence[str] | None = None,
                           progress: Any = None) -> PackageCorpus:
    """Build the corpus, train the tokenizer on (a sample of) its training files, encode both splits.

    Cached in ``work_dir`` under a key of the corpus digest and the settings,
    so the same data and settings reuse the tokenizer and token streams.
    """
    say = progress or (lambda msg: None)
    corpus = build_corpus(packages, eval_packages, max_package_bytes=max_package_bytes, path=path)
    manifest = corpus.manifest()
    train_files, held = corpus.train, corpus.heldout
    if not train_files:
        raise DataError("no training files: none of the named packages is installed with a permissive license")
    say(f"corpus: {manifest['train_files']} training files ({manifest['train_bytes'] / 1e6:.1f} MB), "
        f"{manifest['heldout_files']} held-out files ({manifest['heldout_bytes'] / 1e6:.1f} MB)")
    settings = f"{manifest['digest']}|{vocab_size}|{tokenizer_bytes}|{char_coverage}|{seed}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:12]
    cache = Path(work_dir) / f"packages-{key}"
    tok_path = cache / "tokenizer.model"
    train_path = cache / "train.npy"
    part_paths = {name: cache / f"heldout-{canonical(name)}.npy" for name in held}
    sample = tokenizer_sample(train_files, tokenizer_bytes)
    manifest["tokenizer"] = {"vocab_size": vocab_size, "sample_files": len(sample),
                             "sample_bytes": sum(len(f.text.encode("utf-8")) for f in sample),
                             "character_coverage": char_coverage, "seed": seed}
    if not (tok_path.exists() and train_path.exists() and all(p.exists() for p in part_paths.values())):
        cache.mkdir(parents=True, exist_ok=True)
        say(f"tokenizer: {len(sample)} files, vocabulary {vocab_size}")
        data.train_tokenizer(sample, tok_path, vocab_size=vocab_size, seed=seed,
                             character_coverage=char_coverage, num_threads=threads)
        sp = data.load_tokenizer(tok_path)
        say("encoding")
        for name, files in held.items():
            np.save(part_paths[name], data.encode_files(sp, files, threads))
        np.save(train_path, data.encode_files(sp, train_files, threads))
    parts = {name: np.load(p) for name, p in part_paths.items()}
    train_stream = np.load(train_path)
    manifest["train_tokens"] = len(train_stream)
    manifest["heldout_tokens"] = {name: len(v) for name, v in parts.items()}
    manifest_path = cache / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return PackageCorpus(
        tokenizer_path=tok_path,
        train=train_stream,
        heldout=np.concatenate(list(parts.values())) if parts else np.zeros(0, dtype=train_stream.dtype),
        n_train_files=len(train_files),
        n_heldout_files=sum(len(v) for v in held.values()),
        n_train_bytes=manifest["train_bytes"],
        heldout_parts=parts,
        manifest_path=manifest_path,
    )


def heldout_prompts(files: Sequence[data.SourceFile], per_file: int = 2, max_chars: int = 400,
                    min_lines: int = 40) -> list[tuple[str, str]]:
    """(name, prompt) pairs cut from held-out files: the whole lines (≤ ``max_chars``) before a
    non-blank line, at evenly spaced places in each file of at least ``min_lines`` lines. Deterministic."""
    prompts = []
    for src in files:
        lines = src.text.split("\n")
        if len(lines) < min_lines:
            continue
        for j in range(per_file):
            cut = (j + 1) * len(lines) // (per_file + 1)
            while cut < len(lines) - 1 and not lines[cut].strip():
                cut += 1
            start, size = cut, 0
            while start > 0 and size + len(lines[start - 1]) + 1 <= max_chars:
                start -= 1
                size += len(lines[start]) + 1
            if start < cut:
                prompts.append((f"{src.rel_path}:{cut + 1}", "\n".join(lines[start:cut]) + "\n"))
    return prompts


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced over ``items`` (all of them if there are fewer)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def parse_list(value: str | None, default: Sequence[str]) -> list[str]:
    """A comma-separated package list; empty or None gives ``default``."""
    if not value:
        return list(default)
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="write the corpus record (JSON) here")
    ap.add_argument("--packages", help="comma-separated training packages (default: the built-in list)")
    ap.add_argument("--eval-packages", help=f"comma-separated held-out packages (default: {','.join(EVAL_PACKAGES)})")
    ap.add_argument("--max-package-mb", type=float, default=DEFAULT_PACKAGE_CAP / 1e6)
    ap.add_argument("--prompts-out", type=Path, metavar="FILE.jsonl",
                    help="also write prompts cut from the held-out packages (for `mtpcode bench --prompts`)")
    ap.add_argument("--n-prompts", type=int, default=48, help="number of held-out prompts [default: 48]")
    ap.add_argument("--prompt-chars", type=int, default=400, help="characters per held-out prompt [default: 400]")
    args = ap.parse_args(argv)
    try:
        corpus = build_corpus(parse_list(args.packages, DEFAULT_PACKAGES),
                              parse_list(args.eval_packages, EVAL_PACKAGES),
                              max_package_bytes=int(args.max_package_mb * 1e6))
    except (UsageError, DataError) as exc:
        print(f"corpus: error: {exc}", file=sys.stderr)
        return exc.exit_code
    manifest = corpus.manifest()

    atomic_write_text(args.out, json.dumps(manifest, indent=1) + "\n")
    if args.prompts_out is not None:
        files = [f for fs in corpus.heldout.values() for f in fs]
        pairs = spread(heldout_prompts(files, max_chars=args.prompt_chars), args.n_prompts)
        atomic_write_text(args.prompts_out, "".join(json.dumps({"name": name, "prompt": text}) + "\n"
                                                    for name, text in pairs))
    for p in manifest["packages"]:
        size = f"{p['files']:6d} files {p['bytes'] / 1e6:8.2f} MB" if p["status"] == "used" else p["status"]
        print(f"{p['role']:5s} {p['name'][:28]:28s} {p['version'][:14]:14s} {p['license'][:40]:40s} {size}")
    print(f"train: {manifest['train_files']} files, {manifest['train_bytes'] / 1e6:.1f} MB; "
          f"held out: {manifest['heldout_files']} files, {manifest['heldout_bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
