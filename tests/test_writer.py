"""The writer's byte arithmetic against torch indexing, and the threaded writer: the same bytes
whatever --workers and window size, torch imported only for casts, and an error or Ctrl-C in
a worker thread still ends with the documented exit code and no manifest."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from checkpoints import write_checkpoint
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import reshard.io.writeback
import reshard.io.writer
from reshard.cli import main
from reshard.io.byte_runs import piece_groups, tensor_windows

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- byte arithmetic -------------------------------------------------------------------------


@st.composite
def copies(draw):
    """A source shape, a block of it, an output shape holding the block at `dest`, a window
    size in bytes and an element size."""
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    start = tuple(draw(st.integers(0, n - 1)) for n in shape)
    stop = tuple(draw(st.integers(a + 1, n)) for a, n in zip(start, shape, strict=True))
    pad = tuple(draw(st.integers(0, 2)) for _ in shape)
    dest = tuple(draw(st.integers(0, p)) for p in pad)
    out_shape = tuple(b - a + p for a, b, p in zip(start, stop, pad, strict=True))
    itemsize = draw(st.sampled_from([1, 2, 4]))
    max_bytes = draw(st.integers(itemsize, 2 * itemsize * math.prod(shape)))
    return shape, start, stop, dest, out_shape, itemsize, max_bytes


def apply_groups(src: bytes, shape, start, stop, dest, out_shape, itemsize, max_bytes):
    """Run the writer's plan of windows and groups on plain bytes; count writes per byte."""
    out = bytearray(math.prod(out_shape) * itemsize)
    writes = [0] * len(out)
    for w in tensor_windows(shape, itemsize, max_bytes):
        assert w.size * itemsize <= max(max_bytes, itemsize)
        window = src[w.start * itemsize : (w.start + w.size) * itemsize]
        for g in piece_groups(start, stop, dest, shape, out_shape, w, itemsize):
            data = b"".join(window[b : b + n] for b, n in g.segments)
            assert len(data) == g.nbytes
            out[g.dest : g.dest + g.nbytes] = data
            for i in range(g.dest, g.dest + g.nbytes):
                writes[i] += 1
    return bytes(out), writes


@settings(max_examples=300, deadline=None)
@given(copies())
def test_groups_copy_what_torch_indexing_copies(case):
    shape, start, stop, dest, out_shape, itemsize, max_bytes = case
    dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[itemsize]
    source = (torch.arange(math.prod(shape)) % 251).to(dtype).reshape(shape)
    expected = torch.zeros(out_shape, dtype=dtype)
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    at = tuple(slice(d, d + b - a) for d, a, b in zip(dest, start, stop, strict=True))
    expected[at] = source[box]
    src = bytes(source.reshape(-1).view(torch.uint8).tolist())
    got, writes = apply_groups(src, shape, start, stop, dest, out_shape, itemsize, max_bytes)
    assert got == bytes(expected.reshape(-1).view(torch.uint8).tolist())
    mask = torch.zeros(out_shape, dtype=torch.bool)
    mask[at] = True
    per_byte = mask.reshape(-1).repeat_interleave(itemsize).tolist()
    assert writes == [int(m) for m in per_byte]  # the block once, nothing else


def test_windows_cut_whole_rows_when_a_row_fits():
    # [4, 3] int32: 12-byte rows; 30 bytes hold 2 rows
    assert [(w.prefix, w.lo, w.hi, w.start, w.size) for w in tensor_windows((4, 3), 4, 30)] == [
        ((), 0, 2, 0, 6),
        ((), 2, 4, 6, 6),
    ]
    # a row (12 bytes) over 8: cut inside each row, 2 elements at a time
    assert [(w.prefix, w.lo, w.hi, w.start) for w in tensor_windows((2, 3), 4, 8)] == [
        ((0,), 0, 2, 0),
        ((0,), 2, 3, 2),
        ((1,), 0, 2, 3),
        ((1,), 2, 3, 5),
    ]
    assert tensor_windows((0, 5), 2, 100) == ()


def test_a_column_split_is_one_gather_per_window():
    # o_proj-like [4, 8] int16 split in 2 along dim 1: rank 1 takes columns 4..7 of each row
    (window,) = tensor_windows((4, 8), 2, 1 << 20)
    (group,) = piece_groups((0, 4), (4, 8), (0, 0), (4, 8), (4, 4), window, 2)
    assert (group.dest, group.nbytes) == (0, 32)
    assert group.segments == ((8, 8), (24, 8), (40, 8), (56, 8))
    # a row split is a single slice of the window: written with no gather
    (group,) = piece_groups((2, 0), (4, 8), (0, 0), (4, 8), (2, 8), window, 2)
    assert group.segments == ((32, 32),)


