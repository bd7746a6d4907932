"""`reshard plan`: per-rank memory, stage and expert report, from config.json alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import InputError
from .common import layout_options, model_argument, recipe_from, run_command

PLAN_HELP = """Plan a layout without reading weights: each rank's weight bytes (exactly what
convert writes), its memory in vLLM's terms and KV cache capacity on a GPU, the stage report
and the expert report.
Or, with --suggest, the fewest GPUs that hold the model and the KV cache, with TP inside a
node and PP across nodes.

MODEL is a model folder (its safetensors headers are used when present), a bare config.json,
or a hub id (only its config.json is fetched). Memory follows vLLM's profile: of
--gpu-memory-utilization x the GPU's memory, each rank spends its weights, non-torch memory
and the activation peak of a --max-num-batched-tokens forward pass (and the sampler on the
last stage); the rest is KV cache, in tokens and blocks of 16. A layout is deployable when
every rank's KV cache holds batch x context tokens x its layers x its kv heads x head_dim x 2
(K, V) in the weights' dtype; sliding-window layers cache at most the window. See
docs/memory.md for the model and its calibration against vLLM's logs.

\b
Example:
  reshard plan ./Llama-3-70B --tp 4 --pp 2 --gpu H100 --context 8192
  reshard plan config.json --suggest --gpu L40S --context 32768 --batch 4
  reshard plan meta-llama/Llama-3.1-8B --pp 4 --gpu-memory 40 --json
"""

CONTEXT_HELP = "Tokens per sequence in the KV cache (default: max_position_embeddings)."
BATCH_HELP = "Sequences in the KV cache at once."
UTIL_HELP = "Share of the GPU's memory the engine may use (vLLM's flag)."
TOKENS_HELP = (
    "Tokens in the profile run's forward pass (vLLM's flag). Default: vllm serve's, 8192 on "
    "GPUs of 70+ GiB but the A100, else 2048."
)
SEQS_HELP = "Rows the profile run samples (vLLM's flag). Default: vllm serve's, 1024 or 256 alike."
# Layout flags --suggest chooses or does not use: giving one would silently do nothing.
SUGGEST_CONFLICTS = {
    "tp": "--tp",
    "pp": "--pp",
    "ep": "--ep",
    "dp": "--dp",
    "recipe": "--recipe",
    "placement": "--placement",
    "redundant": "--redundant",
    "load": "--expert-load",
}


# Bounds on the numbers of a plan: past them a value is a typo, and the memory arithmetic
# (floats) would overflow.
MAX_TOKENS = 1 << 24  # --context, --max-num-batched-tokens
MAX_SEQS = 1 << 20  # --batch, --max-num-seqs
MAX_GPU_GB = 1e6


@click.command(help=PLAN_HELP)
@model_argument
@layout_options
@click.option("--gpu", "gpu_name", help="GPU model: B200 B100 H200 H100 L4 L40S L40 A100.")
@click.option(
    "--gpu-memory",
    type=click.FloatRange(min=0, max=MAX_GPU_GB, min_open=True),
    help="Memory of another GPU, in decimal GB.",
)
@click.option("--context", type=click.IntRange(1, MAX_TOKENS), help=CONTEXT_HELP)
@click.option(
    "--batch", type=click.IntRange(1, MAX_SEQS), default=1, show_default=True, help=BATCH_HELP
)
@click.option(
    "--gpu-memory-utilization",
    "utilization",
    type=float,
    default=0.9,
    show_default=True,
    help=UTIL_HELP,
)
@click.option(
    "--max-num-batched-tokens",
    "batched_tokens",
    type=click.IntRange(1, MAX_TOKENS),
    help=TOKENS_HELP,
)
@click.option("--max-num-seqs", type=click.IntRange(1, MAX_SEQS), help=SEQS_HELP)
@click.option("--suggest", is_flag=True, help="Pick tp x pp for the GPU (needs --gpu).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw expert load/placement (PNG).")
@run_command
def plan(model, gpu_name, gpu_memory, context, batch, suggest, as_json, plot, **flags):
    from ..layout.memory.activation import EngineLimits
    from ..layout.memory.model import resolve_gpu

    gpu = resolve_gpu(gpu_name, gpu_memory, utilization=flags.pop("utilization"))
    limits = EngineLimits.for_gpu(
        gpu and gpu.name,
        gpu and gpu.total_bytes,
        flags.pop("batched_tokens"),
        flags.pop("max_num_seqs"),
    )
    layout = flags
    if plot is not None:
        from ..profile.plot import require_matplotlib

        require_matplotlib()  # before any work: exit 2 with the install command
    if suggest:
        if plot is not None:
            raise InputError("--plot would do nothing with --suggest; plan a layout to plot it.")
        gpus_per_node = layout.pop("gpus_per_node") or 8
        _suggest(model, gpu, context, batch, gpus_per_node, as_json, layout, limits)
        return
    from ..layout.memory.format import format_plan, plan_json
    from ..plan import load_shapes, plan_memory

    recipe = recipe_from(**layout)
    shapes = load_shapes(model, dtype=recipe.dtype)
    pm = plan_memory(shapes, recipe, gpu=gpu, context=context, batch=batch, limits=limits)
    click.echo(json.dumps(plan_json(pm), indent=1) if as_json else format_plan(pm))
    if plot is not None:
        from ..profile.plot import plot_plan

        plot_plan(plot, shapes.hparams, recipe)
        click.echo(f"wrote {plot}", err=as_json)


def _suggest(model, gpu, context, batch, gpus_per_node, as_json, layout, limits) -> None:
    from ..layout.memory.format import format_suggestion, suggestion_json
    from ..layout.memory.shapes import kv_budget, resolve_context
    from ..layout.memory.suggest import suggest_layout
    from ..plan import load_shapes

    if gpu is None:
        raise InputError(
            "--suggest needs a GPU to fit: pass --gpu NAME (B200, B100, H200, H100, L4, L40S, "
            "L40, A100) or --gpu-memory GB."
        )
    given = [SUGGEST_CONFLICTS[k] for k in SUGGEST_CONFLICTS if layout[k] is not None]
    if given:
        raise InputError(
            f"{', '.join(given)} would do nothing with --suggest, which picks tp and pp itself "
            "(ep 1, dp 1). Drop them, or plan that layout without --suggest."
        )
    recipe = recipe_from(**layout)
    shapes = load_shapes(model, dtype=recipe.dtype)
    tokens, origin = resolve_context(shapes.hparams, context)
    budget = kv_budget(shapes, recipe, context=tokens, batch=batch)
    sug = suggest_layout(shapes, recipe, gpu, budget, gpus_per_node=gpus_per_node, limits=limits)
    text = format_suggestion(sug, model, context_origin=origin)
    click.echo(json.dumps(suggestion_json(sug), indent=1) if as_json else text)
    if sug.choice is None:
        sys.exit(2)  # a refusal: nothing fits
