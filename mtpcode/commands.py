"""Registers every command module on the ``mtpcode`` group.

Command modules keep their heavy imports (llama.cpp, torch) inside the
command functions so ``mtpcode --help`` stays fast.
"""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    from mtpcode.bench import bench
    from mtpcode.complete import complete
    from mtpcode.config_cmd import config
    from mtpcode.convert_cmd import convert
    from mtpcode.models_cmd import models
    from mtpcode.repl import repl
    from mtpcode.serve import serve

    group.add_command(bench)
    group.add_command(convert)
    group.add_command(complete)
    group.add_command(models)
    group.add_command(repl)
    group.add_command(serve)
    group.add_command(config)
