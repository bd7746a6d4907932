"""`reshard profile layers|experts`: measured per-layer cost and per-expert load."""

from __future__ import annotations

import click


@click.group(help="Measure per-layer cost or per-expert load.")
def profile() -> None:
    pass
