"""The micropod command line: docker's verbs and flags, one exit point for every error."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from micropod.context import Context
from micropod.errors import MicropodError
from micropod.paths import StateRoot

# Each command, in --help's order, and the modules that make it (the first holds it in COMMANDS): a command
# imports only its own module, so that `ps` or `logs` does not pay for every other command's imports.
_COMMANDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("run", "create", "start", "restart"), ("containers",)),
    "ps": ("container_views",),
    **dict.fromkeys(("stop", "kill", "rm"), ("containers",)),
    "logs": ("container_views",),
    "wait": ("containers",), "update": ("update",),
    **dict.fromkeys(("pull", "load", "images", "tag", "rmi", "save", "image"), ("images",)),
    "login": ("registry",), "logout": ("registry",), "system": ("registry", "system"),
    "inspect": ("system",), "doctor": ("system",),
    "exec": ("interactive",), "attach": ("interactive",),
    "stats": ("stats",), "cp": ("copy",), "port": ("network",), "volume": ("volumes",), "pod": ("pods",),
    "token": ("token",), "cri": ("cri",),
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        modules = _COMMANDS.get(cmd_name)
        if modules is None:
            return None
        loaded = [importlib.import_module(f"micropod.cli.{name}") for name in modules]
        found: click.Command = next(c for c in loaded[0].COMMANDS if c.name == cmd_name)
        return found


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
