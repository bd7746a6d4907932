"""Issue 25, classes 1, 2, 4 and the lock symlink of 9: a folder reshard writes belongs to
someone. A finished output or checkpoint in the way is the user's until --force; --force
replaces only what a reshard record, or a sealed manifest's hashes, prove reshard wrote; and
a refused run deletes nothing (the locks that protect a file come before its deletion).

Each case: exit 2, one `error:` line naming the file and the fix, and every folder involved
byte-identical before and after (reshard's own empty lock files aside).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest
from checkpoints import write_checkpoint
from hostile import cli, digest_tree, expect_error

from reshard.convert import convert_model
from reshard.export import export_output
from reshard.layout.recipe import build_recipe

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
RECORD = "reshard-record.json"
RANK0 = "rank-00000.safetensors"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A source, its tp 2 output and that output's export, made once."""
    root = tmp_path_factory.mktemp("own")
    src = write_checkpoint(root / "src")
    out = root / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    hf = root / "hf"
    export_output(out, hf)
    return src, out, hf


@pytest.fixture
def copies(built, tmp_path):
    src, out, hf = built
    shutil.copytree(out, tmp_path / "out")
    shutil.copytree(hf, tmp_path / "hf")
    before = digest_tree(src)
    yield src, tmp_path / "out", tmp_path / "hf"
    assert digest_tree(src) == before  # the source, whatever happened


# --- 1: a finished folder is the user's until --force -----------------------------------------


def test_export_into_a_finished_reshard_output_is_refused(copies, tmp_path):
    src, out, _ = copies
    other = tmp_path / "other"
    convert_model(str(src), other, build_recipe(tp=1))
    before = digest_tree(out)
    expect_error(
        cli("export", other, "-o", out),
        2,
        f"{out}: already holds a reshard output ({MANIFEST})",
        "Pass --force to replace it, or choose another folder with -o",
    )
    assert digest_tree(out) == before


def test_convert_into_a_finished_export_is_refused(copies):
    src, _, hf = copies
    before = digest_tree(hf)
    expect_error(
        cli("convert", src, "--tp", "2", "-o", hf, "--quiet"),
        2,
        f"{hf}: already holds a checkpoint ({INDEX})",
        "Pass --force to replace it, or choose another folder with -o",
    )
    assert digest_tree(hf) == before


def test_convert_ranks_into_a_finished_export_is_refused(copies):
    src, _, hf = copies
    before = digest_tree(hf)
    expect_error(
        cli("convert", src, "--tp", "2", "--ranks", "0", "-o", hf, "--quiet"),
        2,
        f"{hf}: already holds a checkpoint ({INDEX})",
        "choose another folder with -o",
    )
    assert digest_tree(hf) == before


def test_force_replaces_a_finished_export_it_wrote(copies):
    """With --force the export's own files (its record names them) go, nothing else."""
    src, _, hf = copies
    (hf / "notes.txt").write_text("mine")
    result = cli("convert", src, "--tp", "2", "-o", hf, "--quiet", "--force")
    assert result.exit_code == 0, result.output
    assert not (hf / INDEX).exists() and not list(hf.glob("model-*.safetensors"))
    assert (hf / "notes.txt").read_text() == "mine" and (hf / MANIFEST).is_file()


# --- 2: --force replaces only what reshard provably wrote -------------------------------------


def test_force_over_another_tools_manifest_deletes_nothing(copies, tmp_path):
    src, _, _ = copies
    o = tmp_path / "theirs"
    o.mkdir()
    (o / MANIFEST).write_text(json.dumps({"files": {"data.bin": {}, RANK0: {}}}))
    (o / "data.bin").write_bytes(b"their weights")
    (o / RANK0).write_bytes(b"their rank file")
    before = digest_tree(o)
    expect_error(
        cli("convert", src, "--tp", "2", "-o", o, "--quiet", "--force"),
        2,
        f"{o / MANIFEST}: exists, and no reshard record in {o} names it",
        "Move it away, or choose another -o",
    )
    assert digest_tree(o) == before


def test_force_over_an_output_without_a_record_keeps_user_added_files(copies):
    """An output without a record: its sealed manifest proves its rank and side files by hash;
    a tokenizer file the user added (the source has none) is theirs and stays."""
    src, out, _ = copies
    (out / RECORD).unlink()
    (out / "tokenizer.json").write_text('{"added": "by the user"}')
    result = cli("convert", src, "--tp", "1", "-o", out, "--quiet", "--force")
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").read_text() == '{"added": "by the user"}'
    assert sorted(p.name for p in out.glob("rank-*")) == [RANK0]


