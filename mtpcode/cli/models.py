"""``mtpcode models``: list, add, remove, show registered bundles and pick the default."""

from __future__ import annotations

import json
from typing import Any

import click

from mtpcode import models as registry
from mtpcode.bundle import Bundle, open_bundle
from mtpcode.config import load_settings
from mtpcode.errors import MtpError


def human_size(n: int) -> str:
    """Bytes as a short human string: 512 B, 3.4 MiB, 3.9 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _bundle_info(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    return {
        "path": str(bundle.path),
        "n_future_tokens": m.n_future_tokens,
        "heads": m.n_heads,
        "n_trunk": m.n_trunk,
        "n_embd": m.n_embd,
        "n_vocab": m.n_vocab,
        "quantization": m.quantization,
        "fingerprint": m.fingerprint,
        "trunk_tensor": m.trunk_tensor,
        "source": m.source,
        "files": [{"file": e.file, "size": e.size, "sha256": e.sha256} for e in (m.main, *m.heads)],
        "total_size": bundle.total_size,
    }


@click.group("models")
def models() -> None:
    """Manage converted models (bundles) by name.

    `mtpcode convert` registers what it writes; `models add` registers a bundle
    directory made elsewhere. The default model is the `model` setting of the
    config file (`models default NAME` sets it; MTPCODE_MODEL and --model
    override it).
    """


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout.")
def list_cmd(as_json: bool) -> None:
    """List registered models: name, quantization, heads, size, path (* = default)."""
    settings = load_settings()
    rows = []
    for entry in registry.list_models(settings):
        row: dict[str, Any] = {"name": entry.name, "default": entry.default, "builtin": entry.builtin,
                               "path": str(entry.path)}
        try:
            info = _bundle_info(open_bundle(entry.path))
            row.update(quantization=info["quantization"], heads=info["heads"], size=info["total_size"], ok=True)
        except MtpError as exc:
            row.update(quantization=None, heads=None, size=None, ok=False, problem=str(exc))
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(
            "no models registered (convert one with `mtpcode convert CKPT_DIR`, "
            "or `mtpcode models add NAME PATH`)",
            err=True,
        )
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "*" if r["default"] else " "
        if r["ok"]:
            detail = f"{r['quantization']:<8} {r['heads']} heads {human_size(r['size']):>10}"
        else:
            detail = f"{'BROKEN':<8} {r['problem']}"
        click.echo(f"{mark} {r['name']:<{width}}  {detail}  {r['path']}")


@models.command("add")
@click.argument("name")
@click.argument("path")
@click.option("--force", is_flag=True, help="Replace an existing model of that name.")
@click.option("--default", "make_default", is_flag=True, help="Also make it the default model.")
def add_cmd(name: str, path: str, force: bool, make_default: bool) -> None:
    """Register the bundle directory PATH as NAME (the bundle is checked first)."""
    settings = load_settings()
    entry = registry.register_model(name, path, settings=settings, force=force)
    click.echo(f"registered {entry.name} -> {entry.path}", err=True)
    if make_default:
        cfg = registry.set_default(name, settings=settings)
        click.echo(f"default model is now {name} ({cfg})", err=True)


@models.command("remove")
@click.argument("name")
@click.option("--delete", "delete_files", is_flag=True,
              help="Also delete the bundle's files (only for bundles inside the models directory).")
def remove_cmd(name: str, delete_files: bool) -> None:
    """Unregister NAME. Its files are kept unless --delete is given."""
    settings = load_settings()
    entry = registry.remove_model(name, settings=settings, delete_files=delete_files)
    what = "removed and deleted" if delete_files else "unregistered"
    click.echo(f"{what} {entry.name} ({entry.path})", err=True)
    if entry.default:
        click.echo("it was the default model; no default is set now", err=True)


@models.command("default")
@click.argument("name")
def default_cmd(name: str) -> None:
    """Make NAME the default model (writes `model = NAME` to the config file)."""
    settings = load_settings()
    cfg = registry.set_default(name, settings=settings)
    click.echo(f"default model is now {name} ({cfg})", err=True)


@models.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def show_cmd(name: str, as_json: bool) -> None:
    """Show NAME's manifest: heads, quantization, shapes, files and sizes.

    NAME may also be a bundle directory. The bundle is validated: a missing or
    truncated file is an error (exit 69).
    """
    settings = load_settings()
    path = registry.resolve_model(name, settings, origin="NAME")
    info = _bundle_info(open_bundle(path))
    info["name"] = name
    info["default"] = settings.model == name or (settings.model is None and registry.is_builtin(path))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    lines = [
        f"name:          {name}{'  (default)' if info['default'] else ''}",
        f"path:          {info['path']}",
        f"quantization:  {info['quantization']}",
        f"heads:         {info['heads']} extra (n_future_tokens {info['n_future_tokens']})",
        f"shape:         trunk {info['n_trunk']} layers, n_embd {info['n_embd']}, vocab {info['n_vocab']}",
        f"fingerprint:   {info['fingerprint']}",
        f"total size:    {human_size(info['total_size'])}",
        "files:",
    ]
    lines += [f"  {f['file']:<14} {human_size(f['size']):>10}  sha256 {f['sha256'][:16]}" for f in info["files"]]
    if info["source"]:
        lines.append("source:")
        lines += [f"  {k}: {v}" for k, v in sorted(info["source"].items())]
    click.echo("\n".join(lines))
