"""The few exception classes of mtpcode.

Library code raises these with a message that says what is wrong and what to
do; the CLI turns them into one line on stderr and the exit code below
(sysexits.h values where one fits).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class MtpError(Exception):
    """Base class: a user-facing error with a one-line message."""

    exit_code = 1


class UsageError(MtpError):
    """Bad option values or combinations."""

    exit_code = 2


class DataError(MtpError):
    """Input data is malformed: empty or binary prompt, bad checkpoint contents."""

    exit_code = 65


class NoInputError(MtpError):
    """An input file or directory does not exist."""

    exit_code = 66


class ModelError(MtpError):
    """A bundle is missing, incomplete, corrupt or inconsistent; llama.cpp refused it."""

    exit_code = 69


class OutputError(MtpError):
    """An output cannot be created (exists without --force, not writable)."""

    exit_code = 73


class ContextOverflowError(DataError):
    """The prompt does not fit in the context window."""


class NoRoom(MtpError):
    """A request cannot start yet: the running requests leave too few of the context's KV cells."""


class Interrupted(MtpError):
    """The user pressed Ctrl-C."""

    exit_code = 130


def run_script(main: Callable[[Sequence[str]], int], prog: str) -> NoReturn:
    """Exit with `main(sys.argv[1:])` for a `python -m` script: an MtpError becomes one line and its
    exit code, as the mtpcode commands print it."""
    try:
        sys.exit(main(sys.argv[1:]))
    except MtpError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
