"""converters.corpus: the package corpus's de-duplication, held-out packages and license
record, on real distributions (small ones written into a temporary site directory, and
packages installed here)."""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

import pytest

from converters import corpus
from mtpcode.errors import DataError, UsageError

CODE = '''"""A module."""

import os


def walk(root):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            yield os.path.join(dirpath, name)
'''


def make_dist(site: Path, name: str, files: dict[str, str], *, version: str = "1.0",
              license_expr: str | None = "MIT", classifiers: tuple[str, ...] = ()) -> None:
    """A real installed distribution (dist-info with METADATA and RECORD) in ``site``."""
    for rel, text in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}"]
    if license_expr:
        meta.append(f"License-Expression: {license_expr}")
    meta += [f"Classifier: {c}" for c in classifiers]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def site(tmp_path) -> Path:
    site = tmp_path / "site"
    make_dist(site, "evalpkg", {"evalpkg/__init__.py": "", "evalpkg/core.py": CODE + "\nHELD = 1\n"})
    make_dist(site, "alpha", {
        "alpha/__init__.py": "from alpha.util import walk\n",
        "alpha/util.py": CODE,
        # a vendored copy of the held-out package, by path and by content
        "alpha/_compat/evalpkg/core.py": "x = 1\n",
        "alpha/copied.py": CODE + "\nHELD = 1\n",
    }, version="2.3.1", license_expr="Apache-2.0 OR BSD-2-Clause")
    make_dist(site, "beta", {
        "beta/__init__.py": "",
        "beta/util.py": CODE.replace("\n", "  \r\n"),  # the same code with CRLF and trailing blanks
        "beta/own.py": "def own():\n    return 42\n",
        "beta/table.py": "DATA = [" + ", ".join(str(i) for i in range(2000)) + "]\n",
    }, license_expr=None, classifiers=("License :: OSI Approved :: BSD License",))
    make_dist(site, "gamma", {"gamma/__init__.py": "def g():\n    pass\n"}, license_expr="GPL-3.0-only")
    return site


def by_name(result: corpus.CorpusFiles) -> dict[str, corpus.Package]:
    return {p.name: p for p in result.packages}


def test_duplicates_are_kept_once_in_package_order(site):
    result = corpus.build_corpus(["alpha", "beta"], ["evalpkg"], path=[str(site)])
    pkgs = by_name(result)
    paths = [f.rel_path for f in result.train]
    assert "alpha/alpha/util.py" in paths
    assert "beta/beta/util.py" not in paths  # same code, CRLF and trailing blanks do not count
    assert pkgs["beta"].skipped["duplicate"] == 1
    assert "beta/beta/own.py" in paths
    assert pkgs["beta"].skipped["generated"] == 1  # one 10 kB line of data
    # the other order keeps beta's copy instead
    swapped = corpus.build_corpus(["beta", "alpha"], ["evalpkg"], path=[str(site)])
    assert "beta/beta/util.py" in [f.rel_path for f in swapped.train]
    assert by_name(swapped)["alpha"].skipped["duplicate"] == 1


def test_heldout_packages_never_reach_training(site):
    result = corpus.build_corpus(["alpha", "beta"], ["evalpkg"], path=[str(site)])
    pkgs = by_name(result)
    assert [f.rel_path for f in result.heldout["evalpkg"]] == ["evalpkg/evalpkg/core.py"]
    train_paths = {f.rel_path for f in result.train}
    assert not any("evalpkg" in p for p in train_paths)  # the vendored directory
    assert "alpha/alpha/copied.py" not in train_paths  # a copy of a held-out file under another name
    assert pkgs["alpha"].skipped["heldout_copy"] == 2
    held_hashes = {corpus.normalized_hash(f.text) for f in result.heldout["evalpkg"]}
    assert not held_hashes & {corpus.normalized_hash(f.text) for f in result.train}
    with pytest.raises(UsageError, match="EvalPkg: held out"):
        corpus.build_corpus(["alpha", "EvalPkg"], ["evalpkg"], path=[str(site)])
    with pytest.raises(DataError, match="not installed"):
        corpus.build_corpus(["alpha"], ["nosuchpkg"], path=[str(site)])


def test_default_lists_hold_out_the_evaluation_packages():
    assert set(corpus.EVAL_PACKAGES) == {"click", "prompt_toolkit", "pygments"}
    train = {corpus.canonical(n) for n in corpus.DEFAULT_PACKAGES}
    assert not train & {corpus.canonical(n) for n in corpus.EVAL_PACKAGES}


def test_versions_and_licenses_are_recorded_and_only_permissive_code_is_used(site):
    result = corpus.build_corpus(["alpha", "beta", "gamma", "missing-pkg"], ["evalpkg"], path=[str(site)])
    manifest = result.manifest()
    records = {p["name"]: p for p in manifest["packages"]}
    assert records["alpha"]["version"] == "2.3.1"
    assert records["alpha"]["license"] == "Apache-2.0 OR BSD-2-Clause"
    assert records["beta"]["license"] == "BSD License"  # from the classifier
    assert records["gamma"]["status"] == "license" and records["gamma"]["license"] == "GPL-3.0-only"
    assert not any(f.rel_path.startswith("gamma/") for f in result.train)
    assert records["missing-pkg"]["status"] == "missing"
    assert records["evalpkg"]["role"] == "eval"
    assert manifest["train_files"] == len(result.train)
    assert manifest["train_bytes"] == sum(len(f.text.encode()) for f in result.train)
    json.dumps(manifest)  # JSON-ready
    again = corpus.build_corpus(["alpha", "beta", "gamma", "missing-pkg"], ["evalpkg"], path=[str(site)])
    assert again.manifest()["digest"] == manifest["digest"]


