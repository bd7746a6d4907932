"""`reshard profile layers|experts`: measured per-layer cost and per-expert load."""

from __future__ import annotations

from pathlib import Path

import click

from .common import model_argument, run_command

LAYERS_HELP = """Time one layer of each distinct kind (plus the embedding and the head) at the
model's real shapes with random weights. Needs only config.json. The modules are the
runtime's own (those `verify` runs); a quantized checkpoint is timed dequantized, in --dtype.

\b
Example:
  reshard profile layers meta-llama/Llama-3.1-8B --device cuda -o costs.json
  reshard plan meta-llama/Llama-3.1-8B --pp 4 --costs costs.json
"""


@click.group(help="Measure per-layer cost or per-expert load.")
def profile() -> None:
    pass


@profile.command(help=LAYERS_HELP)
@model_argument
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch", type=click.IntRange(1, 1 << 20), default=1, show_default=True)
@click.option("--seq", type=click.IntRange(1, 1 << 24), default=128, show_default=True)
@click.option("--mode", type=click.Choice(["prefill", "decode"]), default="prefill")
@click.option("--warmup", type=click.IntRange(0, 10**6), default=10, show_default=True)
@click.option("--iters", type=click.IntRange(1, 10**6), default=30, show_default=True)
@click.option("--dtype", help="float32 | bfloat16 | float16 (default bf16 on CUDA, fp32 on CPU).")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@run_command
def layers(model, device, batch, seq, mode, warmup, iters, dtype, out, quiet) -> None:
    from ..io.source import open_config
    from ..layout.stages.costs import write_costs
    from ..profile.layers import profile_layers

    _, hp, _ = open_config(model)
    result = profile_layers(
        hp, device=device, batch=batch, seq=seq, mode=mode, warmup=warmup, iters=iters,
        dtype=dtype, progress=not quiet,
    )  # fmt: skip
    write_costs(out, result)
    click.echo(f"{result['device']} {result['dtype']} {mode} batch {batch} seq {seq}:")
    for kind, k in result["kinds"].items():
        click.echo(
            f"  {kind:<36} median {k['median_us']:10.1f} us  IQR {k['iqr_us']:8.1f} us  "
            f"x{max(len(k['layers']), 1)}"
        )
    click.echo(f"wrote {out}")


EXPERTS_HELP = """Count the tokens the router sends to each expert of every MoE layer on calibration
prompts (prefill + greedy decode), with the reference runtime on one device. Every k-th prompt
is held out (--heldout) and counted separately, to score placements on unseen prompts. Prints
balanced vs contiguous placement at --ep (default: the largest of 8/4/2 that divides E and
leaves >= 2 experts per rank).

\b
Example:
  reshard profile experts ./Qwen1.5-MoE-A2.7B --prompts calib.txt -o expert_load.json
  reshard profile experts ./tiny-moe --prompt-ids 5,17,300 --prompt-ids 9,4 -o load.json
  reshard convert ./Qwen1.5-MoE-A2.7B --tp 4 --ep 4 --expert-load expert_load.json -o out/
"""


@profile.command(help=EXPERTS_HELP)
@model_argument
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="One per line.")
@click.option("--prompt-ids", multiple=True, help="Comma-separated token ids; repeatable.")
@click.option("--heldout", type=float, default=0.25, show_default=True, help="Held-out fraction.")
@click.option("--max-new-tokens", type=int, default=8, show_default=True)
@click.option("--ep", type=int, help="Expert-parallel degree of the placement report.")
@click.option("--device", help="cpu, cuda or cuda:N (default: cuda if available).")
@click.option("--dtype", help="float32 | bfloat16 | float16 (default: the checkpoint's).")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw load and placement (PNG).")
@run_command
def experts(
    model, prompts_file, prompt_ids, heldout, max_new_tokens, ep, device, dtype, out, quiet, plot
):
    from ..layout.experts.report import write_expert_load
    from ..profile.experts import format_profile, profile_experts
    from ..profile.plot import plot_profile, require_matplotlib

    if plot is not None:
        require_matplotlib()  # before profiling: exit 2 with the install command

    result = profile_experts(
        model, prompts_file=prompts_file, prompt_ids=list(prompt_ids), heldout=heldout,
        max_new_tokens=max_new_tokens, device=device, dtype=dtype, ep=ep, progress=not quiet,
    )  # fmt: skip
    write_expert_load(out, result.load)
    click.echo(format_profile(result))
    click.echo(f"wrote {out}")
    if plot is not None:
        plot_profile(plot, result)
        click.echo(f"wrote {plot}")
