"""Image commands: load, images, rmi."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from micropod.context import Context
from micropod.errors import ConflictError, MicropodError

if TYPE_CHECKING:
    from micropod.image.store import StoredImage

pass_ctx = click.make_pass_decorator(Context)


@click.command()
@click.option("-i", "--input", "source", required=True, type=click.Path(exists=True, path_type=Path),
              help="An OCI layout directory, an OCI archive, or a docker-save tar.")
@click.option("-q", "--quiet", is_flag=True)
@pass_ctx
def load(ctx: Context, source: Path, quiet: bool) -> None:
    """Load images from an OCI layout, an OCI archive or a docker-save tar."""
    from micropod.image.load import load_image

    for image in load_image(ctx.images, source):
        if not quiet:
            names = image.refs or (f"sha256:{image.id}",)
            for name in names:
                click.echo(f"Loaded image: {name}")


def _created_ago(image: StoredImage) -> str:
    from micropod.units import human_duration

    if not image.created:
        return "N/A"
    try:
        when = datetime.fromisoformat(image.created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "N/A"
    return f"{human_duration(time.time() - when)} ago"


def _split_ref(ref: str) -> tuple[str, str]:
    name, _, tag = ref.rpartition(":")
    if "/" in tag or not name:
        return ref, "<none>"
    return name, tag


@click.command(name="images")
@click.option("-q", "--quiet", is_flag=True, help="Only show ids.")
@click.option("--digests", is_flag=True, help="Show manifest digests.")
@click.option("--no-trunc", is_flag=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
def images(ctx: Context, quiet: bool, digests: bool, no_trunc: bool, fmt: str) -> None:
    """List stored images."""
    from micropod.cli.output import json_lines, table
    from micropod.units import human_size

    stored = ctx.images.list()
    if quiet:
        for image in stored:
            click.echo(image.id if no_trunc else image.id[:12])
        return
    if fmt == "json":
        json_lines([{
            "ID": image.id, "Repository": _split_ref(ref)[0], "Tag": _split_ref(ref)[1],
            "Digest": image.manifest_digest, "CreatedAt": image.created, "Size": image.size,
        } for image in stored for ref in (image.refs or ("<none>:<none>",))])
        return
    headers = ["REPOSITORY", "TAG"] + (["DIGEST"] if digests else []) + ["IMAGE ID", "CREATED", "SIZE"]
    rows = []
    for image in stored:
        for ref in image.refs or ("<none>:<none>",):
            repo, tag = _split_ref(ref)
            row = [repo, tag] + ([image.manifest_digest] if digests else [])
            rows.append([*row, image.id if no_trunc else image.id[:12], _created_ago(image), human_size(image.size)])
    table(headers, rows)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Remove even if containers use the image.")
@click.argument("names", metavar="IMAGE...", nargs=-1, required=True)
@pass_ctx
def rmi(ctx: Context, force: bool, names: tuple[str, ...]) -> None:
    """Remove images (untag; blobs no image needs are deleted)."""
    failed = False
    for name in names:
        try:
            image = ctx.images.resolve(name)
            users = [r.name for r in ctx.state.all() if r.image_id == image.id]
            if users and not force:
                raise ConflictError(
                    f"unable to remove {name}: image {image.id[:12]} is used by container(s) "
                    f"{', '.join(users)}; remove them or use --force"
                )
            for line in ctx.images.remove(name):
                click.echo(line)
        except MicropodError as exc:
            if ctx.debug:
                raise
            click.echo(f"micropod: error: {exc}", err=True)
            failed = True
    ctx.images.gc()
    if failed:
        sys.exit(1)


def image_inspect(image: StoredImage) -> dict[str, Any]:
    config = image.config
    return {
        "Id": f"sha256:{image.id}",
        "RepoTags": list(image.refs),
        "RepoDigests": [f"{ref.rsplit(':', 1)[0]}@{image.manifest_digest}" for ref in image.refs],
        "Created": image.created,
        "Size": image.size,
        "Architecture": config.architecture,
        "Os": config.os,
        "Config": {
            "Entrypoint": list(config.entrypoint) or None,
            "Cmd": list(config.cmd) or None,
            "Env": list(config.env),
            "WorkingDir": config.working_dir,
            "User": config.user,
            "StopSignal": config.stop_signal,
            "ExposedPorts": {port: {} for port in config.exposed_ports},
            "Labels": config.labels,
        },
        "RootFS": {"Type": "layers", "Layers": [layer.digest for layer in image.layers]},
        "Manifest": image.manifest_digest,
    }


COMMANDS = [load, images, rmi]
