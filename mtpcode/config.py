"""Settings: built-in defaults < config file < environment < command-line flags.

The config file is a flat TOML file, ``config.toml`` in the user config
directory (``platformdirs``), e.g.::

    model = "7b-q4"        # a registered name or a bundle directory
    temperature = 0.0
    threads = 8
    heads = 3

Every setting can be overridden with an environment variable ``MTPCODE_<KEY>``
(``MTPCODE_MODEL``, ``MTPCODE_THREADS``, ``MTPCODE_HEADS``, ...) and most with
a flag of the command being run. Where the files live can itself be moved,
which is what tests and portable installs do:

* ``MTPCODE_HOME``        config and data both in this one directory
* ``MTPCODE_CONFIG_DIR``  the directory of ``config.toml``
* ``MTPCODE_DATA_DIR``    the directory of the model registry and ``models/``
* ``MTPCODE_CONFIG``      the config file itself
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpcode.errors import DataError, UsageError
from mtpcode.files import atomic_write_text
from mtpcode.generation import GenerationOptions, SamplingOptions
from mtpcode.policy.store import PolicyStore

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

APP_NAME = "mtpcode"
CONFIG_NAME = "config.toml"
ENV_PREFIX = "MTPCODE_"
# Values of the extra_bufts setting, resolved by mtpcode.llama.use_extra_bufts.
# Defined here, not there, so that reading settings does not import llama.cpp.
EXTRA_BUFTS_POLICIES = ("auto", "on", "off", "repack")


@dataclass(frozen=True)
class Settings:
    """Effective settings of one mtpcode invocation.

    ``None`` means "let the runtime decide": all heads the bundle has, as many
    threads as llama.cpp picks, a random seed, the model from
    :func:`mtpcode.models.resolve_model`'s fallback order.
    """

    model: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    heads: int | None = None
    adaptive: bool = True
    context_draft: bool = True  # draft from the context (prompt, suffix, output) too, when heads draft
    repeat_stop: bool = True  # stop a degenerate loop (mtpcode.stops.RepeatStop)
    # llama.cpp threads: ``threads`` for one-row forwards (steps; None: 1 under 50M parameters, else every
    # core), ``threads_batch`` for several rows (prefill, verify; None: as many as ``threads``)
    threads: int | None = None
    threads_batch: int | None = None
    gpu_layers: int = 0
    ctx: int = 4096
    batch: int = 512
    # Slots of `mtpcode serve`: requests that run at once, batched, each with its own KV cache
    # (llama-server's -np). None: 4 for --http (several editors), 1 for --stdio (one client).
    parallel: int | None = None
    extra_bufts: str = "auto"
    # Off: llama.cpp's CPU flash-attention kernel walks the KV cache once per query row, so a verify of
    # b rows costs nearly b steps at editor-sized contexts (docs/PERFORMANCE.md); on a GPU it pays.
    flash_attn: bool = False
    api_key: str | None = None  # `mtpcode serve --http`: require `Authorization: Bearer KEY`
    # Where things live (not settable from the config file itself).
    config_dir: Path = field(default_factory=lambda: config_dir())
    data_dir: Path = field(default_factory=lambda: data_dir())
    config_file: Path = field(default_factory=lambda: config_file())
    # For each setting, where its value came from: "default", "config", "env MTPCODE_X" or "flag".
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, seed=self.seed
        )

    def generation_options(self, **changes: Any) -> GenerationOptions:
        """GenerationOptions from these settings; ``changes`` overrides fields (e.g. ``stop``)."""
        opts = GenerationOptions(
            max_tokens=self.max_tokens, sampling=self.sampling(), heads=self.heads, adaptive=self.adaptive,
            context_draft=None if self.context_draft else False, repeat_stop=self.repeat_stop,
        )
        return dataclasses.replace(opts, **changes)

    def use_flash_attn(self, gpu_layers: int | None = None) -> bool:
        """Flash attention as set; unset, on when layers are offloaded (``gpu_layers``, default the
        setting) and off on a CPU (on the CPU its kernel makes a verify of b rows cost nearly b
        steps; on the first GPU measured, an H200, it made every forward faster: docs/gpu.md)."""
        if self.sources.get("flash_attn", "default") != "default":
            return self.flash_attn
        return (self.gpu_layers if gpu_layers is None else gpu_layers) != 0

    def engine_kwargs(self, *, serving: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``mtpcode.runtime.Engine``; ``serving``: for ``mtpcode serve``,
        with its ``parallel`` slots (the other commands run one request at a time)."""
        return {
            "n_ctx": self.ctx,
            "n_batch": self.batch,
            "n_threads": self.threads,
            "n_threads_batch": self.threads_batch,
            "n_gpu_layers": self.gpu_layers,
            "extra_bufts": self.extra_bufts,
            "flash_attn": self.use_flash_attn(),
            "n_seq": (self.parallel or 1) if serving else 1,
            "policies": PolicyStore(cache_dir() / "policy"),
        }


