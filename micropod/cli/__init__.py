"""The micropod command line: docker's verbs and flags, one exit point for every error."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from micropod.context import Context
from micropod.errors import MicropodError
from micropod.paths import StateRoot


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="MICROPOD_ROOT", type=click.Path(file_okay=False), default=None,
              help="State root (default /var/lib/micropod).")
@click.option("--debug", is_flag=True, envvar="MICROPOD_DEBUG", help="Log every command and show tracebacks.")
@click.version_option(package_name="micropod")
@click.pass_context
def cli(ctx: click.Context, root: str | None, debug: bool) -> None:
    """Run OCI containers inside microVMs."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s.%(msecs)03d %(message)s", datefmt="%H:%M:%S")
    ctx.obj = Context(StateRoot.from_env(root), debug=debug)


def _register() -> None:
    from micropod.cli import containers, copy, images, interactive, network, pods, registry, stats, system, volumes

    for module in (containers, images, registry, system, interactive, stats, copy, network, volumes, pods):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> Any:
    debug = "--debug" in (argv or sys.argv) or bool(__import__("os").environ.get("MICROPOD_DEBUG"))
    try:
        return cli.main(args=argv, prog_name="micropod", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(125 if exc.exit_code == 2 else exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except MicropodError as exc:
        if debug:
            raise
        click.echo(f"micropod: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
