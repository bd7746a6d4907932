"""`reshard profile layers|experts`: measured per-layer cost and per-expert load."""

from __future__ import annotations

from pathlib import Path

import click

from .cli import run_command

LAYERS_HELP = """Time one layer of each distinct kind (plus the embedding and the head) at the
model's real shapes with random weights. Needs only config.json.

\b
Example:
  reshard profile layers meta-llama/Llama-3.1-8B --device cuda -o costs.json
  reshard plan meta-llama/Llama-3.1-8B --pp 4 --costs costs.json
"""


@click.group(help="Measure per-layer cost or per-expert load.")
def profile() -> None:
    pass


@profile.command(help=LAYERS_HELP)
@click.argument("model")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--seq", type=int, default=128, show_default=True)
@click.option("--mode", type=click.Choice(["prefill", "decode"]), default="prefill")
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--iters", type=int, default=30, show_default=True)
@click.option("--dtype", help="float32 | bfloat16 | float16 (default bf16 on CUDA, fp32 on CPU).")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path))
@run_command
def layers(model, device, batch, seq, mode, warmup, iters, dtype, out) -> None:
    from .costs import write_costs
    from .layer_profile import profile_layers
    from .source import open_config

    _, hp, _ = open_config(model)
    result = profile_layers(
        hp, device=device, batch=batch, seq=seq, mode=mode, warmup=warmup, iters=iters,
        dtype=dtype,
    )  # fmt: skip
    write_costs(out, result)
    click.echo(f"{result['device']} {result['dtype']} {mode} batch {batch} seq {seq}:")
    for kind, k in result["kinds"].items():
        click.echo(
            f"  {kind:<36} median {k['median_us']:10.1f} us  IQR {k['iqr_us']:8.1f} us  "
            f"x{max(len(k['layers']), 1)}"
        )
    click.echo(f"wrote {out}")