# The user-settable keys, with their types ("int?" = int or None).
_KEYS: dict[str, str] = {
    "model": "str?",
    "max_tokens": "int",
    "temperature": "float",
    "top_k": "int",
    "top_p": "float",
    "min_p": "float",
    "seed": "int?",
    "heads": "int?",
    "adaptive": "bool",
    "context_draft": "bool",
    "repeat_stop": "bool",
    "threads": "int?",
    "threads_batch": "int?",
    "gpu_layers": "int",
    "ctx": "int",
    "batch": "int",
    "parallel": "int?",
    "extra_bufts": "str",
    "flash_attn": "bool",
    "api_key": "str?",
}
SETTING_KEYS: tuple[str, ...] = tuple(_KEYS)


# --- where files live -------------------------------------------------------------


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    """Directory of ``config.toml`` (MTPCODE_CONFIG_DIR, MTPCODE_HOME, else the platform's)."""
    explicit = _env_path("MTPCODE_CONFIG_DIR") or _env_path("MTPCODE_HOME")
    if explicit is not None:
        return explicit
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def data_dir() -> Path:
    """Directory of the model registry and the converted bundles
    (MTPCODE_DATA_DIR, MTPCODE_HOME, else the platform's)."""
    explicit = _env_path("MTPCODE_DATA_DIR") or _env_path("MTPCODE_HOME")
    if explicit is not None:
        return explicit
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    """Directory of things mtpcode can rebuild: synthetic benchmark bundles, learned drafting
    policies (MTPCODE_CACHE_DIR, MTPCODE_HOME/cache, else the platform's)."""
    explicit = _env_path("MTPCODE_CACHE_DIR")
    if explicit is not None:
        return explicit
    home = _env_path("MTPCODE_HOME")
    if home is not None:
        return home / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def config_file() -> Path:
    """The config file (MTPCODE_CONFIG, else ``config.toml`` in :func:`config_dir`)."""
    return _env_path("MTPCODE_CONFIG") or config_dir() / CONFIG_NAME


# --- values ------------------------------------------------------------------------


def _coerce(key: str, value: Any, where: str, error: type[Exception]) -> Any:
    """Check/convert ``value`` for setting ``key``. Strings (from env/flags) are parsed."""
    kind = _KEYS[key]
    prefix = f"{where}: " if where else ""
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("", "none", "auto"):
            return None
        try:
            if base == "int":
                return int(text)
            if base == "float":
                return float(text)
            if base == "bool":
                return parse_bool(text)
            return value
        except ValueError:
            raise error(f"{prefix}{key} must be {_describe(base)}, not {value!r}") from None
    if value is None and optional:
        return None
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[base]
    if not ok:
        raise error(f"{prefix}{key} must be {_describe(base)}, not {value!r}")
    return float(value) if base == "float" else value


