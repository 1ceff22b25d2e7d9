"""``mtpcode config``: show the effective settings and edit the config file."""

from __future__ import annotations

import json

import click

from mtpcode.config import ENV_PREFIX, SETTING_KEYS, load_settings, override_settings, set_config_value, toml_value
from mtpcode.errors import UsageError


@click.group("config", invoke_without_command=True)
@click.pass_context
def config(ctx: click.Context) -> None:
    """Show the effective settings (default) or change the config file.

    Precedence: flags > environment MTPCODE_<KEY> > config file > defaults.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(show)


# Settings whose values `config show` never prints.
SECRET_KEYS = ("api_key",)


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def show(as_json: bool) -> None:
    """Every setting, its value and where the value comes from."""
    s = load_settings()
    values = {k: getattr(s, k) for k in SETTING_KEYS}
    for key in SECRET_KEYS:  # shown as set or not: a terminal or a pasted log must not leak it
        if values.get(key) is not None:
            values[key] = "(set)"
    if as_json:
        data = {
            "settings": values,
            "sources": dict(s.sources),
            "config_file": str(s.config_file),
            "data_dir": str(s.data_dir),
        }
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"# config file: {s.config_file}{'' if s.config_file.exists() else ' (not created yet)'}")
    click.echo(f"# data dir:    {s.data_dir}")
    for key in SETTING_KEYS:
        value = values[key]
        shown = "(unset)" if value is None else value if key in SECRET_KEYS else toml_value(value)
        click.echo(f"{key} = {shown}  # {s.sources[key]}")


@config.command("path")
def path() -> None:
    """Print the config file's path."""
    click.echo(str(load_settings().config_file))


@config.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("value")
def set_(key: str, value: str) -> None:
    """Write KEY = VALUE to the config file (VALUE is parsed like MTPCODE_<KEY>)."""
    if key not in SETTING_KEYS:
        raise UsageError(f"unknown setting {key!r} (known: {', '.join(SETTING_KEYS)})")
    s = load_settings()
    # Check the value the way a flag is checked before anything is written.
    checked = getattr(override_settings(s, "config set", **{key: value}), key)
    file = set_config_value(key, checked, s.config_file)
    click.echo(f"{key} = {'(unset)' if checked is None else toml_value(checked)}  ({file})", err=True)
    env = ENV_PREFIX + key.upper()
    if s.sources.get(key, "").startswith("env"):
        click.echo(f"note: {env} is set and overrides the config file", err=True)


@config.command("unset")
@click.argument("key")
def unset(key: str) -> None:
    """Remove KEY from the config file (back to the default)."""
    file = set_config_value(key, None, load_settings().config_file)
    click.echo(f"{key} unset ({file})", err=True)
