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
              help="The sandboxes' network when there is no CNI configuration (default: MICROPOD_NETWORK, "
                   "else bridge).")
@click.option("--stream-address", default="127.0.0.1:0", show_default=True,
              help="HOST:PORT of the streaming server whose URLs Exec, Attach and PortForward return.")
@click.option("--cni-conf-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/etc/cni/net.d"),
              show_default=True, help="CNI network configurations; the first one (by name) is the sandboxes'. "
                                      "With none there, sandboxes use micropod's own bridge.")
@click.option("--cni-bin-dir", "cni_bin_dirs", type=click.Path(file_okay=False, path_type=Path), multiple=True,
              help="Where CNI plugins are looked for (repeatable; default /opt/cni/bin, then /usr/lib/cni).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Where the server logs, besides stderr (default: ROOT/cri.log).")
@pass_ctx
def serve(ctx: Context, listen: str, config: Path | None, network: str | None, stream_address: str,
          cni_conf_dir: Path, cni_bin_dirs: tuple[Path, ...], log_file: Path | None) -> None:
    """Serve RuntimeService and ImageService until SIGTERM; pods and containers outlive the server."""
    from micropod.cri.network import CniOptions
    from micropod.cri.server import serve as run_server
    from micropod.cri.server import setup_logging
    from micropod.net.cni import DEFAULT_BIN_DIRS

    setup_logging(log_file or ctx.root.path / "cri.log", ctx.debug)
    cni = CniOptions(cni_conf_dir, cni_bin_dirs or DEFAULT_BIN_DIRS)
    run_server(ctx.root, listen, config, network, ctx.debug, stream_address, cni)


COMMANDS = [cri]
