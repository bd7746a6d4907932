"""Helpers of the hostile-input corpora: run the CLI in-process, check its one error line,
and hash folders before and after (nothing a refused run did not write may change)."""

from __future__ import annotations

from pathlib import Path

import xxhash
from click.testing import CliRunner

from reshard.cli import main


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def digest_tree(path: Path) -> dict[str, str]:
    """Every file under `path` (symlinks as their target text) by content hash; reshard's own
    lock files (`.reshard.*.lock`, created empty by any run) are left out."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.name.startswith(".reshard.") and p.name.endswith(".lock") and not p.is_symlink():
            continue
        if p.is_symlink():
            out[str(p.relative_to(path))] = "-> " + str(p.readlink())
        elif p.is_file():
            out[str(p.relative_to(path))] = xxhash.xxh3_128(p.read_bytes()).hexdigest()
    return out


def expect_error(result, code: int, *needles: str) -> str:
    """Exited `code` through the CLI's error path with one `error:` line naming every needle,
    and no traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    message = result.stderr
    assert message.startswith("error: ") and message.count("\n") == 1, message
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in message, (needle, message)
    return message
