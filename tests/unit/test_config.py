"""Settings precedence, the config file, and the model registry (no llama.cpp needed)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from mtpcode import config, models
from mtpcode.bundle import FileEntry, Manifest, open_bundle
from mtpcode.errors import DataError, ModelError, NoInputError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli, which the install brings there (pyproject: tomli; python_version < '3.11')
    import tomli as tomllib


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every mtpcode file at a fresh directory and clear MTPCODE_* from the environment."""
    for key in list(os.environ):
        if key.startswith("MTPCODE_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("MTPCODE_HOME", str(home))
    return home


def manifest_bundle(path: Path, n_future_tokens: int = 3) -> Path:
    """A directory that passes ``open_bundle``: manifest plus files of the listed sizes.

    The registry only ever reads the manifest; bundles that llama.cpp can run
    are used in test_models_cmd.py.
    """
    path.mkdir(parents=True)
    (path / "main.gguf").write_bytes(b"m" * 10)
    heads = []
    for k in range(1, n_future_tokens):
        (path / f"head-{k}.gguf").write_bytes(b"h" * k)
        heads.append(FileEntry(file=f"head-{k}.gguf", size=k, sha256="0" * 64))
    manifest = Manifest(
        n_future_tokens=n_future_tokens,
        n_trunk=2,
        n_embd=64,
        n_vocab=100,
        quantization="F32",
        fingerprint="f" * 16,
        main=FileEntry(file="main.gguf", size=10, sha256="0" * 64),
        heads=tuple(heads),
    )
    (path / "mtp.json").write_text(manifest.to_json())
    open_bundle(path)
    return path


# --- settings -------------------------------------------------------------------------


def test_defaults_and_locations(home: Path) -> None:
    s = config.load_settings()
    assert s.model is None and s.temperature == 0.0 and s.heads is None and s.ctx == 4096
    assert s.config_dir == home and s.data_dir == home and s.config_file == home / "config.toml"
    assert set(s.sources.values()) == {"default"}
    assert models.models_dir(s) == home / "models"


def test_separate_config_and_data_dirs(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTPCODE_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("MTPCODE_DATA_DIR", str(tmp_path / "data"))
    s = config.load_settings()
    assert s.config_file == tmp_path / "cfg" / "config.toml"
    assert models.models_dir(s) == tmp_path / "data" / "models"


def test_precedence_flag_over_env_over_config_over_default(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home.mkdir()
    (home / "config.toml").write_text('# mine\nthreads = 3\nheads = 2\ntemperature = 0.7\nmodel = "cfg-model"\n')
    monkeypatch.setenv("MTPCODE_HEADS", "1")
    monkeypatch.setenv("MTPCODE_TEMPERATURE", "0.2")
    s = config.load_settings(temperature=0.9, threads=None)
    assert s.threads == 3 and s.sources["threads"] == "config"
    assert s.heads == 1 and s.sources["heads"] == "env MTPCODE_HEADS"
    assert s.temperature == 0.9 and s.sources["temperature"] == "flag"
    assert s.model == "cfg-model"
    assert s.top_p == 1.0 and s.sources["top_p"] == "default"
    opts = s.generation_options(stop=("\n\n",))
    assert opts.heads == 1 and opts.sampling.temperature == 0.9 and opts.stop == ("\n\n",)
    assert s.engine_kwargs()["n_threads"] == 3


def test_env_none_means_automatic(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home.mkdir()
    (home / "config.toml").write_text("threads = 3\n")
    monkeypatch.setenv("MTPCODE_THREADS", "auto")
    assert config.load_settings().threads is None


def test_flash_attention_follows_offload_unless_set(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.load_settings().engine_kwargs()["flash_attn"] is False  # a CPU: off
    assert config.load_settings(gpu_layers=-1).engine_kwargs()["flash_attn"] is True  # offloaded: on
    assert config.load_settings(gpu_layers=20).use_flash_attn() is True
    assert config.load_settings().use_flash_attn(gpu_layers=-1) is True  # bench --gpu-layers
    monkeypatch.setenv("MTPCODE_FLASH_ATTN", "0")  # set: kept, offload or not
    assert config.load_settings(gpu_layers=-1).engine_kwargs()["flash_attn"] is False
    monkeypatch.setenv("MTPCODE_FLASH_ATTN", "1")
    assert config.load_settings().engine_kwargs()["flash_attn"] is True


@pytest.mark.parametrize(
    "env,value,message",
    [
        ("MTPCODE_THREADS", "many", "MTPCODE_THREADS: threads must be an integer"),
        ("MTPCODE_TEMPERATURE", "-1", "temperature=-1.0 (from env MTPCODE_TEMPERATURE): must be >= 0"),
        ("MTPCODE_TOP_P", "0", "must be in (0, 1]"),
        ("MTPCODE_ADAPTIVE", "maybe", "adaptive must be true or false"),
    ],
)
def test_bad_env_value_is_usage_error(
    home: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(UsageError) as info:
        config.load_settings()
    assert message in str(info.value)


def test_bad_flag_value_is_usage_error(home: Path) -> None:
    with pytest.raises(UsageError, match="heads=-1 .from flag.: must be >= 0"):
        config.load_settings(heads=-1)
    with pytest.raises(UsageError, match="threads_batch=0 .from flag.: must be at least 1"):
        config.load_settings(threads_batch=0)


def test_threads_batch_setting_reaches_the_engine(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home.mkdir()
    (home / "config.toml").write_text("threads_batch = 4\n")
    s = config.load_settings()
    assert s.threads_batch == 4 and s.engine_kwargs()["n_threads_batch"] == 4
    monkeypatch.setenv("MTPCODE_THREADS_BATCH", "auto")
    assert config.load_settings().engine_kwargs()["n_threads_batch"] is None  # the engine decides


@pytest.mark.parametrize(
    "text,message",
    [
        ("threads = [1\n", "is not valid TOML"),
        ("thread = 2\n", "unknown setting 'thread'"),
        ('threads = "2"\n', "threads must be an integer"),
        ("temperature = true\n", "temperature must be a number"),
        ("[section]\nx = 1\n", "unknown setting 'section'"),
    ],
)
def test_bad_config_file_is_data_error(home: Path, text: str, message: str) -> None:
    home.mkdir()
    (home / "config.toml").write_text(text)
    with pytest.raises(DataError) as info:
        config.load_settings()
    assert message in str(info.value) and str(home / "config.toml") in str(info.value)


def test_set_config_value_keeps_other_lines(home: Path) -> None:
    home.mkdir()
    path = home / "config.toml"
    path.write_text("# my comment\nthreads = 3  # cores\nheads = 2\n")
    config.set_config_value("heads", 1)
    config.set_config_value("model", 'odd "name" \\ \u00e9\t')
    config.set_config_value("threads", None)
    text = path.read_text()
    assert text.startswith("# my comment\n") and "threads" not in text
    data = tomllib.loads(text)
    assert data == {"heads": 1, "model": 'odd "name" \\ \u00e9\t'}
    assert config.load_settings().model == 'odd "name" \\ \u00e9\t'
    with pytest.raises(UsageError):
        config.set_config_value("nonsense", 1)


def test_toml_value_round_trips() -> None:
    for value in [0, -3, 0.1, 1e-7, True, False, "", "a\nb", "\x01\x7f", "日本"]:
        assert tomllib.loads(f"x = {config.toml_value(value)}")["x"] == value


# --- registry ---------------------------------------------------------------------------


def test_register_list_resolve(home: Path, tmp_path: Path) -> None:
    bundle = manifest_bundle(tmp_path / "b1")
    entry = models.register_model("small", bundle)
    assert entry.path == bundle.resolve() and not entry.default
    s = config.load_settings()
    assert [e.name for e in models.list_models(s) if not e.builtin] == ["small"]
    assert models.resolve_model("small", s) == bundle.resolve()
    # A bundle directory works without registering it.
    assert models.resolve_model(str(bundle), s) == bundle
    # The registry is plain JSON in the data directory.
    data = json.loads((home / "models.json").read_text())
    assert data["models"]["small"]["path"] == str(bundle.resolve())


def test_register_validates_and_refuses_duplicates(home: Path, tmp_path: Path) -> None:
    b1 = manifest_bundle(tmp_path / "b1")
    b2 = manifest_bundle(tmp_path / "b2")
    models.register_model("m", b1)
    models.register_model("m", b1)  # same path again: fine
    with pytest.raises(UsageError, match="already exists"):
        models.register_model("m", b2)
    assert models.register_model("m", b2, force=True).path == b2.resolve()
    with pytest.raises(NoInputError):
        models.register_model("x", tmp_path / "nope")
    (tmp_path / "notbundle").mkdir()
    with pytest.raises(ModelError, match="not an mtpcode bundle"):
        models.register_model("x", tmp_path / "notbundle")
    with pytest.raises(UsageError, match="bad model name"):
        models.register_model("a/b", b1)
    with pytest.raises(UsageError, match="reserved"):
        models.register_model("builtin", b1)


def test_default_model_in_config_file(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b1 = manifest_bundle(tmp_path / "b1")
    models.register_model("one", b1)
    with pytest.raises(ModelError, match="no model named 'two'"):
        models.set_default("two")
    cfg = models.set_default("one")
    assert tomllib.loads(cfg.read_text())["model"] == "one"
    s = config.load_settings()
    assert models.resolve_model(None, s) == b1.resolve()
    assert [e.default for e in models.list_models(s) if e.name == "one"] == [True]
    # The environment still overrides the config file's default.
    b2 = manifest_bundle(tmp_path / "b2")
    monkeypatch.setenv("MTPCODE_MODEL", str(b2))
    assert models.resolve_model(None, config.load_settings()) == b2
    monkeypatch.delenv("MTPCODE_MODEL")
    # Removing the default clears it.
    removed = models.remove_model("one")
    assert removed.default and config.load_settings().model is None
    assert b1.is_dir()  # unregistering keeps the files


def test_resolve_errors(home: Path, tmp_path: Path) -> None:
    s = config.load_settings()
    with pytest.raises(ModelError, match=r"unknown model 'nosuch'.*known models: (builtin|none)\."):
        models.resolve_model("nosuch", s)
    with pytest.raises(NoInputError, match="model not found"):
        models.resolve_model(str(tmp_path / "missing"), s)
    b = manifest_bundle(tmp_path / "gone")
    models.register_model("gone", b)
    shutil.rmtree(b)
    with pytest.raises(ModelError, match="no longer exists"):
        models.resolve_model("gone", s)
    with pytest.raises(ModelError, match="no model named"):
        models.remove_model("nosuch")


def test_no_model_at_all(home: Path) -> None:
    if models.builtin_model_path() is not None:
        assert models.resolve_model(None, config.load_settings()) == models.builtin_model_path()
        return
    with pytest.raises(ModelError, match="mtpcode convert.*mtpcode models add"):
        models.resolve_model(None, config.load_settings())
    with pytest.raises(ModelError, match="no built-in model"):
        models.resolve_model("builtin", config.load_settings())


def test_bundles_in_data_dir_are_stored_relative(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = manifest_bundle(models.models_dir() / "mine")
    models.register_model("mine", bundle)
    assert json.loads((home / "models.json").read_text())["models"]["mine"]["path"] == "models/mine"
    moved = tmp_path / "moved"
    shutil.move(str(home), moved)
    monkeypatch.setenv("MTPCODE_HOME", str(moved))
    assert models.resolve_model("mine", config.load_settings()) == moved / "models" / "mine"


def test_remove_deletes_files_only_in_models_dir(home: Path, tmp_path: Path) -> None:
    inside = manifest_bundle(models.models_dir() / "inside")
    outside = manifest_bundle(tmp_path / "outside")
    models.register_model("inside", inside)
    models.register_model("outside", outside)
    models.remove_model("inside", delete_files=True)
    assert not inside.exists()
    with pytest.raises(UsageError, match="kept"):
        models.remove_model("outside", delete_files=True)
    assert outside.is_dir() and [e.name for e in models.list_models() if not e.builtin] == []


def test_corrupt_registry_is_data_error(home: Path) -> None:
    home.mkdir()
    (home / "models.json").write_text("{not json")
    with pytest.raises(DataError, match="models.json"):
        models.list_models()


def test_default_model_name_for(tmp_path: Path) -> None:
    ckpt = tmp_path / "7B_1T_4"
    ckpt.mkdir()
    (ckpt / "consolidated.pth").write_bytes(b"")
    assert models.default_model_name_for(ckpt) == "7B_1T_4"
    assert models.default_model_name_for(ckpt / "consolidated.pth", quant="Q4_K_M") == "7B_1T_4-q4_k_m"
    assert models.default_model_name_for(tmp_path / "my ckpt!") == "my-ckpt"
    name = models.default_model_name_for(tmp_path / "builtin")
    assert models.validate_name(name) == name


# --- `mtpcode config` ------------------------------------------------------------------


def test_config_command(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mtpcode.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, ["config", *args], catch_exceptions=False)

    shown = run()
    assert shown.exit_code == 0 and "temperature = 0.0  # default" in shown.stdout
    assert run("path").stdout.strip() == str(home / "config.toml")
    assert run("set", "temperature", "0.25").exit_code == 0
    assert run("set", "heads", "2").exit_code == 0
    assert tomllib.loads((home / "config.toml").read_text()) == {"temperature": 0.25, "heads": 2}
    bad = run("set", "temperature", "-1")
    assert bad.exit_code == 2 and "must be >= 0" in bad.stderr
    assert run("set", "nonsense", "1").exit_code == 2
    assert tomllib.loads((home / "config.toml").read_text())["temperature"] == 0.25  # not written
    monkeypatch.setenv("MTPCODE_HEADS", "1")
    data = json.loads(run("show", "--json").stdout)
    assert data["settings"]["heads"] == 1 and data["sources"]["heads"] == "env MTPCODE_HEADS"
    assert data["sources"]["temperature"] == "config"
    assert run("unset", "heads").exit_code == 0
    assert "heads" not in tomllib.loads((home / "config.toml").read_text())


def test_one_setting_is_checked_alone_as_the_repl_set_needs():
    assert config.check_setting("top_p", "0.5") == 0.5
    assert config.check_setting("heads", "auto") is None
    assert config.check_setting("adaptive", "Off") is False
    for key, value, message in [
        ("top_p", "2", "top_p must be in (0, 1] (1 = off), not '2'"),
        ("top_k", "many", "top_k must be an integer, not 'many'"),
        ("temperature", "nan", "temperature must be >= 0 (0 = greedy), not 'nan'"),
        ("adaptive", "maybe", "adaptive must be true or false, not 'maybe'"),
        ("colour", "red", "unknown setting 'colour'"),
    ]:
        with pytest.raises(UsageError) as err:
            config.check_setting(key, value)
        assert str(err.value).startswith(message)
    # The same rules as load_settings and override_settings apply.
    settings = config.override_settings(config.load_settings(), "/set", top_p="0.5", seed="none")
    assert settings.top_p == 0.5 and settings.seed is None and settings.sources["top_p"] == "/set"
    with pytest.raises(UsageError, match=r"top_p=2.0 \(from /set\): must be in"):
        config.override_settings(settings, "/set", top_p="2")
    assert [config.parse_bool(t) for t in ("on", "YES", "1", "off", "False", "0")] == [True] * 3 + [False] * 3
    with pytest.raises(ValueError):
        config.parse_bool("maybe")


def test_config_show_never_prints_the_api_key(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mtpcode.cli import main

    monkeypatch.setenv("MTPCODE_API_KEY", "sekrit-123")
    for args in (["config"], ["config", "show", "--json"]):
        out = CliRunner().invoke(main, args, catch_exceptions=False).stdout
        assert "sekrit" not in out and "(set)" in out
    monkeypatch.delenv("MTPCODE_API_KEY")
    assert "api_key = (unset)" in CliRunner().invoke(main, ["config"], catch_exceptions=False).stdout


def test_parallel_slots_only_for_serve(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `parallel` setting sizes serve's engine; complete and the REPL run one request at a time."""
    monkeypatch.setenv("MTPCODE_PARALLEL", "4")
    s = config.load_settings()
    assert s.parallel == 4
    assert s.engine_kwargs()["n_seq"] == 1
    assert s.engine_kwargs(serving=True)["n_seq"] == 4
