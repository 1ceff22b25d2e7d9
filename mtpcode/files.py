"""Writing files so that nothing is ever half-written: the one atomic writer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mtpcode.errors import NoInputError, OutputError


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory, fsync, rename.

    A crash or a full disk never leaves a half-written file behind, and no
    temporary file stays either. Missing parent directories are created. An
    existing file keeps its permissions; a symlink keeps pointing at its
    target, which is what gets replaced. Returns the path written;
    OutputError (one line) on failure.
    """
    target = Path(os.path.realpath(path))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if target.exists():
            os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def read_file(path: Path) -> bytes:
    """The bytes of ``path``; NoInputError with one line saying why it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NoInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise NoInputError(f"{path} is a directory; give a file") from None
    except PermissionError:
        raise NoInputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise NoInputError(f"{path}: cannot read ({exc.strerror})") from None
