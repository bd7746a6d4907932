"""convert --ranks, torchrun worlds and --resume: whatever way the ranks get written, the
folder ends byte-identical to one full convert (every file, the manifest included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from checkpoints import move_tensor, write_checkpoint
from click.testing import CliRunner

from reshard.cli import main

LAYOUT = ["--tp", "2", "--pp", "2", "--dp", "2"]  # world 8; ranks 4-7 are replicas of 0-3
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def convert(src, out, *extra):
    return run("convert", src, *LAYOUT, "-o", out, "--quiet", *extra)


def child(*args, env=None):
    cmd = [sys.executable, "-m", "reshard", "convert", *map(str, args), *LAYOUT, "--quiet"]
    return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src") / "m", shard_size="30KB")


@pytest.fixture(scope="module")
def full(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    assert convert(src, out).exit_code == 0
    return out


def assert_same_output(a: Path, b: Path) -> None:
    """Every visible file byte for byte; the record too (both name the same plan and files)."""
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in b.iterdir() if not p.name.startswith(".")) == names
    assert "manifest.json" in names and "rank-00003.safetensors" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_separate_runs_union_to_one_full_convert(src, full, tmp_path):
    out = tmp_path / "out"
    first = convert(src, out, "--ranks", "0,6")  # 6 is a replica of rank 2
    assert first.exit_code == 0
    assert "wrote 2 files for ranks 0,2 of 8 " in first.output
    assert "manifest: not yet: ranks 1,3 are still to be written" in first.output
    assert sorted(p.name for p in out.glob("rank-*")) == [
        "rank-00000.safetensors",
        "rank-00002.safetensors",
    ]
    result = run("verify", out)
    assert result.exit_code == 2
    assert "no manifest.json yet: ranks 1, 3 are not written (2 missing)" in result.output
    assert convert(src, out, "--ranks", "1-3").exit_code == 0  # 2 again: rewritten
    assert_same_output(full, out)
    assert not list(out.glob("reshard-rank-*.json"))  # markers go once the manifest is in
    assert run("verify", out, "--level", "hashes", "--level", "weights").exit_code == 0


def test_two_concurrent_runs_write_exactly_one_correct_manifest(src, full, tmp_path):
    out = tmp_path / "out"
    runs = [child(src, "-o", out, "--ranks", spec) for spec in ("0-1", "2,3")]
    assert [p.wait(timeout=300) for p in runs] == [0, 0]
    assert_same_output(full, out)


def test_a_torchrun_world_of_2_writes_the_same_output(src, full, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", "-m", "reshard", "convert", str(src), *LAYOUT, "-o", str(out), "--quiet"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_output(full, out)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0-8", "'0-8' is outside the world: ranks are in [0, 8) (world size 8"),
        ("3-1", "'3-1' is outside the world"),
        ("", "'' is not a rank or a range like 0-3 (world size 8)"),
        ("0,a", "'a' is not a rank or a range like 0-3 (world size 8)"),
    ],
)
def test_bad_ranks_exit_2_naming_the_flag_and_world_size(src, tmp_path, spec, message):
    result = convert(src, tmp_path / "out", "--ranks", spec)
    assert result.exit_code == 2
    assert f"--ranks {spec!r}: {message}" in result.output
    assert not (tmp_path / "out").exists()


KILLER = """
import os, signal, sys
import reshard.io.writer as w
import reshard.io.rank_subset as rs
from reshard.cli import main
limit, point = int(sys.argv[1]), sys.argv[2]
seen = [0]
if point == "bytes":
    account = w.account
    def counting(target, rel, data):
        account(target, rel, data)
        seen[0] += len(memoryview(data).cast("B"))
        if seen[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
    w.account = counting
else:
    mark = rs.write_marker
    def marking(*a, **k):
        mark(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # after the first rank's marker
    rs.write_marker = marking
main(sys.argv[3:])
"""


@pytest.mark.parametrize("limit, point", [(1, "bytes"), (60_000, "bytes"), (0, "marker")])
def test_sigkill_then_resume_is_byte_identical(src, full, tmp_path, limit, point):
    out = tmp_path / "out"
    assert convert(src, out, "--ranks", "3").exit_code == 0  # a finished run resume keeps
    kept = (out / "rank-00003.safetensors").stat().st_mtime_ns
    args = ["convert", src, *LAYOUT, "-o", out, "--quiet", "--ranks", "0-2"]
    cmd = [sys.executable, "-c", textwrap.dedent(KILLER), str(limit), point, *map(str, args)]
    killed = subprocess.run(cmd, env=ENV, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert convert(src, out, "--resume").exit_code == 0
    assert_same_output(full, out)
    assert (out / "rank-00003.safetensors").stat().st_mtime_ns == kept  # not rewritten


def test_resume_refuses_a_changed_layout(src, tmp_path):
    out = tmp_path / "out"
    assert convert(src, out, "--ranks", "0").exit_code == 0
    result = run("convert", src, "--tp", "2", "-o", out, "--resume")
    assert result.exit_code == 2
    assert "reshard-record.json: layout was" in result.output
    assert '"pp":2' in result.output and '"pp":1' in result.output


def test_resume_refuses_changed_source_bytes(tmp_path):
    src = write_checkpoint(tmp_path / "src", shard_size="30KB")
    out = tmp_path / "out"
    assert convert(src, out, "--ranks", "0").exit_code == 0
    name = "model.layers.0.self_attn.k_proj.weight"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    move_tensor(src, name, "model-extra.safetensors")
    result = convert(src, out, "--resume")
    assert result.exit_code == 2
    assert f"reshard-record.json: source file {index['weight_map'][name]} " in result.output
    assert "changed (size or header hash" in result.output
    assert "use the same model and flags" in result.output
