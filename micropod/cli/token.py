"""`micropod token`: check a VM's credential on the host, show the public keys, rotate the signing key."""

from __future__ import annotations

import json
import sys
import time

import click

from micropod.context import Context

pass_ctx = click.make_pass_decorator(Context)


@click.group()
def token() -> None:
    """The credentials VMs get from their metadata service."""


@token.command("verify")
@click.option("--audience", help="The audience the credential must be for (default: micropod's default).")
@click.option("--any-audience", is_flag=True, help="Accept a credential for any audience.")
@click.argument("credential", default="-")
@pass_ctx
def verify_command(ctx: Context, /, credential: str, audience: str | None, any_audience: bool) -> None:
    """Check CREDENTIAL (a JWT; `-`, the default, reads it from stdin, where other users cannot see it as they
    can see arguments) and print its claims as JSON."""
    from micropod.metadata.credential import verify

    if credential == "-":
        credential = sys.stdin.read(64 << 10)
    claims = verify(credential, audience, ctx.root.ensure(), any_audience=any_audience)
    click.echo(json.dumps(claims, indent=2, sort_keys=True))


@token.command()
@pass_ctx
def jwks(ctx: Context, /) -> None:
    """Print the public keys that verify credentials, as a JSON Web Key Set."""
    from micropod.metadata.keyring import KeyRing

    click.echo(json.dumps(KeyRing(ctx.root.ensure()).jwks(), indent=2))


@token.command("rotate-key")
@pass_ctx
def rotate_key(ctx: Context, /) -> None:
    """Sign with a new key from now on; credentials signed with the previous one verify until they expire."""
    from micropod.metadata.keyring import MAX_LIFETIME, KeyRing

    fresh, previous = KeyRing(ctx.root.ensure()).rotate()
    click.echo(f"signing key {fresh.kid}")
    if previous is not None:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + MAX_LIFETIME))
        click.echo(f"previous key {previous.kid} verifies until {until}")


COMMANDS = (token,)
