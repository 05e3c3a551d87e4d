"""Image commands: pull, load, images, tag, rmi, save, image prune/unpack."""

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
    from micropod.image.credentials import CredentialStore
    from micropod.image.pull import PullOptions
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


class _RichProgress:
    """Per-blob progress bars on stderr (only used when stderr is a TTY)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=Console(stderr=True), transient=False)
        self.tasks: dict[str, Any] = {}

    def blob_started(self, digest: str, size: int) -> None:
        name = digest.partition(":")[2][:12]
        if digest in self.tasks:
            self.progress.reset(self.tasks[digest], total=size, description=f"{name} retrying")
        else:
            self.tasks[digest] = self.progress.add_task(name, total=size)

    def blob_advanced(self, digest: str, nbytes: int) -> None:
        self.progress.advance(self.tasks[digest], nbytes)

    def blob_done(self, digest: str, *, skipped: bool) -> None:
        name = digest.partition(":")[2][:12]
        if skipped:
            self.tasks[digest] = self.progress.add_task(f"{name} already exists", total=1, completed=1)
        else:
            self.progress.update(self.tasks[digest], description=f"{name} done")


def pull_options(ctx: Context, platform: str | None, tls_verify: bool) -> PullOptions:
    from micropod.image.pull import PullOptions, parse_platform

    return PullOptions.of_root(ctx.root.path, platform=parse_platform(platform) if platform else None,
                               tls_verify=tls_verify)


def credential_store(ctx: Context) -> CredentialStore:
    from micropod.image.credentials import CredentialStore

    return CredentialStore(ctx.root.path / "auth.json")


def pull_image(ctx: Context, name: str, *, platform: str | None = None, tls_verify: bool = True,
               quiet: bool = False) -> StoredImage:
    """Pull `name`; progress bars on a TTY, a short summary otherwise, nothing but the name with -q."""
    from micropod.image.pull import pull

    options = pull_options(ctx, platform, tls_verify)
    if not quiet and sys.stderr.isatty():
        progress = _RichProgress()
        with progress.progress:
            result = pull(ctx.images, name, credentials=credential_store(ctx), options=options,
                          progress=progress)
    else:
        result = pull(ctx.images, name, credentials=credential_store(ctx), options=options)
    if quiet:
        click.echo(str(result.reference))
    else:
        click.echo(f"Digest: {result.image.manifest_digest}")
        click.echo(f"Status: pulled {result.reference} ({result.downloaded} blobs downloaded, "
                   f"{result.skipped} already present)")
        click.echo(str(result.reference))
    return result.image


@click.command()
@click.option("-q", "--quiet", is_flag=True, help="Print only the image reference.")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]", help="Default: the host's.")
@click.option("--tls-verify", type=click.BOOL, default=True, show_default=True,
              help="Verify the registry's TLS certificate (false also allows plain HTTP).")
@click.argument("name", metavar="IMAGE")
@pass_ctx
def pull(ctx: Context, quiet: bool, platform: str | None, tls_verify: bool, name: str) -> None:
    """Pull an image from a registry."""
    pull_image(ctx, name, platform=platform, tls_verify=tls_verify, quiet=quiet)


@click.command()
@click.argument("source", metavar="SOURCE_IMAGE")
@click.argument("target", metavar="TARGET_IMAGE[:TAG]")
@pass_ctx
def tag(ctx: Context, source: str, target: str) -> None:
    """Create a reference TARGET that names the image SOURCE names."""
    image = ctx.images.resolve(source)
    ctx.images.tag(target, image.manifest_digest)


@click.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The OCI archive to write.")
@click.argument("names", metavar="IMAGE...", nargs=-1, required=True)
@pass_ctx
def save(ctx: Context, output: Path, names: tuple[str, ...]) -> None:
    """Save images to an OCI archive (load it back with `load -i`)."""
    from micropod.image.archive import save_archive
    from micropod.image.store import _ID_PREFIX

    chosen: dict[str, tuple[StoredImage, list[str]]] = {}
    for name in names:
        image = ctx.images.resolve(name)
        refs = chosen.setdefault(image.manifest_digest, (image, []))[1]
        wanted = list(image.refs) if _ID_PREFIX.match(name) else [
            r for r in image.refs if r in {str(c) for c in _name_candidates(name)}] or list(image.refs)
        refs.extend(r for r in wanted if r not in refs)
    save_archive(ctx.images, list(chosen.values()), output)


def _name_candidates(name: str) -> list[Any]:
    from micropod.image.store import _candidates

    return _candidates(name)


@click.group(name="image")
def image_group() -> None:
    """Manage images (prune, unpack; see also images, pull, rmi, tag, save)."""


@image_group.command(name="prune")
@click.option("-a", "--all", "all_images", is_flag=True, help="Also remove tagged images no container uses.")
@click.option("-f", "--force", is_flag=True, help="Do not ask (micropod never asks; accepted for docker).")
@pass_ctx
def image_prune(ctx: Context, all_images: bool, force: bool) -> None:
    """Remove dangling images and every blob no image needs."""
    del force
    used = {r.image_id for r in ctx.state.all()}
    lines: list[str] = []
    done: set[str] = set()
    for image in ctx.images.list():
        if image.id in used or image.id in done or (image.refs and not all_images):
            continue
        done.add(image.id)
        lines.extend(ctx.images.remove(f"sha256:{image.id}", force=True))
    blobs = ctx.images.gc()
    for line in lines:
        click.echo(line)
    click.echo(f"Deleted {blobs} unreferenced blob(s)")


@image_group.command(name="unpack")
@click.option("--to", "dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the flattened tree into this (empty) directory instead of building the squashfs.")
@click.argument("name", metavar="IMAGE")
@pass_ctx
def image_unpack(ctx: Context, dest: Path | None, name: str) -> None:
    """Build and cache the image's read-only root filesystem (squashfs) without starting a VM."""
    image = ctx.images.resolve(name)
    if dest is not None:
        from micropod.rootfs.extract import extract_image

        stats = extract_image(ctx.images.image(image), dest)
        click.echo(f"{dest}: {stats.entries} entries, {stats.data_bytes} bytes of file data")
        return
    from micropod.rootfs.squash import ensure_rootfs

    click.echo(str(ensure_rootfs(ctx.root, ctx.images, image)))


COMMANDS = [pull, load, images, tag, rmi, save, image_group]
