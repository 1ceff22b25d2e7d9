"""The model registry: names for bundle directories, and which model a command runs.

The registry is ``models.json`` in the data directory (see
:mod:`mtpcode.config`); ``mtpcode convert`` writes bundles into
``<data dir>/models/<name>/`` and registers them. The default model is the
``model`` setting (config file, ``MTPCODE_MODEL`` or ``--model``);
``mtpcode models default NAME`` writes it to the config file.

Resolution order of :func:`resolve_model`: an explicit spec (registered name,
``builtin``, or a bundle directory), else the configured default, else the
small model shipped inside the package (``mtpcode/builtin/``) if this install
has one, else a ModelError saying how to get a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mtpcode.bundle import MANIFEST_NAME, open_bundle
from mtpcode.config import Settings, data_dir, load_settings, set_config_value
from mtpcode.errors import DataError, ModelError, NoInputError, UsageError
from mtpcode.files import atomic_write_text

REGISTRY_NAME = "models.json"
REGISTRY_FORMAT = "mtpcode-models"
REGISTRY_VERSION = 1
BUILTIN_NAME = "builtin"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class ModelEntry:
    """One model known by name."""

    name: str
    path: Path
    builtin: bool = False
    default: bool = False

    @property
    def exists(self) -> bool:
        return (self.path / MANIFEST_NAME).is_file()


# --- locations ----------------------------------------------------------------------


def _data_dir(settings: Settings | None) -> Path:
    return settings.data_dir if settings is not None else data_dir()


def models_dir(settings: Settings | None = None) -> Path:
    """Where ``mtpcode convert`` puts bundles by default: ``<data dir>/models``."""
    return _data_dir(settings) / "models"


def registry_path(settings: Settings | None = None) -> Path:
    return _data_dir(settings) / REGISTRY_NAME


def builtin_model_path() -> Path | None:
    """The bundle shipped inside the package (``mtpcode/builtin/``), or None if this install has none."""
    path = Path(__file__).resolve().parent / "builtin"
    return path if (path / MANIFEST_NAME).is_file() else None


def is_builtin(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is the built-in bundle."""
    builtin = builtin_model_path()
    return builtin is not None and Path(path).resolve() == builtin


