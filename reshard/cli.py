"""The `reshard` command line. Only this module prints and exits.

Exit codes: 0 success; 1 verification found a mismatch or corruption; 2 bad input, bad
recipe, unsupported model or a refusal; 3 an I/O or environment failure.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import ReshardError

MAIN_HELP = """Convert a Hugging Face checkpoint into per-rank safetensors shards (TP/PP/EP/DP)
and prove they generate what the original generates.

\b
Example:
  reshard inspect meta-llama/Llama-3.1-8B
  reshard plan    meta-llama/Llama-3.1-70B --tp 4 --pp 2 --gpu H100
  reshard convert meta-llama/Llama-3.1-70B --tp 4 --pp 2 -o out/
  reshard verify  out/

Exit codes: 0 ok, 1 verification mismatch, 2 bad input or refusal, 3 I/O failure,
130 interrupted.
"""


def run_command(fn):
    """Map reshard's errors to messages and exit codes; nothing else catches them."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReshardError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            click.echo(f"error: {e.filename or ''}: {e.strerror or e}", err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            # Output written so far stays as *.partial with no manifest: incomplete by
            # definition, and the next convert into the folder clears it.
            click.echo("interrupted: nothing was committed (no manifest written).", err=True)
            sys.exit(130)

    return wrapper


@click.group(help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reshard")
def main() -> None:
    pass


def with_revision(model: str, revision: str | None) -> str:
    """MODEL plus --revision -> 'org/name@rev' (the one form the library reads)."""
    from .errors import InputError

    if revision is None:
        return model
    if "@" in model:
        raise InputError(f"{model}: gives a revision and so does --revision {revision}; use one.")
    if Path(model).expanduser().exists():
        raise InputError(
            f"{model}: --revision {revision} is for hub repo ids, and {model} is a local path."
        )
    return f"{model}@{revision}"


def model_argument(fn):
    """MODEL and --revision (a hub branch, tag or commit; same as MODEL@REV)."""

    @functools.wraps(fn)
    def wrapper(*args, model, revision, **kwargs):
        return fn(*args, model=run_command(with_revision)(model, revision), **kwargs)

    wrapper = click.option("--revision", help="Hub branch, tag or commit (same as MODEL@REV).")(
        wrapper
    )
    return click.argument("model")(wrapper)


DTYPE_CHOICES = ["auto", "keep", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"]
PLACEMENT_CHOICES = ["contiguous", "round_robin", "balanced"]


def layout_options(fn):
    for option in reversed(
        [
            click.option("--recipe", type=click.Path(path_type=Path), help="TOML recipe."),
            click.option("--tp", type=int, help="Tensor-parallel degree."),
            click.option("--pp", type=int, help="Pipeline-parallel degree (stages)."),
            click.option("--ep", type=int, help="Expert-parallel degree (divides tp)."),
            click.option("--dp", type=int, help="Data-parallel replicas (files are shared)."),
            click.option(
                "--dtype", type=click.Choice(DTYPE_CHOICES, case_sensitive=False),
                help="Cast on write (default keep; auto = keep).",
            ),
            click.option("--costs", type=click.Path(path_type=Path), help="Stage costs JSON."),
            click.option(
                "--expert-load", "load", type=click.Path(path_type=Path), help="Load JSON."
            ),
            click.option(
                "--placement", type=click.Choice(PLACEMENT_CHOICES), help="Expert placement."
            ),
            click.option("--redundant", type=int, help="Redundant expert slots per MoE layer."),
            click.option(
                "--gpus-per-node",
                type=click.IntRange(min=1),
                help="Keep expert groups on nodes of N GPUs (grouped routing).",
            ),
            click.option(
                "--keep-mtp", "keep_mtp", is_flag=True, default=None,
                help="Write DeepSeek's MTP layer whole on the last stage's tp_rank 0.",
            ),
        ]
    ):  # fmt: skip
        fn = option(fn)
    return fn


def recipe_from(recipe, dtype=None, **flags):
    from .recipe import build_recipe, normalise_dtype

    if dtype is not None:  # --dtype auto is vLLM's word for keep
        flags["dtype"] = "keep" if dtype.lower() == "auto" else normalise_dtype(dtype)
    return build_recipe(recipe, **flags)


@main.command(
    help="Show what is in a checkpoint.\n\n\b\nExample:\n  reshard inspect ./Llama-3-8B --json"
)
@model_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (weights_only).")
@run_command
def inspect(model: str, as_json: bool, allow_pickle: bool) -> None:
    from .inspect import format_inspect, inspect_source
    from .output_source import open_model

    info = inspect_source(open_model(model, allow_pickle=allow_pickle))
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))


