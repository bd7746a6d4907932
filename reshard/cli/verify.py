"""`reshard verify`: the three tiers over an output folder; exit 1 on any mismatch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .common import run_command

VERIFY_HELP = """Prove an output folder: hashes, bitwise weights, and generation.

\b
Example:
  reshard verify out/
  reshard verify out/ --source ./Llama-3-8B --level hashes --level weights
  torchrun --nnodes 2 --nproc-per-node 4 ... -m reshard verify out/   (multi-node)
"""


@click.command(help=VERIFY_HELP)
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
    from ..verify.levels import LEVELS, verify_output
    from .report import format_verify, verify_report

    options = {
        "prompt_ids": _prompt_ids(prompt_ids),
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
        from ..io.files import io_error

        try:
            json_path.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise io_error(e, json_path) from None
    sys.exit(0 if report["passed"] else 1)


def _prompt_ids(specs) -> list | None:
    """--prompt-ids as lists of ints (None: not given; the parser's module is loaded only
    then, so the file tiers start without it)."""
    if not specs:
        return None
    from ..profile.experts import parse_prompt_ids

    return [parse_prompt_ids(s) for s in specs]
