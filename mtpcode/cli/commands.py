"""Registers every command module on the ``mtpcode`` group.

Command modules keep their heavy imports (llama.cpp, torch) inside the
command functions so ``mtpcode --help`` stays fast.
"""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    # (imported here: mtpcode.cli's package face stays a click group, whatever the commands import)
    from mtpcode.cli.bench import bench
    from mtpcode.cli.complete import complete
    from mtpcode.cli.config import config
    from mtpcode.cli.convert import convert
    from mtpcode.cli.models import models
    from mtpcode.cli.repl import repl
    from mtpcode.cli.serve import serve

    group.add_command(bench)
    group.add_command(convert)
    group.add_command(complete)
    group.add_command(models)
    group.add_command(repl)
    group.add_command(serve)
    group.add_command(config)