# --- the threaded writer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Shared experts, redundant expert replicas (out-of-order hashing), several files."""
    path = tmp_path_factory.mktemp("moe") / "src"
    return write_checkpoint(path, "Qwen2MoeForCausalLM", shard_size="40KB", num_experts=8)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize(
    "flags",
    [
        ["--tp", "4", "--ep", "2", "--redundant", "4"],
        ["--tp", "2", "--pp", "2", "--dtype", "bfloat16", "--max-file-size", "30KB"],
    ],
)
def test_workers_and_windows_do_not_change_a_byte(moe, tmp_path, monkeypatch, flags):
    one, three = tmp_path / "one", tmp_path / "three"
    assert run("convert", moe, *flags, "-o", one, "--quiet", "--workers", 1).exit_code == 0
    monkeypatch.setattr(reshard.io.writer, "buffer_bytes", lambda workers: 96)  # cut rows
    result = run("convert", moe, *flags, "-o", three, "--quiet", "--workers", 3)
    assert result.exit_code == 0, result.output
    a, b = files_of(one), files_of(three)
    assert list(a) == list(b) and "manifest.json" in a
    for name in a:
        assert a[name] == b[name], name
    # and what was written is what safetensors reads: hashes and values of one rank
    assert run("verify", three, "--level", "hashes", "--level", "weights").exit_code == 0
    manifest = json.loads((three / "manifest.json").read_text())
    rank = manifest["ranks"][1]
    tensors = {}
    for name in rank["files"]:
        tensors.update(load_file(three / name))
    assert set(tensors) == set(rank["tensors"])


def test_writeback_starts_every_step_on_every_file_and_changes_no_byte(moe, tmp_path, monkeypatch):
    """The disk starts writing each output file while it fills (io/writeback.py): a kick
    per STEP bytes written to a file, on that file, asking only to start (flag 2)."""
    plain = tmp_path / "plain"
    monkeypatch.setattr(reshard.io.writeback, "_CALL", None)  # no hint at all
    assert run("convert", moe, "--tp", "2", "-o", plain, "--quiet").exit_code == 0
    calls: list[tuple] = []
    lock = threading.Lock()

    def record(fd, offset, nbytes, flags):
        with lock:
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes, flags))
        return 0

    monkeypatch.setattr(reshard.io.writeback, "_CALL", record)
    monkeypatch.setattr(reshard.io.writeback, "STEP", 4096)
    kicked = tmp_path / "kicked"
    assert run("convert", moe, "--tp", "2", "-o", kicked, "--quiet", "--workers", 2).exit_code == 0
    assert files_of(plain) == files_of(kicked)
    per_file: dict[str, int] = {}
    for path, offset, nbytes, flags in calls:
        assert (offset, nbytes, flags) == (0, 0, 2)
        per_file[Path(path).name] = per_file.get(Path(path).name, 0) + 1
    for rank_file in kicked.glob("*.safetensors"):
        data_bytes = (
            rank_file.stat().st_size - 8 - int.from_bytes(rank_file.read_bytes()[:8], "little")
        )
        # every STEP bytes: at least one kick per full step, at most one per step + one write
        assert (
            data_bytes // 4096 // 2 <= per_file[rank_file.name + ".partial"] <= data_bytes // 4096
        ), rank_file.name


def test_writeback_counts_per_file():
    kicks = []
    wb = reshard.io.writeback.Writeback(step=100)
    old = reshard.io.writeback._CALL
    reshard.io.writeback._CALL = lambda fd, *a: kicks.append(fd)
    try:
        for fd, n in [(3, 60), (4, 99), (3, 60), (3, 60), (4, 1), (3, 39)]:
            wb.wrote(fd, n)
    finally:
        reshard.io.writeback._CALL = old
    assert kicks == [3, 4]  # fd 3: 120 -> kick, then 60, 99; fd 4: 99, then 100 -> kick


def test_convert_imports_torch_only_to_cast(tmp_path):
    code = (
        "import sys\nfrom reshard.cli import main\n"
        "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n    print('TORCH', 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for extra, imported in (([], False), (["--dtype", "float16"], True)):
        out = tmp_path / f"out{len(extra)}"
        cmd = [sys.executable, "-c", code, "convert", ROOT / "examples/tiny-llama", "--tp", "2"]
        cmd = [str(c) for c in [*cmd, "-o", out, "--quiet", *extra]]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"TORCH {imported}" in done.stdout


def test_kernel_copy_disk_full_in_a_worker_exits_3_without_manifest(moe, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_copy = os.copy_file_range
    calls = []

    def full_disk(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) > 5:  # some tensors go in, then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(reshard.io.writer.os, "copy_file_range", full_disk)
    threads = threading.active_count()
    result = run("convert", moe, "--tp", "2", "-o", out, "--quiet", "--workers", 3)
    assert threading.active_count() == threads  # every worker stopped before the exit
    assert result.exit_code == 3, result.output
    assert "error: " + str(out / "rank-0000") in result.output
    assert ".safetensors.partial: No space left on device (free space on that disk" in result.output
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".safetensors")]


def test_ctrl_c_in_a_worker_exits_130_and_the_next_run_succeeds(moe, tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = []

    def interrupt(target, rel, data):
        seen.append(rel)
        if len(seen) == 7:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(reshard.io.writer, "account", interrupt)
        result = run("convert", moe, "--tp", "2", "-o", out, "--workers", 3)
    assert result.exit_code == 130, result.output
    assert "interrupted: nothing was committed" in result.output
    assert not (out / "manifest.json").exists()
    assert run("convert", moe, "--tp", "2", "-o", out, "--quiet").exit_code == 0
    assert (out / "manifest.json").exists()


def test_workers_must_be_positive(moe, tmp_path):
    result = run("convert", moe, "--tp", "2", "-o", tmp_path / "out", "--workers", 0)
    assert result.exit_code == 2
    assert "Invalid value for '--workers': 0 is not in the range x>=1." in result.output
