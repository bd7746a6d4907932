"""Re-layout and export pull each output tensor, window by window, from the rank files
(reshard/io/pull.py). Windows far smaller than a tensor make every path run: rows split over
rank files (one preadv scattering into the window), whole windows copied file to file, vocab
padding, casts. The result must be byte-identical to converting the original directly, and
the export must equal the original through safetensors' own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reshard.convert import convert_model
from reshard.export import export_output
from reshard.io import writer
from reshard.layout.recipe import build_recipe

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("pull") / "tp2"
    convert_model(str(TINY), out, build_recipe(tp=2))  # vocab 509: one padding row on rank 1
    return out


@pytest.mark.parametrize("window", [1000, 4096, 1 << 20])
@pytest.mark.parametrize(
    "layout", [{"tp": 1, "pp": 2}, {"tp": 4}, {"tp": 2, "dtype": "bfloat16"}], ids=str
)
def test_relayout_in_small_windows_is_byte_identical(tp2, tmp_path, monkeypatch, window, layout):
    direct = tmp_path / "direct"
    convert_model(str(TINY), direct, build_recipe(**layout))
    monkeypatch.setattr(writer, "buffer_bytes", lambda workers: window)
    via = tmp_path / "via"
    convert_model(str(tp2), via, build_recipe(**layout))
    files = sorted(p.name for p in direct.glob("rank-*.safetensors"))
    assert files == sorted(p.name for p in via.glob("rank-*.safetensors"))
    for name in files:
        assert (via / name).read_bytes() == (direct / name).read_bytes(), name


@pytest.mark.parametrize("window", [1000, 1 << 20])
def test_export_in_small_windows_gives_the_original_back(tp2, tmp_path, monkeypatch, window):
    monkeypatch.setattr(writer, "buffer_bytes", lambda workers: window)
    result = export_output(tp2, tmp_path / "hf", max_shard_size=200_000, workers=2)
    assert len(result.files) > 1
    got, want = load_all(tmp_path / "hf"), load_all(TINY)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert got[name].view(torch.uint8).equal(tensor.view(torch.uint8)), name


@pytest.mark.parametrize("stride", [0, 8], ids=["any", "evenly spaced"])
def test_scatter_views_interleave_row_parts_and_refuse_gaps(stride):
    from reshard.io.byte_runs import Group
    from reshard.io.scatter import scatter_views

    # 3 rows of 8 bytes split in two 4-byte parts: part 1 to "b", part 0 to "a" (any order)
    a = Group(0, 12, ((0, 4), (8, 4), (16, 4)), stride)
    b = Group(0, 12, ((4, 4), (12, 4), (20, 4)), stride)
    gather = memoryview(bytearray(24))
    first, iov, placed = scatter_views([("b", b), ("a", a)], gather)
    assert first == 0 and [len(v) for v in iov] == [4] * 6
    for i, view in enumerate(iov):  # source order: a0 b0 a1 b1 a2 b2
        view[:] = bytes([i]) * 4
    assert [(t, bytes(v)) for t, _, v in placed] == [
        ("a", b"\0" * 4 + b"\2" * 4 + b"\4" * 4),
        ("b", b"\1" * 4 + b"\3" * 4 + b"\5" * 4),
    ]
    gap = Group(0, 12, ((5, 4), (13, 4), (21, 4)), stride)
    assert scatter_views([("a", a), ("b", gap)], gather) is None
    assert scatter_views([("a", a), ("b", a)], gather) is None  # a replica: not a tiling
    assert scatter_views([("a", a), ("b", b)], memoryview(bytearray(23))) is None
