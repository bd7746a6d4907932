"""An interrupted convert leaves files that do not look complete (`*.partial`, no manifest),
verify refuses such a folder, and the next convert into it cleans up and succeeds."""

from __future__ import annotations

import json

import pytest
from checkpoints import write_checkpoint
from click.testing import CliRunner

import reshard.io.writer
from reshard.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("stage", ["_finish_hashes", "account"])
def test_interrupted_convert_then_rerun(tmp_path, monkeypatch, stage):
    src = write_checkpoint(tmp_path / "src", shard_size="30KB")
    out = tmp_path / "out"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C or a killed job leaves behind

    with monkeypatch.context() as m:
        m.setattr(reshard.io.writer, stage, interrupt)
        result = run("convert", src, "--tp", "2", "-o", out)
    assert result.exit_code == 130, result.output
    assert "interrupted: nothing was committed" in result.output
    left = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in left
    partials = ["rank-00000.safetensors.partial", "rank-00001.safetensors.partial"]
    assert left == sorted(
        [".reshard.lock", ".reshard.subsets.lock", "reshard-record.json", *partials]
    )
    record = json.loads((out / "reshard-record.json").read_text())  # names what it left
    assert {"rank-00000.safetensors", "rank-00001.safetensors"} <= set(record["files"])
    shards = sorted(src.glob("*.safetensors"))
    assert [f[:2] for f in record["source"]["files"]] == [
        [p.name, p.stat().st_size] for p in shards
    ]

    result = run("verify", out)
    assert result.exit_code == 2, result.output
    assert "manifest.json: missing" in result.output and "Re-run reshard convert" in result.output

    result = run("convert", src, "--tp", "2", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".partial")]
    rerun = json.loads((out / "reshard-record.json").read_text())
    assert rerun["plan_xxh3_128"] == record["plan_xxh3_128"]  # same layout, same plan
    assert "manifest.json" in names
    assert run("verify", out, "--level", "hashes", "--level", "weights").exit_code == 0


def test_force_on_a_finished_output_removes_the_manifest_first(tmp_path, monkeypatch):
    """--force over a finished output: if the new run dies, no stale manifest vouches for
    half-replaced files."""
    src = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    assert run("convert", src, "--tp", "2", "-o", out, "--quiet").exit_code == 0

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reshard.io.writer, "account", interrupt)
    assert run("convert", src, "--tp", "2", "-o", out, "--force").exit_code == 130
    assert not (out / "manifest.json").exists()
    assert run("verify", out).exit_code == 2


def test_disk_full_exits_3_naming_the_file_and_the_fix(tmp_path, monkeypatch):
    import errno
    import os

    src = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    real_pwrite = os.pwrite

    def full_disk(fd, data, offset):
        if offset > 0:  # the headers go in; the first tensor's data does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(reshard.io.writer.os, "pwrite", full_disk)
    monkeypatch.setattr(reshard.io.writer.os, "copy_file_range", None, raising=False)
    result = run("convert", src, "--tp", "2", "-o", out, "--quiet")
    assert result.exit_code == 3, result.output
    assert "rank-0000" in result.output and ".safetensors.partial" in result.output
    assert "No space left on device" in result.output
    assert "free space on that disk or write elsewhere with -o" in result.output
    assert not (out / "manifest.json").exists()
