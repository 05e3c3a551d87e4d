"""Plain-text tables like docker's, and JSON lines for --format json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in (headers, *rows):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        click.echo("   ".join(cells).rstrip())


def json_lines(items: Sequence[dict[str, Any]]) -> None:
    for item in items:
        click.echo(json.dumps(item))


def json_document(value: Any) -> None:
    click.echo(json.dumps(value, indent=4))


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