# --- names --------------------------------------------------------------------------


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a model; UsageError otherwise."""
    if name == BUILTIN_NAME:
        raise UsageError(f"{BUILTIN_NAME!r} is reserved for the model shipped with mtpcode; pick another name")
    if not _NAME_RE.match(name) or len(name) > 100:
        raise UsageError(
            f"bad model name {name!r}: use letters, digits and . _ + - (starting with a letter or digit)"
        )
    return name


def default_model_name_for(ckpt_dir: str | os.PathLike[str], quant: str | None = None) -> str:
    """A registry name for a bundle converted from ``ckpt_dir``.

    The checkpoint directory's name (``7B_1T_4``), plus ``-<quant>`` in lower
    case when ``quant`` is given (``7B_1T_4-q4_k_m``). A path to a file inside
    the checkpoint (``consolidated.pth``) uses its directory.
    """
    path = Path(ckpt_dir).expanduser()
    if path.is_file():
        path = path.parent
    base = path.resolve().name or "model"
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", base).strip("-.") or "model"
    if not name[0].isalnum():
        name = "m" + name
    if name == BUILTIN_NAME:
        name = "builtin-model"
    if quant:
        name = f"{name}-{re.sub(r'[^A-Za-z0-9._+-]+', '-', quant.lower())}"
    return name[:100]


# --- the registry file --------------------------------------------------------------


def _read_registry(settings: Settings | None) -> dict[str, str]:
    path = registry_path(settings)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"model registry {path} is unreadable ({exc}); fix or delete it") from None
    if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT or not isinstance(data.get("models"), dict):
        raise DataError(f"model registry {path} is not an mtpcode model registry; fix or delete it")
    models: dict[str, str] = {}
    for name, entry in data["models"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise DataError(f"model registry {path}: entry {name!r} has no path; fix or delete it")
        models[name] = entry["path"]
    return models


def _write_registry(models: dict[str, str], settings: Settings | None) -> None:
    data = {
        "format": REGISTRY_FORMAT,
        "version": REGISTRY_VERSION,
        "models": {name: {"path": models[name]} for name in sorted(models)},
    }
    atomic_write_text(registry_path(settings), json.dumps(data, indent=2) + "\n")


def _stored_path(path: Path, settings: Settings | None) -> str:
    # Bundles inside the data directory are stored relative to it, so the
    # whole directory (MTPCODE_HOME) can be moved.
    root = _data_dir(settings).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _loaded_path(stored: str, settings: Settings | None) -> Path:
    path = Path(stored).expanduser()
    return path if path.is_absolute() else _data_dir(settings) / path


# --- public operations --------------------------------------------------------------


def register_model(
    name: str, path: str | os.PathLike[str], *, settings: Settings | None = None, force: bool = False
) -> ModelEntry:
    """Register the bundle directory ``path`` as ``name``; returns its entry.

    The bundle is validated with ``open_bundle`` (ModelError / NoInputError if
    it is not a complete bundle). An existing name pointing elsewhere is an
    error (UsageError) unless ``force``.
    """
    validate_name(name)
    bundle_dir = Path(path).expanduser().resolve()
    open_bundle(bundle_dir)
    models = _read_registry(settings)
    old = models.get(name)
    if old is not None and _loaded_path(old, settings).resolve() != bundle_dir and not force:
        raise UsageError(
            f"a model named {name!r} already exists ({_loaded_path(old, settings)}); "
            "remove it first or choose another name"
        )
    models[name] = _stored_path(bundle_dir, settings)
    _write_registry(models, settings)
    return ModelEntry(name=name, path=bundle_dir, default=_configured(settings) == name)


def remove_model(name: str, *, settings: Settings | None = None, delete_files: bool = False) -> ModelEntry:
    """Unregister ``name`` (ModelError if unknown); returns the entry it had.

    With ``delete_files`` the bundle directory is deleted too, but only when
    it lives in :func:`models_dir` (mtpcode never deletes a user's own
    directory). If it was the configured default, the default is cleared.
    """
    models = _read_registry(settings)
    if name not in models:
        raise ModelError(f"no model named {name!r} (see `mtpcode models list`)")
    path = _loaded_path(models.pop(name), settings)
    _write_registry(models, settings)
    if delete_files:
        inside = models_dir(settings).resolve()
        target = path.resolve()
        if target.parent == inside and (target / MANIFEST_NAME).is_file():
            shutil.rmtree(target)
        elif target.exists():
            raise UsageError(
                f"unregistered {name!r} but kept {target}: it is not in {inside}; delete it yourself"
            )
    was_default = _configured(settings) == name
    if was_default:
        set_config_value("model", None, settings.config_file if settings else None)
    return ModelEntry(name=name, path=path, default=was_default)


def set_default(name: str, *, settings: Settings | None = None) -> Path:
    """Make ``name`` (a registered name or ``builtin``) the default model in the config file.

    Returns the config file's path. ModelError if the name is unknown.
    """
    if name == BUILTIN_NAME:
        if builtin_model_path() is None:
            raise ModelError("this install of mtpcode has no built-in model")
    elif name not in _read_registry(settings):
        raise ModelError(f"no model named {name!r} (see `mtpcode models list`; add one with `mtpcode models add`)")
    return set_config_value("model", name, settings.config_file if settings else None)


def _configured(settings: Settings | None) -> str | None:
    if settings is None:
        settings = load_settings()
    return settings.model


def list_models(settings: Settings | None = None) -> list[ModelEntry]:
    """Registered models sorted by name, then the built-in model if this install has one."""
    default = _configured(settings)
    entries = [
        ModelEntry(name=name, path=_loaded_path(stored, settings), default=name == default)
        for name, stored in sorted(_read_registry(settings).items())
    ]
    builtin = builtin_model_path()
    if builtin is not None:
        entries.append(
            ModelEntry(name=BUILTIN_NAME, path=builtin, builtin=True, default=default in (None, BUILTIN_NAME))
        )
    return entries


def get_model(name: str, settings: Settings | None = None) -> ModelEntry:
    """The entry for a registered name or ``builtin``; ModelError if unknown."""
    for entry in list_models(settings):
        if entry.name == name:
            return entry
    raise ModelError(f"no model named {name!r} (see `mtpcode models list`)")


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~")) or Path(spec).is_absolute()


def resolve_model(spec: str | None, settings: Settings, origin: str = "--model") -> Path:
    """The bundle directory to run.

    ``spec`` is a registered name, ``builtin`` or a bundle directory; None
    means the configured default (``settings.model``), else the built-in
    model. Does not open the bundle (the Engine does), but checks it exists:
    ModelError for an unknown name or when there is no model at all,
    NoInputError for a directory that does not exist. ``origin`` names where ``spec``
    came from, for the error message.
    """
    if spec is None:
        spec = settings.model
        origin = f"model setting (from {settings.sources.get('model', 'config')})"
    if spec is None or spec == BUILTIN_NAME:
        builtin = builtin_model_path()
        if builtin is not None:
            return builtin
        if spec == BUILTIN_NAME:
            raise ModelError("this install of mtpcode has no built-in model")
        raise ModelError(
            "no model configured and this install has no built-in model: convert a checkpoint with "
            "`mtpcode convert CKPT_DIR`, or register a bundle with `mtpcode models add NAME PATH`"
        )
    models = _read_registry(settings)
    if spec in models:
        path = _loaded_path(models[spec], settings)
        if not path.is_dir():
            raise ModelError(
                f"model {spec!r} is registered at {path}, which no longer exists; "
                f"`mtpcode models remove {spec}` or convert it again"
            )
        return path
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _looks_like_path(spec):
        raise NoInputError(f"model not found: {path} ({origin})")
    known = ", ".join(sorted(models) + ([BUILTIN_NAME] if builtin_model_path() is not None else [])) or "none"
    raise ModelError(f"unknown model {spec!r} ({origin}); known models: {known}. See `mtpcode models list`")
