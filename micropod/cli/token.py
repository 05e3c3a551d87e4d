"""`micropod token`: check a VM's credential on the host, show the public keys, rotate the signing key."""

from __future__ import annotations

import json
import time

import click

from micropod.context import Context

pass_ctx = click.make_pass_decorator(Context)


@click.group()
def token() -> None:
    """The credentials VMs get from their metadata service."""


@token.command()
@click.option("--audience", help="Refuse a credential that is not for this audience.")
@click.argument("credential")
@pass_ctx
def verify(ctx: Context, /, credential: str, audience: str | None) -> None:
    """Check CREDENTIAL (a JWT) and print its claims as JSON."""
    from micropod.metadata.credential import check_audience
    from micropod.metadata.credential import verify as verify_credential

    claims = verify_credential(credential, check_audience(audience) if audience is not None else None, ctx.root)
    click.echo(json.dumps(claims, indent=2, sort_keys=True))


@token.command()
@pass_ctx
def jwks(ctx: Context, /) -> None:
    """Print the public keys that verify credentials, as a JSON Web Key Set."""
    from micropod.metadata.keyring import KeyRing

    click.echo(json.dumps(KeyRing(ctx.root).jwks(), indent=2))


@token.command("rotate-key")
@pass_ctx
def rotate_key(ctx: Context, /) -> None:
    """Sign with a new key from now on; credentials signed with the previous one verify until they expire."""
    from micropod.metadata.keyring import MAX_LIFETIME, KeyRing

    fresh, previous = KeyRing(ctx.root).rotate()
    click.echo(f"signing key {fresh.kid}")
    if previous is not None:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + MAX_LIFETIME))
        click.echo(f"previous key {previous.kid} verifies until {until}")


COMMANDS = (token,)
