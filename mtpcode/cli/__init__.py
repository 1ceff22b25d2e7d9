"""The ``mtpcode`` command line.

Each command lives in its own module and registers itself on ``main``; this
module owns the error boundary: an ``MtpError`` becomes one line on stderr and
its exit code, Ctrl-C becomes exit 130, a closed stdout pipe exits quietly.
"""

from __future__ import annotations

import errno
import sys

import click

from mtpcode import __version__
from mtpcode.errors import Interrupted, MtpError


class MtpGroup(click.Group):
    """A click group that turns mtpcode's errors into one line and an exit code.

    The handling sits in ``invoke`` (where the command runs), not in ``main``:
    click's ``main`` would otherwise catch Ctrl-C (printing a blank line and
    "Aborted!") and a closed pipe (exit 1) before we see them.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, click.exceptions.Abort):
            _fail(Interrupted("interrupted"))
        except MtpError as exc:
            _fail(exc)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            _quiet_broken_pipe()


def _fail(exc: MtpError) -> None:
    message = str(exc) or type(exc).__name__
    prefix = "mtpcode: " if isinstance(exc, Interrupted) else "mtpcode: error: "
    try:
        click.echo(prefix + message, err=True)
    except OSError:
        pass
    sys.exit(exc.exit_code)


def _quiet_broken_pipe() -> None:
    # The reader went away (`mtpcode complete | head`): exit quietly, and keep
    # Python from complaining again when it flushes stdout at shutdown.
    from mtpcode.cli.frontend import silence_stdout

    silence_stdout()
    sys.exit(0)


@click.group(cls=MtpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtpcode")
def main() -> None:
    """Fast local code completion with multi-token-prediction heads.

    Convert a Meta multi-token-prediction checkpoint into a GGUF bundle, then
    complete code with self-speculative decoding on llama.cpp.
    """


def _register_commands() -> None:
    # Imported here, not at the top, so that each command's heavy imports
    # (llama.cpp, torch) happen only when that command runs.
    from mtpcode.cli.commands import register

    register(main)


_register_commands()
