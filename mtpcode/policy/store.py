"""What drafting policies learned, kept between processes.

A one-shot ``mtpcode complete`` would otherwise pay the policy's warm-up every
time. States are kept per bundle and runtime settings (the same model runs at
other speeds with other threads or offload), one JSON file each, in a folder
of the cache directory. They are only a head start: an unreadable or invalid
file is ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtpcode.errors import OutputError
from mtpcode.files import atomic_write_text

log = logging.getLogger("mtpcode.policy")


class PolicyStore:
    """A folder of saved policy states; :meth:`for_runtime` opens the file of one runtime."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def for_runtime(self, runtime_id: str) -> SavedPolicies:
        """The saved states of the runtime ``runtime_id`` (a bundle fingerprint and its settings)."""
        return SavedPolicies(self.folder / f"{runtime_id}.json")


class SavedPolicies:
    """The states saved for one runtime, by policy key (e.g. "3 heads, greedy"), read once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.debug("ignoring %s: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> Any:
        """The saved state for ``key``, or None."""
        return self._saved.get(key)

    def save(self, learned: Mapping[str, Any]) -> None:
        """Write ``learned`` over the saved states (concurrent processes: the last one to save wins)."""
        if not learned:
            return
        self._saved = {**self._saved, **learned}
        try:
            atomic_write_text(self.path, json.dumps(self._saved, indent=1))
        except OutputError as exc:
            log.debug("could not save the drafting policies to %s: %s", self.path, exc)
