"""The weights tier's byte comparison (reshard/verify/weights.py): windows far smaller than a
tensor, split rows gathered, casts (the one torch use), and a single flipped byte found and
named in any of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from reshard.convert import convert_model
from reshard.headers import read_header
from reshard.io.manifest import read_manifest
from reshard.layout.recipe import build_recipe
from reshard.verify import weights
from reshard.verify.levels import verify_weights

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"
ROW_SPLIT = "model.layers.2.self_attn.o_proj.weight"  # every row split between the 2 ranks


def flip_byte(path: Path, tensor: str, at: int) -> None:
    info = read_header(path).tensors[tensor]
    data = bytearray(path.read_bytes())
    data[info.begin + at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
@pytest.mark.parametrize("window", [1000, 1 << 24])
def test_flipped_byte_is_found_in_any_window(tmp_path, monkeypatch, dtype, window):
    monkeypatch.setattr(weights, "WINDOW", window)
    out = tmp_path / "out"
    convert_model(str(TINY), out, build_recipe(tp=2, dtype=dtype))
    result = verify_weights(out, read_manifest(out), TINY)
    assert result.passed, result.failures

    rank1 = out / "rank-00001.safetensors"
    info = read_header(rank1).tensors[ROW_SPLIT]
    flip_byte(rank1, ROW_SPLIT, info.nbytes - 3)  # the last row's last element
    result = verify_weights(out, read_manifest(out), TINY)
    assert not result.passed
    assert result.failures == [
        f"{rank1}: tensor '{ROW_SPLIT}' (rank 1) differs from source '{ROW_SPLIT}' block "
        "[0, 64]:[128, 128]"
    ]
