"""`reshard convert` and its inverse `reshard export`."""

from __future__ import annotations

from pathlib import Path

import click

from .common import layout_options, model_argument, recipe_from, run_command

CONVERT_HELP = """Write per-rank safetensors shards and OUT/manifest.json. Without -o, OUT is
./<model name>-tp4-pp2 (the layout's parts); a rerun into it needs --resume, --force or -o.

\b
Example:
  reshard convert --tp 4 --pp 2 meta-llama/Llama-3-70B
  reshard convert ./model --recipe recipes/llama3-70b-8xh100.toml -o out/ --dtype bf16
"""


@click.command(help=CONVERT_HELP)
@model_argument
@click.option(
    "-o", "--out", "out_dir", type=click.Path(path_type=Path),
    help="Output folder (default: ./<model name>-tp4-pp2).",
)  # fmt: skip
@layout_options
@click.option("--max-file-size", help="Split a rank's file past this size (e.g. 20GB).")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (weights_only).")
@click.option("--force", is_flag=True, help="Replace an existing output in OUT.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--workers", type=click.IntRange(min=1), help="Tensors copied at once (default: the cores)."
)
@click.option("--ranks", help="Write only these ranks' files (0-3, 4-7, 0,2,5).")
@click.option("--resume", is_flag=True, help="Keep finished ranks, write the rest.")
@run_command
def convert(
    model, out_dir, max_file_size, allow_pickle, force, quiet, workers, ranks, resume, **layout
) -> None:
    from ..convert import convert_model
    from .report import format_convert_summary

    recipe = recipe_from(max_file_size=max_file_size, **layout)
    if out_dir is None:
        out_dir = default_convert_out(model, recipe, resume=resume, force=force, ranks=ranks)
    result = convert_model(
        model,
        out_dir,
        recipe,
        allow_pickle=allow_pickle,
        force=force,
        progress=not quiet,
        workers=workers,
        ranks=ranks,
        resume=resume,
    )
    click.echo(format_convert_summary(result))
    if result.stage_plan is not None:  # the split just written, against the even split
        click.echo(f"stage costs: {result.stage_plan.cost_source}")
        click.echo(result.stage_plan.report.render())


def default_convert_out(model: str, recipe, *, resume: bool, force: bool, ranks) -> Path:
    """./<model name>-tp4-pp2, said on the first line; an earlier run's folder is refused
    unless --resume or --force says what to do with it (--ranks runs and a torchrun world's
    processes share one folder by design: they join it)."""
    from ..io.torchrun import torchrun_world
    from ..out_name import check_default_rerun, convert_out_name

    name = convert_out_name(
        model, tp=recipe.tp, pp=recipe.pp, ep=recipe.ep, dp=recipe.dp, format=recipe.format
    )
    out_dir = Path(name)
    click.echo(f"writing to ./{name} (no -o given)")
    if ranks is None and torchrun_world() is None:
        check_default_rerun(out_dir, resume=resume, force=force)
    return out_dir


EXPORT_HELP = """Write a reshard output back as a standard Hugging Face checkpoint: the original
tensors (names, dtypes, shapes, bytes; padding removed, replicas once, tied embeddings as in
the original) in model-0000X-of-0000N.safetensors files, the index (written last), config,
generation config and tokenizer.

Without -o, HF_DIR is ./<model name>-hf.

\b
Example:
  reshard export Llama-3-70B-tp4-pp2
  reshard export out/ -o Llama-3-8B-hf/ --max-shard-size 5GB
"""


@click.command(help=EXPORT_HELP)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", "hf_dir", type=click.Path(path_type=Path),
    help="Checkpoint folder (default: ./<model name>-hf).",
)  # fmt: skip
@click.option("--max-shard-size", default="5GB", show_default=True, help="Per safetensors file.")
@click.option("--force", is_flag=True, help="Replace a checkpoint already in the folder.")
@run_command
def export(out_dir, hf_dir, max_shard_size, force) -> None:
    from ..export import export_output
    from ..layout.recipe import parse_size
    from .report import format_export_summary

    size = parse_size(max_shard_size, where="--max-shard-size")
    if hf_dir is None:
        hf_dir = default_export_out(out_dir)
    result = export_output(out_dir, hf_dir, max_shard_size=size, force=force)
    click.echo(format_export_summary(result))


def default_export_out(out_dir: Path) -> Path:
    """./<original model name>-hf, said on the first line."""
    from ..io.manifest import read_manifest
    from ..out_name import export_out_name

    name = export_out_name(read_manifest(out_dir), out_dir)
    click.echo(f"writing to ./{name} (no -o given)")
    return Path(name)
