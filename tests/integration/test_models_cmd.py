"""`mtpcode models list | add | remove | default | show` on real converted bundles."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtpcode.cli import main
from mtpcode.config import load_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # the project declares tomli for 3.10
    import tomli as tomllib


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_empty_list_says_how_to_get_a_model() -> None:
    result = run("models", "list")
    assert result.exit_code == 0
    if "builtin" not in result.stdout:
        assert result.stdout == ""
        assert "mtpcode convert" in result.stderr


def test_add_list_show_default_remove(tiny_bundle: Path) -> None:
    result = run("models", "add", "tiny", str(tiny_bundle))
    assert result.exit_code == 0, result.stderr
    assert "registered tiny" in result.stderr and result.stdout == ""

    listed = run("models", "list")
    assert listed.exit_code == 0
    line = next(ln for ln in listed.stdout.splitlines() if " tiny " in ln)
    assert "F32" in line and "3 heads" in line and str(tiny_bundle.resolve()) in line
    rows = json.loads(run("models", "list", "--json").stdout)
    row = next(r for r in rows if r["name"] == "tiny")
    sizes = sum(p.stat().st_size for p in tiny_bundle.glob("*.gguf"))
    assert row["ok"] and row["heads"] == 3 and row["size"] == sizes and not row["default"]

    shown = run("models", "show", "tiny", "--json")
    assert shown.exit_code == 0
    info = json.loads(shown.stdout)
    manifest = json.loads((tiny_bundle / "mtp.json").read_text())
    assert info["heads"] == 3 and info["n_future_tokens"] == 4 == manifest["n_future_tokens"]
    assert info["quantization"] == manifest["quantization"]
    assert [f["file"] for f in info["files"]] == ["main.gguf", "head-1.gguf", "head-2.gguf", "head-3.gguf"]
    assert [f["size"] for f in info["files"]] == [(tiny_bundle / f["file"]).stat().st_size for f in info["files"]]
    text = run("models", "show", "tiny").stdout
    assert "heads:         3 extra (n_future_tokens 4)" in text and "head-3.gguf" in text

    result = run("models", "default", "tiny")
    assert result.exit_code == 0 and "default model is now tiny" in result.stderr
    settings = load_settings()
    assert tomllib.loads(settings.config_file.read_text())["model"] == "tiny"
    assert any(r["name"] == "tiny" and r["default"] for r in json.loads(run("models", "list", "--json").stdout))
    assert run("models", "list").stdout.startswith("* tiny")

    result = run("models", "remove", "tiny")
    assert result.exit_code == 0 and "was the default" in result.stderr
    assert tiny_bundle.is_dir()
    assert "tiny" not in run("models", "list").stdout


def test_show_a_bundle_path(tiny_bundle: Path) -> None:
    result = run("models", "show", str(tiny_bundle))
    assert result.exit_code == 0 and "quantization:  F32" in result.stdout


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["models", "show", "nosuch"], 69, "unknown model 'nosuch'"),
        (["models", "remove", "nosuch"], 69, "no model named 'nosuch'"),
        (["models", "default", "nosuch"], 69, "no model named 'nosuch'"),
        (["models", "add", "x", "/nonexistent/bundle"], 66, "model not found"),
        (["models", "add", "bad/name", "."], 2, "bad model name"),
    ],
)
def test_errors(args: list[str], code: int, message: str) -> None:
    result = run(*args)
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("mtpcode: error: ") and message in result.stderr
    assert "Traceback" not in result.output


def test_broken_bundles_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing-head"
    shutil.copytree(tiny_bundle, missing)
    (missing / "head-2.gguf").unlink()
    result = run("models", "add", "broken", str(missing))
    assert result.exit_code == 69 and "missing head-2.gguf" in result.stderr

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_bundle, truncated)
    with open(truncated / "head-1.gguf", "r+b") as f:
        f.truncate(100)
    result = run("models", "show", str(truncated))
    assert result.exit_code == 69 and "truncated" in result.stderr

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_bundle, mismatched)
    manifest = json.loads((mismatched / "mtp.json").read_text())
    manifest["n_future_tokens"] = 5
    (mismatched / "mtp.json").write_text(json.dumps(manifest))
    result = run("models", "add", "mm", str(mismatched))
    assert result.exit_code == 69 and "n_future_tokens=5 but 3 head files" in result.stderr

    # A registered bundle that breaks later shows up as BROKEN in the list.
    good = tmp_path / "good"
    shutil.copytree(tiny_bundle, good)
    assert run("models", "add", "good", str(good)).exit_code == 0
    (good / "head-3.gguf").unlink()
    listed = run("models", "list")
    assert listed.exit_code == 0 and "BROKEN" in listed.stdout and "missing head-3.gguf" in listed.stdout
