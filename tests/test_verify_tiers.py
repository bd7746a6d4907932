"""The weights tier stands on its own: a shard whose manifest hash was re-computed after the
corruption (a buggy writer, a tampered manifest) still fails against the source, bitwise."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import xxhash
from checkpoints import write_checkpoint
from click.testing import CliRunner
from safetensors import safe_open

from reshard.cli import main
from reshard.convert import convert_model
from reshard.headers import read_header
from reshard.io.manifest import write_manifest
from reshard.io.manifest_value import Manifest
from reshard.io.seal import SEAL_KEY
from reshard.layout.recipe import build_recipe
from reshard.verify.levels import verify_hashes, verify_weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("vw")
    src = write_checkpoint(base / "src")
    out = base / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    return src, out


def corrupt_consistently(out, rank_file: str, tensor: str, *, at_end: bool = False) -> None:
    """Flip a byte of `tensor` in `rank_file`, re-hash it in the manifest and re-seal that."""
    path = out / rank_file
    info = read_header(path).tensors[tensor]
    data = bytearray(path.read_bytes())
    pos = info.end - 1 if at_end else info.begin + 5
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))
    manifest = json.loads((out / "manifest.json").read_text())
    rank = manifest["files"][rank_file]["rank"]
    entry = manifest["ranks"][rank]["tensors"][tensor]
    entry["xxh3_128"] = xxhash.xxh3_128(bytes(data[info.begin : info.end])).hexdigest()
    del manifest[SEAL_KEY]
    write_manifest(out, manifest)  # re-sealed: only the weights tier can tell


def run_verify(out, src, *levels):
    args = ["verify", str(out), "--source", str(src)]
    for level in levels:
        args += ["--level", level]
    return CliRunner().invoke(main, args)


def test_clean_output_passes_weights(converted):
    src, out = converted
    result = run_verify(out, src, "hashes", "weights")
    assert result.exit_code == 0, result.output
    assert "weights   PASS" in result.output


def test_consistent_corruption_passes_hashes_but_fails_weights(converted, tmp_path):
    src, out = converted
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    corrupt_consistently(bad, "rank-00001.safetensors", "model.layers.1.mlp.down_proj.weight")
    result = run_verify(bad, src, "hashes", "weights")
    assert result.exit_code == 1, result.output
    assert "hashes    PASS" in result.output
    assert "weights   FAIL" in result.output
    assert "rank-00001.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' (rank 1)" in (
        result.output
    )
    assert "differs from source 'model.layers.1.mlp.down_proj.weight'" in result.output


def test_nonzero_vocab_padding_fails_weights(converted, tmp_path):
    src, out = converted
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    # vocab 101 at tp 2: rank 1's embedding ends with one zero padding row
    with safe_open(str(bad / "rank-00001.safetensors"), "pt") as f:
        assert not f.get_tensor("model.embed_tokens.weight")[-1].any()
    corrupt_consistently(bad, "rank-00001.safetensors", "model.embed_tokens.weight", at_end=True)
    result = run_verify(bad, src, "weights")
    assert result.exit_code == 1, result.output
    assert "tensor 'model.embed_tokens.weight' has non-zero vocab padding rows" in result.output


def test_missing_source_skips_weights_and_says_how(converted, tmp_path):
    src, out = converted
    moved = tmp_path / "out"
    shutil.copytree(out, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["verify", str(moved), "--level", "weights"])
    assert result.exit_code == 1, result.output  # nothing was proven: not a pass
    assert "SKIP" in result.output and "pass --source" in result.output


def test_any_flipped_byte_fails_hashes(converted, tmp_path):
    """Every byte of a shard is covered: header (names, shapes, offsets, metadata) by the
    header hash, data by the tensor hashes. Flip bytes spread over a whole file, one at a
    time, including the header's metadata."""
    _, out = converted
    name = "rank-00000.safetensors"
    original = (out / name).read_bytes()
    header_end = read_header(out / name).data_start
    meta_at = original.index(b'"rank":"0"') + len(b'"rank":"')  # "0" -> "1": valid JSON still
    positions = sorted({0, 3, 9, meta_at, header_end - 1, header_end, len(original) - 1}
                       | set(range(11, len(original), len(original) // 23)))  # fmt: skip
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 0x01
        (bad / name).write_bytes(bytes(data))
        result = CliRunner().invoke(main, ["verify", str(bad), "--level", "hashes"])
        assert result.exit_code == 1, (pos, result.output)
        assert f"{bad / name}" in result.output
    (bad / name).write_bytes(original)
    assert CliRunner().invoke(main, ["verify", str(bad), "--level", "hashes"]).exit_code == 0


@pytest.mark.parametrize("local_rank,status", [("0", "PASS"), ("3", "ELSEWHERE")])
def test_file_tiers_run_once_per_node_under_torchrun(converted, monkeypatch, local_rank, status):
    src, out = converted
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    result = run_verify(out, src, "hashes", "weights")
    assert result.exit_code == 0, result.output
    assert f"hashes    {status}" in result.output and f"weights   {status}" in result.output
    if status == "ELSEWHERE":
        assert "checked by local rank 0 of this node" in result.output


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_file_tiers_show_byte_progress_on_a_terminal(converted, monkeypatch, quiet):
    """hashes and weights count bytes (decimal units); --quiet shows nothing."""
    src, out = converted
    manifest = Manifest.from_doc(json.loads((out / "manifest.json").read_text()))
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    results = [
        verify_hashes(out, manifest, progress=not quiet),
        verify_weights(out, manifest, src, progress=not quiet),
    ]
    assert all(r.passed for r in results)
    text = terminal.getvalue()
    if quiet:
        assert text == ""
        return
    file_bytes = sum(m["size"] for m in manifest.files.values())
    final = {line.split(":")[0]: line for line in text.replace("\r", "\n").splitlines() if line}
    assert f"{file_bytes / 1e3:.0f}k/{file_bytes / 1e3:.0f}k" in final["hashes"], final
    assert "100%" in final["hashes"] and "100%" in final["weights"] and "B/s" in final["weights"]