def test_force_over_an_output_without_a_record_refuses_an_edited_side_file(copies):
    src, out, _ = copies
    (out / RECORD).unlink()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "note": "edited by the user"}))
    before = digest_tree(out)
    expect_error(
        cli("convert", src, "--tp", "1", "-o", out, "--quiet", "--force"),
        2,
        f"{out / 'config.json'}: exists, and no reshard record in {out} names it",
        "Move it away, or choose another -o",
    )
    assert digest_tree(out) == before


def test_force_over_an_output_whose_seal_fails_deletes_nothing(copies):
    """Without a record, a manifest proves files only while its seal holds."""
    src, out, _ = copies
    (out / RECORD).unlink()
    doc = json.loads((out / MANIFEST).read_text())
    doc["files"]["rank-00001.safetensors"]["size"] += 0  # re-dumped: same fields,
    (out / MANIFEST).write_text(json.dumps(doc))  # other bytes: the seal fails
    before = digest_tree(out)
    expect_error(
        cli("convert", src, "--tp", "1", "-o", out, "--quiet", "--force"),
        2,
        "exists, and no reshard record in",
        "Move it away, or choose another -o",
    )
    assert digest_tree(out) == before


# --- 4: nothing is deleted before the locks that protect it are held -------------------------


def test_a_refused_ranks_run_leaves_the_running_ones_partial_alone(copies, tmp_path):
    src, _, _ = copies
    o = tmp_path / "ranks"
    assert cli("convert", src, "--tp", "2", "--ranks", "1", "-o", o, "--quiet").exit_code == 0
    partial = o / f"{RANK0}.partial"
    partial.write_bytes(b"rank 0, half written by the running convert")
    fd = os.open(o / ".reshard.rank-00000.lock", os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what the running `--ranks 0` holds while it writes
    try:
        before = digest_tree(o)
        expect_error(
            cli("convert", src, "--tp", "2", "--ranks", "0", "-o", o, "--quiet"),
            2,
            f"{o}: another reshard convert is writing rank 0 into this folder",
            "Give this run other ranks with --ranks, or wait for that one",
        )
        assert digest_tree(o) == before
    finally:
        os.close(fd)
    result = cli("convert", src, "--tp", "2", "--ranks", "0", "-o", o, "--quiet")
    assert result.exit_code == 0, result.output  # released: it completes the set
    assert (o / MANIFEST).is_file() and not partial.exists()


# --- 9: a planted lock symlink ---------------------------------------------------------------


@pytest.mark.parametrize("target", ["dangling", "existing"])
def test_a_lock_symlink_is_refused_and_nothing_is_created_outside(copies, tmp_path, target):
    src, _, _ = copies
    o = tmp_path / "o"
    o.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    if target == "existing":
        victim.write_text("keep")
    os.symlink(victim, o / ".reshard.lock")
    before = digest_tree(tmp_path / "outside"), digest_tree(o)
    expect_error(
        cli("convert", src, "--tp", "2", "-o", o, "--quiet"),
        2,
        f"{o / '.reshard.lock'}: is a symbolic link",
        "Remove the link, or choose another -o",
    )
    assert (digest_tree(tmp_path / "outside"), digest_tree(o)) == before
    assert victim.exists() == (target == "existing")


def test_a_refused_pickle_convert_leaves_the_running_ones_scratch_alone(copies, tmp_path):
    """The pickle scratch beside OUT is per process: a run refused as busy deletes its own,
    never the one the running convert reads from."""
    import torch
    from safetensors.torch import load_file

    src, _, _ = copies
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(src / "config.json", pickled / "config.json")
    torch.save(load_file(src / "model.safetensors"), pickled / "pytorch_model.bin")
    o = tmp_path / "o"
    o.mkdir()
    running = tmp_path / f".o.reshard-pickle-{os.getppid()}"  # another live process's
    running.mkdir()
    (running / "pytorch_model.safetensors").write_bytes(b"being read")
    fd = os.open(o / ".reshard.lock", os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        expect_error(
            cli("convert", pickled, "--tp", "2", "-o", o, "--quiet", "--allow-pickle"),
            2,
            f"{o}: another reshard convert is writing into this folder",
        )
    finally:
        os.close(fd)
    assert (running / "pytorch_model.safetensors").read_bytes() == b"being read"
    assert sorted(p.name for p in tmp_path.glob(".o.reshard-pickle*")) == [running.name]