@pytest.mark.parametrize("text,ok", [
    ("MIT", True), ("Apache-2.0 OR BSD-2-Clause", True), ("GPL-2.0-or-later OR MIT", True),
    ("MPL-2.0 AND MIT", False), ("Apache-2.0 WITH LLVM-exception AND BSD-3-Clause", True),
    ("BSD License; Apache Software License", True), ("BSD License; GNU General Public License v3 (GPLv3)", False),
    ("(MIT OR Apache-2.0) AND Zlib", True), ("LGPL-3.0-only", False), ("unknown", False), ("", False),
    ("Proprietary", False),
])
def test_permissive_licenses(text, ok):
    assert corpus.is_permissive(text) is ok


def test_per_package_cap_is_deterministic(site):
    full = corpus.build_corpus(["alpha", "beta"], ["evalpkg"], path=[str(site)])
    capped = corpus.build_corpus(["alpha", "beta"], ["evalpkg"], path=[str(site)], max_package_bytes=100)
    alpha = [f for f in capped.train if f.rel_path.startswith("alpha/")]
    assert 0 < sum(len(f.text) for f in alpha) <= 100
    assert len(alpha) < len([f for f in full.train if f.rel_path.startswith("alpha/")])
    assert by_name(capped)["alpha"].skipped["over_cap"] >= 1
    again = corpus.build_corpus(["alpha", "beta"], ["evalpkg"], path=[str(site)], max_package_bytes=100)
    assert [f.rel_path for f in again.train] == [f.rel_path for f in capped.train]


# Real installed distributions: only ones the install command itself declares (platformdirs is a
# runtime dependency, httpx one of the test extra's, click the held-out package), never whatever
# else the machine happens to have.
def test_installed_packages_and_the_stdlib_split():
    result = corpus.build_corpus(["python", "platformdirs", "httpx"], ["click"])
    records = {p["name"]: p for p in result.manifest()["packages"]}
    assert records["platformdirs"]["version"] == md.version("platformdirs")
    assert records["httpx"]["version"] == md.version("httpx")
    assert records["click"]["role"] == "eval" and records["click"]["files"] > 5
    # the stdlib's held-out split (mtpcode bench's default prompts) is not trained on
    from converters import data

    stdlib = [f.rel_path.split("/", 1)[1] for f in result.train if f.rel_path.startswith("python/")]
    assert stdlib and not any(data.is_heldout(rel) for rel in stdlib)


def test_prepared_corpus_tokenizes_both_splits_and_is_cached(tmp_path, site):
    pytest.importorskip("sentencepiece")
    make_dist(site, "delta", {"delta/big.py": "\n".join(
        f"def f{i}(x, y={i}):\n    '''Return x plus {i}.'''\n    return x + y * {i}\n" for i in range(300))})
    kwargs = dict(path=[str(site)], char_coverage=0.99)
    pc = corpus.prepare_package_corpus(tmp_path, 300, ["alpha", "beta", "delta"], ["evalpkg"], **kwargs)
    assert set(pc.heldout_parts) == {"evalpkg"}
    assert len(pc.train) > 1000 and len(pc.heldout) == len(pc.heldout_parts["evalpkg"])
    manifest = json.loads(pc.manifest_path.read_text())
    assert manifest["train_tokens"] == len(pc.train)
    assert manifest["tokenizer"]["vocab_size"] == 300
    stamp = pc.tokenizer_path.stat().st_mtime_ns
    again = corpus.prepare_package_corpus(tmp_path, 300, ["alpha", "beta", "delta"], ["evalpkg"], **kwargs)
    assert again.tokenizer_path == pc.tokenizer_path and again.tokenizer_path.stat().st_mtime_ns == stamp


def test_cli_writes_the_record_and_heldout_prompts(tmp_path):
    out, prompts = tmp_path / "corpus.json", tmp_path / "prompts.jsonl"
    assert corpus.main(["--out", str(out), "--packages", "platformdirs", "--eval-packages", "click",
                        "--prompts-out", str(prompts), "--n-prompts", "5"]) == 0
    manifest = json.loads(out.read_text())
    assert [p["name"] for p in manifest["packages"]] == ["click", "platformdirs"]
    assert all(p["status"] == "used" for p in manifest["packages"])
    lines = [json.loads(x) for x in prompts.read_text().splitlines()]
    assert len(lines) == 5 and all(x["name"].startswith("click/") and x["prompt"] for x in lines)
    from mtpcode.bench.run import load_prompts

    assert len(load_prompts(prompts)) == 5
    assert corpus.main(["--out", str(out), "--packages", "click"]) == UsageError.exit_code
