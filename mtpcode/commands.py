"""Registers every command module on the ``mtpcode`` group.

Command modules keep their heavy imports (llama.cpp, torch) inside the
command functions so ``mtpcode --help`` stays fast.
"""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    from mtpcode.convert_cmd import convert

    group.add_command(convert)