def _describe(base: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[base]


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` -> True, ``0/false/no/off`` -> False (any case); ValueError otherwise."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# The range of each setting, checked once values are parsed: (test, the rule in words).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: v >= 1, "must be at least 1"),
    "temperature": (lambda v: v >= 0 and math.isfinite(v), "must be >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)"),
    "min_p": (lambda v: 0 <= v < 1, "must be in [0, 1) (0 = off)"),
    "heads": (lambda v: v is None or v >= 0, "must be >= 0 (0 = no speculation)"),
    "threads": (lambda v: v is None or v >= 1, "must be at least 1"),
    "threads_batch": (lambda v: v is None or v >= 1, "must be at least 1"),
    "gpu_layers": (lambda v: v >= -1, "must be >= 0, or -1 for all layers"),
    "ctx": (lambda v: v >= 16, "must be at least 16 tokens"),
    "batch": (lambda v: v >= 1, "must be at least 1"),
    "parallel": (lambda v: v is None or 1 <= v <= 64, "must be from 1 to 64"),
    "seed": (lambda v: v is None or v >= 0, "must be >= 0"),
    "extra_bufts": (lambda v: v in EXTRA_BUFTS_POLICIES, "must be " + ", ".join(EXTRA_BUFTS_POLICIES)),
}


def _validate(values: dict[str, Any], sources: Mapping[str, str]) -> None:
    for key, (ok, rule) in _RULES.items():
        if not ok(values[key]):
            raise UsageError(f"{key}={values[key]!r} (from {sources.get(key, 'default')}): {rule}")


def check_setting(key: str, value: Any) -> Any:
    """One setting's ``value`` (text as typed, or already typed) parsed and checked on its own.

    For an interactive ``/set KEY VALUE``, where the provenance that
    :func:`load_settings` names is not needed: UsageError ``"KEY must be ..., not VALUE"``.
    Apply the result with :func:`override_settings`.
    """
    if key not in _KEYS:
        raise UsageError(f"unknown setting {key!r} (known: {', '.join(SETTING_KEYS)})")
    parsed = _coerce(key, value, "", UsageError)
    ok, rule = _RULES.get(key, (lambda v: True, ""))
    if not ok(parsed):
        raise UsageError(f"{key} {rule}, not {value!r}")
    return parsed


def read_config_file(path: Path | None = None) -> dict[str, Any]:
    """Parse the config file; a missing file is an empty config.

    Raises DataError for a file that is not valid TOML or has unknown keys or
    values of the wrong type, naming the file.
    """
    path = path or config_file()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise DataError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            known = ", ".join(SETTING_KEYS)
            raise DataError(f"config file {path}: unknown setting {key!r} (known: {known})")
        if isinstance(value, str) and _KEYS[key].rstrip("?") != "str":
            raise DataError(f"config file {path}: {key} must be {_describe(_KEYS[key].rstrip('?'))}, not {value!r}")
        values[key] = _coerce(key, value, f"config file {path}", DataError)
    return values


def load_settings(**cli_overrides: Any) -> Settings:
    """Effective settings: flags (``cli_overrides``) > ``MTPCODE_*`` env > config file > defaults.

    ``cli_overrides`` uses the setting names (``model=``, ``threads=``, ...);
    ``None`` values mean "flag not given" and are ignored, so click options can
    be passed straight through. Raises UsageError for a bad flag or env value
    and DataError for a bad config file.
    """
    unknown = set(cli_overrides) - set(_KEYS)
    if unknown:
        raise TypeError(f"load_settings: unknown settings {sorted(unknown)}")
    defaults = Settings.__dataclass_fields__
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in _KEYS:
        f = defaults[key]
        values[key] = f.default
        sources[key] = "default"
    cfile = config_file()
    for key, value in read_config_file(cfile).items():
        values[key] = value
        sources[key] = "config"
    for key in _KEYS:
        env_name = ENV_PREFIX + key.upper()
        raw = os.environ.get(env_name)
        if raw is not None and raw.strip() != "":
            values[key] = _coerce(key, raw, f"environment variable {env_name}", UsageError)
            sources[key] = f"env {env_name}"
    for key, value in cli_overrides.items():
        if value is not None:
            values[key] = _coerce(key, value, "command line", UsageError)
            sources[key] = "flag"
    _validate(values, sources)
    return Settings(
        **values,
        config_dir=config_dir(),
        data_dir=data_dir(),
        config_file=cfile,
        sources=sources,
    )


def override_settings(settings: Settings, source: str = "request", **changes: Any) -> Settings:
    """``settings`` with some settings changed and checked, as a flag would change them.

    ``None`` values are ignored. UsageError for an unknown key or a bad value
    (the message names ``source``).
    """
    unknown = sorted(set(changes) - set(_KEYS))
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} (known: {', '.join(SETTING_KEYS)})")
    values = {key: getattr(settings, key) for key in _KEYS}
    sources = dict(settings.sources)
    for key, value in changes.items():
        if value is not None:
            values[key] = _coerce(key, value, source, UsageError)
            sources[key] = source
    _validate(values, sources)
    return dataclasses.replace(settings, **values, sources=sources)


# --- writing the config file ------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value: Any) -> str:
    """Render a scalar as TOML (the config schema is flat: str, int, float, bool)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value} to TOML config")
        return repr(value)
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            if ch == '"':
                out.append('\\"')
            elif ch == "\\":
                out.append("\\\\")
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04x}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    raise ValueError(f"cannot write {type(value).__name__} to TOML config")


def set_config_value(key: str, value: Any, path: Path | None = None) -> Path:
    """Set (or with ``value=None`` remove) one top-level key in the config file.

    Other lines, comments included, are kept as they are. Returns the file's path.
    """
    if key not in _KEYS:
        raise UsageError(f"unknown setting {key!r} (known: {', '.join(SETTING_KEYS)})")
    path = path or config_file()
    read_config_file(path)  # refuse to edit a file we cannot parse
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = ["# mtpcode settings; see `mtpcode --help`. Environment MTPCODE_<KEY> and flags override these."]
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    new_line = None if value is None else f"{key} = {toml_value(_coerce(key, value, 'config', UsageError))}"
    out: list[str] = []
    done = False
    for line in lines:
        if not done and pattern.match(line):
            if new_line is not None:
                out.append(new_line)
            done = True
        else:
            out.append(line)
    if not done and new_line is not None:
        out.append(new_line)
    text = "\n".join(out) + "\n"
    atomic_write_text(path, text)
    return path
