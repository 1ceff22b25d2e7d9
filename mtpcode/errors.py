"""The few exception classes of mtpcode.

Library code raises these with a message that says what is wrong and what to
do; the CLI turns them into one line on stderr and the exit code below
(sysexits.h values where one fits).
"""

from __future__ import annotations


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
