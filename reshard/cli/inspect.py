"""`reshard inspect`: what is in a checkpoint."""

from __future__ import annotations

import json

import click

from .common import model_argument, run_command


@click.command(
    help="Show what is in a checkpoint.\n\n\b\nExample:\n  reshard inspect ./Llama-3-8B --json"
)
@model_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (weights_only).")
@run_command
def inspect(model: str, as_json: bool, allow_pickle: bool) -> None:
    from ..inspect import format_inspect, inspect_source
    from ..io.output_source import open_model

    info = inspect_source(open_model(model, allow_pickle=allow_pickle))
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))
