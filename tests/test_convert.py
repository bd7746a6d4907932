"""Convert real transformers checkpoints and rebuild every source tensor from the rank files.

The rebuild reads shards and sources with safetensors' own reader and compares bitwise; the
hand-written checks below pin the split rules (heads, kv replication, vocab padding, tied
embeddings) to numbers, independent of the manifest's own description of itself.
"""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import move_tensor, write_checkpoint
from helpers import assert_bitwise_rebuild, load_rank, load_source

from reshard.convert import convert_model
from reshard.layout.recipe import build_recipe

FIXTURES = {
    # several shard files, q/k/v of layer 1 in different files, vocab 101 (prime)
    "llama-sharded": ("LlamaForCausalLM", {"shard_size": "30KB"}),
    "llama-tied-kv1": ("LlamaForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen2-bias": ("Qwen2ForCausalLM", {}),
    "qwen3-qknorm": ("Qwen3ForCausalLM", {"head_dim": 16}),
    "llama-bf16": ("LlamaForCausalLM", {"dtype": torch.bfloat16}),
}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def checkpoint(request, tmp_path_factory):
    arch, kwargs = FIXTURES[request.param]
    path = write_checkpoint(tmp_path_factory.mktemp(request.param), arch, **kwargs)
    if request.param == "llama-sharded":
        move_tensor(path, "model.layers.1.self_attn.k_proj.weight", "extra-k.safetensors")
        move_tensor(path, "model.layers.1.self_attn.v_proj.weight", "extra-v.safetensors")
    return path


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bitwise_rebuild(checkpoint, tp, tmp_path):
    out = tmp_path / "out"
    convert_model(str(checkpoint), out, build_recipe(tp=tp))
    assert_bitwise_rebuild(checkpoint, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"]["world_size"] == tp
    assert sorted(manifest["files"]) == [f"rank-{r:05d}.safetensors" for r in range(tp)]


def test_split_rules_by_hand(tmp_path):
    """tp 4 on 4 heads / 2 kv heads / vocab 101: the rules of DESIGN.md, element by element."""
    src_dir = write_checkpoint(tmp_path / "src", tie_word_embeddings=True)
    out = tmp_path / "out"
    convert_model(str(src_dir), out, build_recipe(tp=4))
    src = load_source(src_dir)
    hd = 16
    for r in range(4):
        rank = load_rank(out, r)
        q = src["model.layers.0.self_attn.q_proj.weight"]
        assert torch.equal(rank["model.layers.0.self_attn.q_proj.weight"], q[r * hd : (r + 1) * hd])
        kv_head = r * 2 // 4  # ranks 0,1 -> kv head 0; ranks 2,3 -> kv head 1
        k = src["model.layers.0.self_attn.k_proj.weight"]
        got = rank["model.layers.0.self_attn.k_proj.weight"]
        assert torch.equal(got, k[kv_head * hd : (kv_head + 1) * hd])
        o = src["model.layers.0.self_attn.o_proj.weight"]
        assert torch.equal(
            rank["model.layers.0.self_attn.o_proj.weight"], o[:, r * hd : (r + 1) * hd]
        )
        down = src["model.layers.2.mlp.down_proj.weight"]
        assert torch.equal(
            rank["model.layers.2.mlp.down_proj.weight"], down[:, r * 24 : (r + 1) * 24]
        )
        emb = rank["model.embed_tokens.weight"]  # 101 -> padded 104, 26 rows per rank
        assert emb.shape == (26, 64)
        real = src["model.embed_tokens.weight"][r * 26 : (r + 1) * 26]
        assert torch.equal(emb[: real.shape[0]], real)
        assert not emb[real.shape[0] :].any()  # rank 3 has 23 real rows + 3 zero rows
        assert "lm_head.weight" not in rank  # tied, one stage: the runtime reuses the embedding
        assert torch.equal(rank["model.norm.weight"], src["model.norm.weight"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"]["vocab_size"] == 101
    assert manifest["layout"]["vocab_padded"] == 104
    emb3 = manifest["ranks"][3]["tensors"]["model.embed_tokens.weight"]
    assert emb3["padding"] == 3
    assert emb3["slice"] == {"dim": 0, "start": 78, "stop": 101}


def test_deterministic(tmp_path):
    src_dir = write_checkpoint(tmp_path / "src", shard_size="30KB")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        convert_model(str(src_dir), out, build_recipe(tp=2))
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_dtype_cast_and_file_split(tmp_path):
    src_dir = write_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    convert_model(str(src_dir), out, build_recipe(tp=2, dtype="bfloat16", max_file_size=40_000))
    manifest = json.loads((out / "manifest.json").read_text())
    files = manifest["ranks"][0]["files"]
    assert len(files) > 1 and files[0] == "rank-00000-part-001.safetensors"
    for name in files:
        assert (out / name).stat().st_size <= 40_000 + 4096  # header + one tensor over at most
    src = load_source(src_dir)
    rank = load_rank(out, 1)
    q = src["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16)
    assert rank["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(rank["model.layers.0.self_attn.q_proj.weight"], q[32:])
    entry = manifest["ranks"][1]["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert (entry["dtype"], entry["source_dtype"]) == ("BF16", "F32")


def test_side_files_and_manifest_record(tmp_path):
    src_dir = write_checkpoint(tmp_path / "src", shard_size="30KB")
    out = tmp_path / "out"
    convert_model(str(src_dir), out, build_recipe(tp=2, dp=2))
    assert (out / "config.json").read_bytes() == (src_dir / "config.json").read_bytes()
    assert (out / "generation_config.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["layout"]["world_size"] == 4
    assert [r["replica_of"] for r in manifest["ranks"]] == [None, None, 0, 1]
    assert manifest["ranks"][3]["files"] == ["rank-00001.safetensors"]
    assert len(manifest["files"]) == 2  # replicas copy nothing
    sizes = {f["name"]: f["size"] for f in manifest["source"]["files"]}
    assert sizes == {p.name: p.stat().st_size for p in src_dir.glob("*.safetensors")}
    assert not list(out.glob("*.partial"))
