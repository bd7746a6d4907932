"""The `reshard` command line: one module per command. Only this package prints and exits.

Exit codes: 0 success; 1 verification found a mismatch or corruption; 2 bad input, bad
recipe, unsupported model or a refusal; 3 an I/O or environment failure.
Each command imports its library modules inside its function: `reshard --help` and a typo'd
flag load neither torch nor the planners.
"""

from __future__ import annotations

import click

from .. import __version__
from .convert import convert, export
from .inspect import inspect
from .plan import plan
from .profile import profile
from .verify import verify

MAIN_HELP = """Convert a Hugging Face checkpoint into per-rank safetensors shards (TP/PP/EP/DP)
and prove they generate what the original generates.

\b
Example:
  reshard inspect meta-llama/Llama-3.1-8B
  reshard plan    meta-llama/Llama-3.1-70B --tp 4 --pp 2 --gpu H100
  reshard convert --tp 4 --pp 2 meta-llama/Llama-3-70B      (writes ./Llama-3-70B-tp4-pp2)
  reshard verify  Llama-3-70B-tp4-pp2

Exit codes: 0 ok, 1 verification mismatch, 2 bad input or refusal, 3 I/O failure,
130 interrupted.
"""


@click.group(help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reshard")
def main() -> None:
    pass


for command in (inspect, plan, convert, export, verify, profile):
    main.add_command(command)
