"""Pieces every command shares: the error-to-exit-code wrapper, MODEL with --revision, the
layout flags and the recipe they make. Only the cli package prints and exits."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from ..dtypes import cli_spellings
from ..errors import InputError, ReshardError
from ..layout.experts.place import PLACEMENTS
from ..layout.formats import FORMAT_NAMES
from ..layout.recipe import build_recipe, normalise_dtype


def run_command(fn):
    """Map reshard's errors to messages and exit codes; nothing else catches them."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReshardError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except BrokenPipeError:
            _stdout_closed()
        except OSError as e:
            click.echo(f"error: {e.filename or '(no file)'}: {e.strerror or e}", err=True)
            sys.exit(3)
        except KeyboardInterrupt as e:
            # Before the commit, output written so far stays as *.partial with no manifest:
            # incomplete by definition, and the next convert into the folder clears it. A
            # commit is never cut (io/commit.py): an interrupt during it says so.
            said = str(e) or "nothing was committed (no manifest written)."
            click.echo(f"interrupted: {said}", err=True)
            sys.exit(130)

    return wrapper


def _stdout_closed() -> None:
    """Whatever read reshard's standard output closed it (`| head`): say so, and point stdout
    at /dev/null so that the flush at exit does not fail a second time."""
    click.echo(
        "error: standard output: Broken pipe (the program reading reshard's output closed "
        "it first; write to a file with > FILE instead).",
        err=True,
    )
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(3)


def with_revision(model: str, revision: str | None) -> str:
    """MODEL plus --revision -> 'org/name@rev' (the one form the library reads)."""
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


DTYPE_CHOICES = cli_spellings()


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
                "--placement", type=click.Choice(PLACEMENTS), help="Expert placement."
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
            click.option(
                "--format", "format", type=click.Choice(FORMAT_NAMES),
                help="Output format: native (default) or vllm (vLLM's sharded_state files).",
            ),
            click.option(
                "--vllm-version", help="vLLM whose sharded_state contract to write (0.32).",
            ),
        ]
    ):  # fmt: skip
        fn = option(fn)
    return fn


def recipe_from(recipe, dtype=None, **flags):
    if dtype is not None:  # --dtype auto is vLLM's word for keep
        flags["dtype"] = "keep" if dtype.lower() == "auto" else normalise_dtype(dtype)
    return build_recipe(recipe, **flags)
