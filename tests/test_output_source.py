"""A reshard output as a source: export back to HF and re-layout, checked against what we did
not write (the transformers checkpoint read by safetensors' own reader, transformers' own
loading and generation, and the bytes of a direct conversion)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checkpoints import write_checkpoint
from click.testing import CliRunner
from safetensors.torch import load_file

from reshard.cli import main
from reshard.convert import convert_model
from reshard.export import export_output, split_shards
from reshard.headers import TensorInfo, read_header
from reshard.io.manifest import write_manifest
from reshard.io.output_source import open_output_source
from reshard.layout.recipe import build_recipe

# family -> (architecture, checkpoint options, layout of the tp 4 x pp 2 output)
FAMILIES = {
    "llama-tied-pp": ("LlamaForCausalLM", {"tie_word_embeddings": True}, {}),
    "llama-sharded": ("LlamaForCausalLM", {"shard_size": "30KB"}, {}),
    "mistral": ("MistralForCausalLM", {}, {}),
    "qwen2-bias-bf16": ("Qwen2ForCausalLM", {"dtype": torch.bfloat16}, {}),
    "qwen3-qknorm-tied": ("Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}, {}),
    "mixtral-ep2-redundant": ("MixtralForCausalLM", {}, {"ep": 2, "redundant": 2}),
    "qwen2moe-ep4-redundant": ("Qwen2MoeForCausalLM", {}, {"ep": 4, "redundant": 4}),
    "qwen3moe-ep2": ("Qwen3MoeForCausalLM", {}, {"ep": 2}),
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert (b[name].dtype, b[name].shape) == (t.dtype, t.shape), name
        assert torch.equal(b[name].view(torch.uint8), t.view(torch.uint8)), name


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def relaid(request, tmp_path_factory):
    """(source checkpoint, its tp 4 x pp 2 output, family options)."""
    arch, options, layout = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    src = write_checkpoint(root / "src", arch, **options)
    out = root / "tp4pp2"
    convert_model(str(src), out, build_recipe(tp=4, pp=2, **layout))
    return src, out, layout


def test_export_round_trip_is_bitwise(relaid, tmp_path):
    src, out, _ = relaid
    hf = tmp_path / "hf"
    result = run("export", out, "-o", hf, "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    assert_same_tensors(load_folder(src), load_folder(hf))
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(load_folder(src))
    files = sorted(p.name for p in hf.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors" and len(files) > 1
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_folder(src).values()
    )
    assert (hf / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert not list(hf.glob("*.partial"))


def test_relayout_is_byte_identical_to_direct_conversion(relaid, tmp_path):
    src, out, layout = relaid
    target = {"ep": 2} if layout.get("ep") else {}
    via, direct = tmp_path / "via", tmp_path / "direct"
    result = run("convert", out, "--tp", 2, *(["--ep", 2] if target else []), "-o", via)
    assert result.exit_code == 0, result.output
    convert_model(str(src), direct, build_recipe(tp=2, **target))
    names = sorted(p.name for p in direct.iterdir())
    assert names == sorted(p.name for p in via.iterdir())
    for name in names:
        if name not in ("manifest.json", "reshard-record.json"):  # they name what was read
            assert (via / name).read_bytes() == (direct / name).read_bytes(), name
    m_via = json.loads((via / "manifest.json").read_text())
    m_direct = json.loads((direct / "manifest.json").read_text())
    assert [k for k in m_direct if m_via[k] != m_direct[k]] == ["source", "manifest_xxh3_128"]
    made_from = m_via["source"].pop("made_from")
    assert m_via["source"] == m_direct["source"]  # the original's provenance, carried over
    assert made_from["path"] == str(out.resolve())
    assert made_from["layout"] == {"tp": 4, "pp": 2, "ep": layout.get("ep", 1), "dp": 1}


def test_row_blocks_of_any_size_rebuild_the_source(tmp_path):
    """Chunks far smaller than a piece, and ones that straddle vocab and head boundaries."""
    src = write_checkpoint(tmp_path / "src", "Qwen2MoeForCausalLM")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=4, pp=2, ep=2, redundant=2))
    source = open_output_source(out)
    original = load_folder(src)
    for chunk in (7, 300, 5000):  # bytes a block
        for name, (_, info) in source.tensors.items():
            if not info.shape:
                rebuilt = source.reader.read_box(source, name, (), ())
            else:
                step = max(1, chunk * info.shape[0] // max(info.nbytes, 1))
                rest = info.shape[1:]
                boxes = [
                    ((a, *(0 for _ in rest)), (min(a + step, info.shape[0]), *rest))
                    for a in range(0, info.shape[0], step)
                ]
                rebuilt = torch.cat([source.reader.read_box(source, name, *b) for b in boxes])
            assert torch.equal(rebuilt, original[name]), (name, chunk)


def test_a_box_read_from_an_altered_rank_tensor_is_refused(tmp_path):
    """read_box hashes a rank tensor whole before using its bytes: one flipped byte in it,
    even outside the box asked for, names the file, the tensor and the fix."""
    from safetensors import safe_open

    from reshard.errors import OutputError

    src = write_checkpoint(tmp_path / "src", "Qwen2MoeForCausalLM")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    path = out / "rank-00001.safetensors"
    name = "model.layers.0.self_attn.o_proj.weight"
    with safe_open(path, "pt") as f:
        assert name in f.keys()  # noqa: SIM118
    info = read_header(path).tensors[name]
    data = bytearray(path.read_bytes())
    data[info.end - 1] ^= 0xFF  # the last byte of the rank tensor
    path.write_bytes(bytes(data))
    source = open_output_source(out)
    hidden = source.info(name).shape[1]
    with pytest.raises(OutputError) as e:
        source.reader.read_box(source, name, (0, hidden // 2), (1, hidden // 2 + 1))
    assert f"{path}: tensor '{name}' hash" in str(e.value)
    assert "the output is corrupt. Re-copy it, or convert from the original model." in str(e.value)


def test_transformers_loads_the_export_and_generates_the_same(tmp_path):
    import transformers

    src = write_checkpoint(tmp_path / "src", tie_word_embeddings=True, vocab_size=101)
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=4, pp=2))
    export_output(out, tmp_path / "hf", max_shard_size=40_000)
    prompt = torch.tensor([[5, 17, 93, 2, 40, 11, 64]])
    ids, logits = [], []
    for folder in (src, tmp_path / "hf"):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            gen = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
            logits.append(model(prompt).logits)
        ids.append(gen)
    assert "lm_head.weight" not in load_folder(tmp_path / "hf")  # tied, as in the original
    assert torch.equal(ids[0], ids[1]) and ids[0].shape[1] == 19
    assert torch.equal(logits[0], logits[1])  # same bytes, same kernels: identical


def test_export_of_a_cast_output_keeps_the_cast_and_says_so(tmp_path):
    src = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2, dtype="bfloat16", max_file_size=40_000))
    result = run("export", out, "-o", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert "tensors keep the dtype convert cast them to" in result.output
    cast = {k: v.to(torch.bfloat16) for k, v in load_folder(src).items()}
    assert_same_tensors(cast, load_folder(tmp_path / "hf"))


def test_verify_relayout_against_its_output_then_the_original(tmp_path):
    src = write_checkpoint(tmp_path / "src", tie_word_embeddings=True)
    a, b = tmp_path / "a", tmp_path / "b"
    convert_model(str(src), a, build_recipe(tp=4, pp=2))
    convert_model(str(a), b, build_recipe(tp=2))
    weights = ["--level", "hashes", "--level", "weights"]
    result = run("verify", b, *weights)
    assert result.exit_code == 0, result.output
    assert f"vs {a.resolve()}" in result.output
    result = run("verify", b, *weights, "--source", src)
    assert result.exit_code == 0 and f"vs {src.resolve()}" in result.output, result.output
    a.rename(tmp_path / "moved")  # without the output it was made from: the original
    result = run("verify", b, *weights)
    assert result.exit_code == 0 and f"vs {src.resolve()}" in result.output, result.output
    (tmp_path / "moved").rename(a)
    # the weights tier compares bytes: a flipped byte in b fails it against a
    rank = b / "rank-00001.safetensors"
    data = bytearray(rank.read_bytes())
    data[-3] ^= 0x40
    rank.write_bytes(bytes(data))
    result = run("verify", b, "--level", "weights")
    assert result.exit_code == 1 and "differs from source" in result.output, result.output


def test_inspect_and_plan_read_an_output_as_its_original(tmp_path):
    src = write_checkpoint(tmp_path / "src", "Qwen3MoeForCausalLM")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=4, pp=2, ep=2))
    docs = [json.loads(run("inspect", m, "--json").output) for m in (src, out)]
    for doc in docs:
        del doc["model"], doc["path"]
    assert docs[0] == docs[1] and docs[0]["experts"] == 4
    plans = [run("plan", m, "--tp", 2, "--ep", 2, "--json") for m in (src, out)]
    assert plans[0].exit_code == plans[1].exit_code == 0, plans[1].output
    a, b = (json.loads(p.output) for p in plans)
    assert "reshard output" in b.pop("shapes_from") and "headers" in a.pop("shapes_from")
    del a["model"], b["model"]
    assert a == b and len(a["ranks"]) == 2


def test_export_refuses_an_occupied_folder_and_an_old_manifest(tmp_path):
    src = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    assert run("export", out, "-o", tmp_path / "hf").exit_code == 0
    result = run("export", out, "-o", tmp_path / "hf")
    assert result.exit_code == 2
    assert "model.safetensors.index.json). Pass --force" in result.output
    assert run("export", out, "-o", tmp_path / "hf", "--force").exit_code == 0
    result = run("export", out, "-o", out)
    assert result.exit_code == 2 and "write the checkpoint elsewhere" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    for f in manifest["source"]["files"]:
        del f["tensors"]
    del manifest["manifest_xxh3_128"]
    write_manifest(out, manifest)  # sealed, as an older reshard wrote it
    result = run("export", out, "-o", tmp_path / "hf2")
    assert result.exit_code == 2
    assert "no per-file tensor list in 'source'" in result.output


@pytest.fixture
def output(tmp_path):
    src = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2, pp=2))
    return out


def test_incomplete_output_is_refused_naming_what_is_wrong(output, tmp_path):
    (output / "rank-00002.safetensors").unlink()
    for cmd in (
        ["convert", output, "--tp", 2, "-o", tmp_path / "x"],
        ["export", output, "-o", tmp_path / "y"],
    ):
        result = run(*cmd)
        assert result.exit_code == 2, result.output
        assert "rank-00002.safetensors: missing (rank 2)" in result.output
    (output / "manifest.json").unlink()
    result = run("inspect", output)
    assert result.exit_code == 2
    assert "manifest.json: missing, so" in result.output
    assert "is not a complete reshard output" in result.output


def test_altered_header_is_refused(output, tmp_path):
    rank = output / "rank-00000.safetensors"
    data = bytearray(rank.read_bytes())
    data[data.index(b'"rank":"0"') + 8] = ord("7")
    rank.write_bytes(bytes(data))
    result = run("convert", output, "--tp", 2, "-o", tmp_path / "x")
    assert result.exit_code == 2
    assert "rank-00000.safetensors: header hash" in result.output, result.output


def test_corrupt_data_is_refused_and_nothing_is_committed(output, tmp_path):
    rank = output / "rank-00002.safetensors"  # stage 1, tp rank 0: the first copy of the norm
    data = bytearray(rank.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor (the final norm)
    rank.write_bytes(bytes(data))
    for cmd, made in (("convert", tmp_path / "x"), ("export", tmp_path / "y")):
        extra = ["--tp", 2] if cmd == "convert" else []
        result = run(cmd, output, *extra, "-o", made)
        assert result.exit_code == 2, result.output
        assert "rank-00002.safetensors: tensor 'model.norm.weight' hash" in result.output
        assert "the output is corrupt" in result.output
        assert not (made / "manifest.json").exists()
        assert not (made / "model.safetensors.index.json").exists()
        assert not list(made.glob("*.safetensors"))  # only *.partial: incomplete by definition


def test_convert_into_itself_is_refused(output):
    result = run("convert", output, "--tp", 4, "-o", output, "--force")
    assert result.exit_code == 2
    assert "converting it into itself would delete its rank files" in result.output
    assert (output / "manifest.json").exists()


def test_split_shards_like_save_pretrained():
    infos = [TensorInfo(f"t{i}", "F32", (n,), 0, 4 * n) for i, n in enumerate([3, 3, 10, 1, 1])]
    shards = split_shards(infos, 24)
    assert [[i.name for i in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_export_force_deletes_only_its_own_files_and_takes_the_lock(tmp_path):
    src = write_checkpoint(tmp_path / "src", shard_size="30KB")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    hf = tmp_path / "hf"
    assert run("export", out, "-o", hf, "--max-shard-size", "40KB").exit_code == 0
    many = sorted(p.name for p in hf.glob("model-*.safetensors"))
    assert run("export", out, "-o", hf, "--force").exit_code == 0  # one shard now
    assert sorted(p.name for p in hf.glob("model-*.safetensors")) == [
        "model-00001-of-00001.safetensors"
    ]  # the earlier export's shards were its own: gone
    assert len(many) > 1
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    result = run("export", out, "-o", src, "--force")  # a checkpoint export never wrote
    assert result.exit_code == 2
    assert f"{src / 'config.json'}: exists, and no reshard record in {src} names it" in (
        result.output
    )
    after = {p.name: p.read_bytes() for p in src.iterdir() if not p.name.startswith(".")}
    assert after == before  # nothing of it deleted or changed

    import fcntl
    import os

    fd = os.open(hf / ".reshard.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = run("export", out, "-o", hf, "--force")
    finally:
        os.close(fd)
    assert result.exit_code == 2 and "another reshard convert is writing" in result.output


def test_a_rank_file_that_shrinks_after_open_names_the_file_and_the_fix(tmp_path):
    """Sizes are checked when the output is opened; a rank file cut short later is caught
    when a box is read from it (its tensor no longer hashes as recorded), never a short
    tensor."""
    from reshard.errors import OutputError

    src = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    source = open_output_source(out)
    path = out / "rank-00001.safetensors"
    name = "lm_head.weight"
    info = read_header(path).tensors[name]
    os.truncate(path, info.begin + 8)
    shape = source.info(name).shape
    with pytest.raises(OutputError) as e:
        source.reader.read_box(source, name, (shape[0] - 1, 0), shape)
    assert f"{path}: tensor '{name}' hash" in str(e.value)
    assert "Re-copy it, or convert from the original model." in str(e.value)
