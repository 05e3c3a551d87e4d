"""`micropod cri serve`: the Kubernetes CRI v1 server (micropod/cri/)."""

from __future__ import annotations

from pathlib import Path

import click

from micropod.context import Context

pass_ctx = click.make_pass_decorator(Context)


@click.group()
def cri() -> None:
    """The Kubernetes Container Runtime Interface."""


@cri.command()
@click.option("--listen", default="unix:///run/micropod/cri.sock", show_default=True,
              help="The socket kubelet's --container-runtime-endpoint names.")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path),
              help='JSON: {"runtime_handlers": {"NAME": {"vmm": "qemu", "vcpus": 1, "memory": "512M"}}}.')
@click.option("--network", type=click.Choice(["bridge", "none"]), default=None,
              help="The sandboxes' network (default: MICROPOD_NETWORK, else bridge).")
@click.option("--stream-address", default="127.0.0.1:0", show_default=True,
              help="HOST:PORT of the streaming server whose URLs Exec, Attach and PortForward return.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Where the server logs, besides stderr (default: ROOT/cri.log).")
@pass_ctx
def serve(ctx: Context, listen: str, config: Path | None, network: str | None, stream_address: str,
          log_file: Path | None) -> None:
    """Serve RuntimeService and ImageService until SIGTERM; pods and containers outlive the server."""
    from micropod.cri.server import serve as run_server
    from micropod.cri.server import setup_logging

    setup_logging(log_file or ctx.root.path / "cri.log", ctx.debug)
    run_server(ctx.root, listen, config, network, ctx.debug, stream_address)


COMMANDS = [cri]
