"""Default output folders when -o is not given: `./<model name>-tp4-pp2` for convert,
`./<model name>-hf` for export, and the rule that a default folder from an earlier run is
never reused silently (a rerun resumes with --resume or writes elsewhere with -o).

Names only: nothing here reads weights or writes files.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .io.manifest import MANIFEST
from .io.manifest_value import Manifest

NATIVE = "native"  # the default output format: no part in the name


def model_name(model: str) -> str:
    """The last part of a local path, or of a hub id (`org/name[@rev]`)."""
    local = Path(model).expanduser()
    if local.exists():
        return local.resolve().name
    return Path(model.partition("@")[0]).name


def convert_out_name(
    model: str, *, tp: int, pp: int = 1, ep: int = 1, dp: int = 1, format: str = NATIVE
) -> str:
    """`<name>-tp4-pp2`: tp always; pp, ep, dp when above 1; the format when not native."""
    parts = [f"tp{tp}"] + [f"{k}{v}" for k, v in (("pp", pp), ("ep", ep), ("dp", dp)) if v > 1]
    if format != NATIVE:
        parts.append(format)
    return "-".join([model_name(model), *parts])


def export_out_name(manifest: Manifest, out_dir: Path) -> str:
    """`<original model name>-hf`, from the source the output records (else OUT's name)."""
    source = manifest.source
    model = source.get("repo_id") or source.get("path") or str(Path(out_dir).resolve())
    return f"{model_name(str(model))}-hf"


def check_default_rerun(out_dir: Path, *, resume: bool, force: bool) -> None:
    """A default folder that exists came from an earlier run: continue it only when asked
    (--resume for an unfinished one, --force to replace), else exit 2 naming the fix."""
    if not out_dir.exists() or force:
        return
    if (out_dir / MANIFEST).exists():
        raise InputError(
            f"{out_dir}: already holds a finished reshard output from an earlier run (no -o "
            f"given, so this default folder). Check it with `reshard verify {out_dir}`, write "
            "elsewhere with -o DIR, or replace it with --force."
        )
    if not resume:
        raise InputError(
            f"{out_dir}: exists already (an earlier run that did not finish, or a folder of "
            "yours; no -o given, so this default folder). Pass --resume to finish an earlier "
            "run, or write elsewhere with -o DIR."
        )
