"""Registry and store maintenance commands: login, logout, system check."""

from __future__ import annotations

import sys

import click

from micropod.context import Context
from micropod.errors import MicropodError, NotFoundError, UsageError

pass_ctx = click.make_pass_decorator(Context)


@click.command()
@click.option("-u", "--username", default=None)
@click.option("-p", "--password", default=None, help="Prefer --password-stdin.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--tls-verify", type=click.BOOL, default=True, show_default=True)
@click.argument("server", metavar="SERVER")
@pass_ctx
def login(ctx: Context, username: str | None, password: str | None, password_stdin: bool, tls_verify: bool,
          server: str) -> None:
    """Log in to a registry; the credentials are checked, then stored (mode 0600) under the state root."""
    from micropod.cli.images import credential_store
    from micropod.image.credentials import Credentials, insecure_registries, registry_host
    from micropod.image.registry import RegistryClient

    host = registry_host(server)
    if password_stdin:
        if password is not None:
            raise UsageError("--password and --password-stdin are mutually exclusive")
        password = sys.stdin.readline().rstrip("\r\n")
    if username is None:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    if not username or not password:
        raise UsageError("login needs a username and a password")
    creds = Credentials(username, password)
    insecure = host in insecure_registries(ctx.root.path / "registries.json")
    with RegistryClient(host, credentials=creds, tls_verify=tls_verify, insecure=insecure) as client:
        client.check_login()
    credential_store(ctx).store(host, creds)
    click.echo("Login Succeeded")


@click.command()
@click.argument("server", metavar="SERVER")
@pass_ctx
def logout(ctx: Context, server: str) -> None:
    """Forget the stored credentials of a registry."""
    from micropod.cli.images import credential_store
    from micropod.image.credentials import registry_host

    host = registry_host(server)
    if not credential_store(ctx).erase(host):
        raise NotFoundError(f"not logged in to {host}")
    click.echo(f"Removing login credentials for {host}")


@click.group(name="system")
def system_group() -> None:
    """Store maintenance."""


@system_group.command(name="check")
@pass_ctx
def system_check(ctx: Context) -> None:
    """Verify every blob of the image store against its digest and every image for completeness."""
    problems = ctx.images.check()
    for line in problems:
        click.echo(line)
    if problems:
        raise MicropodError(f"the image store has {len(problems)} problem(s); "
                            f"'micropod rmi' the images named above and pull them again")
    click.echo("image store OK")


COMMANDS = [login, logout, system_group]
