"""`reshard plan`: per-rank memory, stage and expert report, from config.json alone."""

from __future__ import annotations

import click


@click.command(help="Plan a layout without reading weights (stub: being written).")
@click.argument("model")
def plan(model: str) -> None:
    raise click.ClickException("reshard plan is not implemented yet")