CONVERT_HELP = """Write per-rank safetensors shards and OUT/manifest.json.

\b
Example:
  reshard convert meta-llama/Llama-3.1-70B --tp 4 --pp 2 -o out/
  reshard convert ./model --recipe recipes/llama3-70b-8xh100.toml -o out/ --dtype bf16
"""


@main.command(help=CONVERT_HELP)
@model_argument
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path))
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
    from .convert import convert_model
    from .report import format_convert_summary

    recipe = recipe_from(max_file_size=max_file_size, **layout)
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


EXPORT_HELP = """Write a reshard output back as a standard Hugging Face checkpoint: the original
tensors (names, dtypes, shapes, bytes; padding removed, replicas once, tied embeddings as in
the original) in model-0000X-of-0000N.safetensors files, the index (written last), config,
generation config and tokenizer.

\b
Example:
  reshard export out/ -o Llama-3-8B-hf/ --max-shard-size 5GB
"""


@main.command(help=EXPORT_HELP)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "hf_dir", required=True, type=click.Path(path_type=Path))
@click.option("--max-shard-size", default="5GB", show_default=True, help="Per safetensors file.")
@click.option("--force", is_flag=True, help="Replace a checkpoint already in the folder.")
@run_command
def export(out_dir, hf_dir, max_shard_size, force) -> None:
    from .export import export_output
    from .recipe import parse_size
    from .report import format_export_summary

    size = parse_size(max_shard_size, where="--max-shard-size")
    result = export_output(out_dir, hf_dir, max_shard_size=size, force=force)
    click.echo(format_export_summary(result))


VERIFY_HELP = """Prove an output folder: hashes, bitwise weights, and generation.

\b
Example:
  reshard verify out/
  reshard verify out/ --source ./Llama-3-8B --level hashes --level weights
  torchrun --nnodes 2 --nproc-per-node 4 ... -m reshard verify out/   (multi-node)
"""


@main.command(help=VERIFY_HELP)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--source", help="The source MODEL, if not at the path in the manifest.")
@click.option(
    "--level",
    "levels",
    multiple=True,
    type=click.Choice(["hashes", "weights", "generate"]),
    help="Tier(s) to run (default: every tier that can run).",
)
@click.option("--prompt-ids", multiple=True, help="Comma-separated token ids; repeatable.")
@click.option(
    "--prompts", "prompts_file", type=click.Path(path_type=Path), help="Text prompts, one per line."
)
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--device", help="cpu, cuda or cuda:N for the generate tier (default: cuda if any).")
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "checkpoint"]),
    default="float32",
    show_default=True,
    help="float32: weights upcast as they load, tokens must be identical; checkpoint: the "
    "shards' own dtype (less memory), near ties exempted and counted.",
)
@click.option(
    "--reference",
    type=click.Choice(["auto", "full", "streamed"]),
    default="auto",
    show_default=True,
    help="full: the source model on one device; streamed: one layer at a time, "
    "teacher-forced on the sharded tokens (for models larger than one device); "
    "auto: full if it fits in 80% of the free memory.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write a JSON report.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@run_command
def verify(
    out_dir, source, levels, prompt_ids, prompts_file, max_new_tokens, device, compute_dtype,
    reference, json_path, quiet,
):  # fmt: skip
    from .expert_profile import parse_prompt_ids
    from .report import format_verify, verify_report
    from .verify import LEVELS, verify_output

    options = {
        "prompt_ids": [parse_prompt_ids(s) for s in prompt_ids] or None,
        "prompts_file": prompts_file,
        "max_new_tokens": max_new_tokens,
        "device": device,
        "reference": reference,
        "compute_dtype": compute_dtype,
    }
    manifest, results = verify_output(
        out_dir, levels=tuple(levels) or LEVELS, source=source, generate_options=options,
        progress=not quiet,
    )  # fmt: skip
    report = verify_report(manifest, results)
    click.echo(format_verify(report, results))
    if json_path:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(0 if report["passed"] else 1)


def _register_subcommands() -> None:
    from .cli_plan import plan
    from .cli_profile import profile

    main.add_command(plan)
    main.add_command(profile)


_register_subcommands()
