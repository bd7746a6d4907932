"""Quantized checkpoints (FP8 block / per-tensor / per-channel, int4 AWQ and GPTQ): the
weights and their scales split bitwise in whole blocks, packs and groups (checked with
safetensors' own reader against the source), generation on a tp 2 x pp 2 gloo world token-exact
against the world-size-1 reference, which itself matches transformers running the dequantized
fp32 twin; and every refusal, in plan and convert, before a byte is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from helpers import (  # noqa: E402
    TWIN_NEW_TOKENS,
    assert_all_tiers_pass,
    assert_bitwise_rebuild,
    load_rank,
    load_source,
    twin_generate,
)
from quant_fixtures import SCHEMES, write_quantized  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.convert import convert_model  # noqa: E402
from reshard.errors import UnsupportedModelError  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.models.hparams import parse_hparams  # noqa: E402
from reshard.quant import QuantScheme, parse_quantization, stored_tensors  # noqa: E402
from reshard.runtime.generate import generate_greedy  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402
from reshard.runtime.streamed import reference_streamed  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"
NEW_TOKENS = TWIN_NEW_TOKENS


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    made: dict[str, tuple[Path, object]] = {}

    def get(scheme: str):
        if scheme not in made:
            made[scheme] = write_quantized(tmp_path_factory.mktemp(scheme), scheme)
        return made[scheme]

    return get


# --- pure: schemes, stored shapes -------------------------------------------------------------


def test_schemes_parse_from_quantization_config():
    parsed = {
        name: parse_quantization({"quantization_config": qc}, where="c")
        for name, qc in SCHEMES.items()
    }
    assert parsed["fp8_block"] == QuantScheme("fp8_block", block=(16, 16))
    assert parsed["fp8_tensor"] == QuantScheme("fp8_tensor", input_scale=True)
    assert parsed["fp8_channel"] == QuantScheme("fp8_channel")
    assert parsed["awq"] == QuantScheme("awq", group_size=16)
    assert parsed["gptq"] == QuantScheme("gptq", group_size=16)
    assert parsed["gptq_act"] == QuantScheme("gptq", group_size=16, desc_act=True)
    # on disk (the manifest's hparams) a dict, read back to the same value
    assert parsed["fp8_block"].to_dict()["block"] == [16, 16]
    assert all(QuantScheme.from_dict(s.to_dict()) == s for s in parsed.values())
    assert parse_quantization({}, where="c") is None


@pytest.mark.parametrize(
    ("qc", "text"),
    [
        ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes' is not supported"),
        ({"quant_method": "awq", "bits": 3, "group_size": 128}, "awq bits=3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "gptq group_size=-1"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size=[128]"),
        ({"quant_method": "fp8", "weight_block_size": "128"}, "weight_block_size='128'"),
        (
            {"quant_method": "compressed-tensors", "config_groups": [1]},
            "config_groups is [1], not an object",
        ),
        ("fp8", "quantization_config is str 'fp8', not an object"),
    ],
)
def test_unsupported_schemes_are_refused(qc, text):
    with pytest.raises(UnsupportedModelError, match=text.replace("[", r"\[").replace("]", r"\]")):
        parse_quantization({"quantization_config": qc}, where="config.json")


def test_stored_tensors_give_each_format_shapes():
    """The expected stored shapes a config-vs-tensor shape check uses for quantized weights."""
    block = QuantScheme("fp8_block", block=(128, 128))
    assert stored_tensors(block, "m.down_proj.weight", (4096, 1536), "BF16") == {
        "m.down_proj.weight": ("F8_E4M3", (4096, 1536)),
        "m.down_proj.weight_scale_inv": ("F32", (32, 12)),
    }
    ragged = stored_tensors(block, "m.w.weight", (200, 130), "BF16")["m.w.weight_scale_inv"]
    assert ragged == ("F32", (2, 2))  # ceil(200/128), ceil(130/128)
    awq = stored_tensors(QuantScheme("awq", group_size=128), "m.q.weight", (1024, 4096), "F16")
    assert awq == {
        "m.q.qweight": ("I32", (4096, 128)),
        "m.q.qzeros": ("I32", (32, 128)),
        "m.q.scales": ("F16", (32, 1024)),
    }
    gptq = stored_tensors(QuantScheme("gptq", group_size=128), "m.q.weight", (1024, 4096), "F16")
    assert gptq["m.q.qweight"] == ("I32", (512, 1024)) and gptq["m.q.g_idx"] == ("I32", (4096,))


# --- plan refusals from config.json alone ---------------------------------------------------


def test_plan_refuses_qwen3_235b_fp8_at_tp8_and_names_what_fits():
    result = cli("plan", EXAMPLES / "qwen3-235b-a22b-fp8", "--tp", "8")
    assert result.exit_code == 2, result.output
    assert (
        "tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' (and up_proj alike) would hold "
        "192 of its 1536 rows per rank (split 8 ways), not a multiple of the fp8_block block "
        "size 128; with tp=8 these fit: --ep 2 (expert tp 4), --ep 4 (expert tp 2), --ep 8 "
        "(expert tp 1)"
    ) in result.output
    assert "'model.layers.0.mlp.experts.0.down_proj.weight' would hold 192 of its 1536 columns" in (
        result.output
    )
    assert result.output.rstrip().endswith("Valid tp for this model: 1, 2, 4.")
    fits = cli("plan", EXAMPLES / "qwen3-235b-a22b-fp8", "--tp", "8", "--ep", "4", "--json")
    assert fits.exit_code == 0, fits.output


def test_plan_counts_fp8_bytes_and_scales():
    """1 B per FP8 element + F32 block scales; router gate, norms, embed and head in BF16."""
    config = json.loads((EXAMPLES / "qwen3-235b-a22b-fp8" / "config.json").read_text())
    hp = parse_hparams(config)
    from reshard.models.shapes import synthesize_tensors

    tensors = synthesize_tensors(hp, "BF16")
    expert = "model.layers.5.mlp.experts.7.down_proj"
    assert tensors[f"{expert}.weight"] == ("F8_E4M3", (4096, 1536))
    assert tensors[f"{expert}.weight_scale_inv"] == ("F32", (32, 12))
    assert tensors["model.layers.5.mlp.gate.weight"] == ("BF16", (128, 4096))
    result = cli("plan", EXAMPLES / "qwen3-235b-a22b-fp8", "--tp", "4", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    sizes = {"F8_E4M3": 1, "F32": 4, "BF16": 2}
    total = sum(sizes[d] * torch.Size(s).numel() for d, s in tensors.values())
    assert 236e9 < total < 237e9  # Qwen3-235B-A22B-FP8 on the hub: 236.5 GB
    # tp 4 splits every FP8 weight with its scales and replicates only the norms and routers.
    whole = [s for n, (d, s) in tensors.items() if n.endswith(("norm.weight", "mlp.gate.weight"))]
    replicated = sum(2 * torch.Size(s).numel() for s in whole)
    assert doc["weight_bytes_total"] == total + 3 * replicated


def test_suggest_skips_layouts_that_cut_blocks_and_says_why():
    result = cli(
        "plan", EXAMPLES / "qwen3-235b-a22b-fp8", "--suggest", "--gpu", "H100", "--context", 4096
    )
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.strip().startswith("tp 8:"))
    assert "192 of its 1536 rows per rank" in line and "block size 128" in line


def test_deepseek_v3_like_refuses_tp32_on_dense_and_expert_blocks():
    result = cli("plan", EXAMPLES / "deepseek-v3-like-fp8", "--tp", "32")
    assert result.exit_code == 2
    assert "'model.layers.0.mlp.gate_proj.weight' (and up_proj alike) would hold 576 of its" in (
        result.output
    )
    assert "'model.layers.3.mlp.experts.0.gate_proj.weight' (and up_proj alike) would hold 64" in (
        result.output
    )
    assert "Valid tp for this model: 1, 2, 4, 8, 16." in result.output


# --- convert + verify -------------------------------------------------------------------------


@pytest.mark.world
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_tp2_pp2_bitwise_and_token_exact(quantized, tmp_path, scheme):
    src, twin = quantized(scheme)
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2, pp=2))
    assert_bitwise_rebuild(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    links = manifest["quantization"]["weights"]
    assert manifest["quantization"]["scheme"]["kind"] == scheme.replace("gptq_act", "gptq")
    assert len(links) == 4 * 7  # every linear of the 4 layers, router-free Llama
    for weight, parts in links.items():  # each rank with a part holds all of them
        for entry in manifest["ranks"]:
            held = [p in entry["tensors"] for p in parts.values()]
            assert all(held) or not any(held), (weight, entry["rank"])
    rows = assert_all_tiers_pass(out, max_new_tokens=NEW_TOKENS)
    for row in rows:  # the runtime's reference is transformers on the dequantized twin
        assert row["reference_ids"] == twin_generate(twin, row["prompt_ids"]), row


@pytest.mark.world
def test_moe_fp8_block_experts_split_in_blocks_token_exact(tmp_path):
    """Qwen3-MoE, expert width 32 in 16-row blocks: tp 2 x pp 2 splits every expert in two
    whole blocks (expert tp 2); tp 4 would cut them and is refused, proposing ep."""
    src, twin = write_quantized(tmp_path / "src", "fp8_block", "Qwen3MoeForCausalLM")
    result = cli("convert", src, "--tp", 4, "-o", tmp_path / "refused")
    assert result.exit_code == 2, result.output
    assert (
        "tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' (and up_proj alike) would hold "
        "8 of its 32 rows per rank (split 4 ways), not a multiple of the fp8_block block size "
        "16; with tp=4 these fit: --ep 2 (expert tp 2), --ep 4 (expert tp 1)"
    ) in result.output
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2, pp=2))
    assert_bitwise_rebuild(src, out)
    scale = "model.layers.0.mlp.experts.3.down_proj.weight_scale_inv"  # [4, 2]: in 32 / 16
    assert torch.equal(load_rank(out, 1)[scale], load_source(src)[scale][:, 1:])
    rows = assert_all_tiers_pass(out, max_new_tokens=NEW_TOKENS)
    for row in rows:
        assert row["reference_ids"] == twin_generate(twin, row["prompt_ids"]), row


def test_fp8_block_split_takes_whole_blocks(quantized, tmp_path):
    """Pinned numbers: down_proj [64, 96] in 16x16 blocks, scale [4, 6]; rank 1 (tp 2) holds
    columns 48:96 and scale columns 3:6; k_proj (1 kv head < tp) whole on both ranks."""
    src, _ = quantized("fp8_block")
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2))
    source, rank1, rank0 = load_source(src), load_rank(out, 1), load_rank(out, 0)
    down = "model.layers.2.mlp.down_proj"
    assert source[f"{down}.weight_scale_inv"].shape == (4, 6)
    assert torch.equal(rank1[f"{down}.weight_scale_inv"], source[f"{down}.weight_scale_inv"][:, 3:])
    fp8 = rank1[f"{down}.weight"].view(torch.uint8)
    assert torch.equal(fp8, source[f"{down}.weight"][:, 48:].view(torch.uint8))
    k = "model.layers.0.self_attn.k_proj.weight_scale_inv"
    assert torch.equal(rank0[k], source[k]) and torch.equal(rank1[k], source[k])


def test_awq_and_gptq_splits_keep_packs_and_groups(quantized, tmp_path):
    """AWQ q_proj qweight [64, 8]: out 64 in packs of 8, rank 1 holds packs 4:8. GPTQ act-order
    o_proj (row-parallel): qweight rows and g_idx cut, scales/qzeros whole on both ranks."""
    src, _ = quantized("awq")
    convert_model(str(src), tmp_path / "awq", build_recipe(tp=2))
    source, rank1 = load_source(src), load_rank(tmp_path / "awq", 1)
    q = "model.layers.1.self_attn.q_proj"
    assert torch.equal(rank1[f"{q}.qweight"], source[f"{q}.qweight"][:, 4:])
    assert torch.equal(rank1[f"{q}.scales"], source[f"{q}.scales"][:, 32:])
    down = "model.layers.1.mlp.down_proj"  # in 96 in groups of 16: rank 1 holds groups 3:6
    assert torch.equal(rank1[f"{down}.qzeros"], source[f"{down}.qzeros"][3:])
    src, _ = quantized("gptq_act")
    convert_model(str(src), tmp_path / "gptq", build_recipe(tp=2))
    source, rank1 = load_source(src), load_rank(tmp_path / "gptq", 1)
    o = "model.layers.1.self_attn.o_proj"
    assert torch.equal(rank1[f"{o}.qweight"], source[f"{o}.qweight"][4:])  # in rows 32:64
    assert torch.equal(rank1[f"{o}.g_idx"], source[f"{o}.g_idx"][32:])
    assert torch.equal(rank1[f"{o}.scales"], source[f"{o}.scales"])
    assert torch.equal(rank1[f"{o}.qzeros"], source[f"{o}.qzeros"])


@pytest.mark.parametrize(
    ("scheme", "text"),
    [
        (
            "fp8_block",
            "tensor 'model.layers.0.mlp.gate_proj.weight' (and up_proj alike) would hold 24 of "
            "its 96 rows per rank (split 4 ways), not a multiple of the fp8_block block size 16",
        ),
        (
            "awq",
            "tensor 'model.layers.0.mlp.down_proj.weight' would hold 24 of its 96 columns per "
            "rank (split 4 ways), not a multiple of the awq pack/group size 16",
        ),
        (
            "gptq",
            "tensor 'model.layers.0.mlp.down_proj.weight' would hold 24 of its 96 columns per "
            "rank (split 4 ways), not a multiple of the gptq pack/group size 16",
        ),
    ],
)
def test_convert_refuses_a_cut_before_any_write(quantized, tmp_path, scheme, text):
    src, _ = quantized(scheme)
    out = tmp_path / "out"
    result = cli("convert", src, "--tp", 4, "-o", out)
    assert result.exit_code == 2, result.output
    assert text in result.output and "Valid tp for this model: 1, 2." in result.output
    assert not out.exists()


def test_gptq_act_order_row_split_keeps_scales_whole_at_tp4(quantized, tmp_path):
    """desc_act keeps scales/qzeros whole, so only the 8-row pack binds: tp 4 (24 rows of
    down_proj's 96 per rank) converts, where plain GPTQ (groups of 16) is refused."""
    src, _ = quantized("gptq_act")
    convert_model(str(src), tmp_path / "out", build_recipe(tp=4))
    assert_bitwise_rebuild(src, tmp_path / "out")
    rank3 = load_rank(tmp_path / "out", 3)
    assert rank3["model.layers.0.mlp.down_proj.qweight"].shape == (3, 64)


def test_dtype_cast_of_a_quantized_model_is_refused(quantized, tmp_path):
    src, _ = quantized("fp8_channel")
    result = cli("convert", src, "--tp", 2, "--dtype", "bf16", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "--dtype bfloat16: LlamaForCausalLM is quantized (fp8_channel)" in result.output
    assert "never casts them. Drop --dtype" in result.output
    assert not (tmp_path / "out").exists()


def test_fp8_weight_without_its_scale_is_refused(quantized, tmp_path):
    src, _ = quantized("fp8_block")
    copy = tmp_path / "src"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    alone = "model-00003-of-00003.safetensors"
    lone = next(n for n, f in index["weight_map"].items() if f == alone)
    del index["weight_map"][lone]
    (copy / alone).unlink()
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("convert", copy, "--tp", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    weight = lone.rpartition(".")[0] + ".weight"
    assert f"tensor '{weight}' is F8_E4M3 but has no scale tensor" in result.output


def test_reference_dequantizes_like_the_twin(quantized):
    """World size 1, all positions: the runtime on the quantized files == transformers on the
    dequantized twin (fp32; the weights are bitwise the same, so only kernels differ)."""
    src, twin = quantized("gptq_act")
    model = load_source_model(src, dtype="float32")
    prompt = [5, 17, 3, 88, 42, 9, 61]
    ours = generate_greedy(model, [prompt], NEW_TOKENS)
    assert ours[0].tokens == twin_generate(twin, prompt)
    # The streamed reference (one layer at a time) dequantizes each piece the same way.
    streamed = reference_streamed(src, ours, dtype=torch.float32)
    assert streamed[0].tokens == ours[0].tokens
    tol = 1e-4 + 1e-5 * float(ours[0].logits.abs().max())  # fp32, as runtime/compare.py
    assert float((streamed[0].logits - ours[0].logits).abs().max()) <= tol


def test_slicing_refuses_a_cut_block_the_config_did_not_predict():
    """The per-tensor check behind split_problems: a range that starts inside a block."""
    from reshard.errors import LayoutError
    from reshard.models.family import Rule
    from reshard.models.rules import TensorRole
    from reshard.quant.slicing import stored_slice

    rule = Rule("m.{layer}.o_proj.weight", "row", "layer")
    name = "m.0.o_proj.weight_scale_inv"
    role = TensorRole(name, rule, 0, None, "scale_inv", "m.0.o_proj.weight")
    scheme = QuantScheme("fp8_block", block=(128, 128))
    assert stored_slice(scheme, role, 256, 512, 1, (640, 640), (5, 5)) == (1, 2, 4)
    assert stored_slice(scheme, role, 512, 600, 1, (640, 600), (5, 5)) == (1, 4, 5)  # ragged end
    with pytest.raises(LayoutError) as e:
        stored_slice(scheme, role, 192, 384, 1, (640, 384), (5, 3))
    assert str(e.value) == (
        "tensor 'm.0.o_proj.weight_scale_inv': this rank's columns 192:384 of "
        "'m.0.o_proj.weight' (192 per rank) cut a fp8_block unit of 128 columns. Choose a tp "
        "(or an expert tp = tp/ep) that leaves a multiple of 128 per rank."
    )


def test_inspect_names_the_scheme(quantized):
    src, _ = quantized("fp8_block")
    result = cli("inspect", src)
    assert result.exit_code == 0, result.output
    assert "quantized     FP8 E4M3, block-scaled [16, 16]" in result.output


def test_plan_counts_int4_bytes_with_scales_and_zeros(tmp_path):
    """Llama-3-8B as AWQ (group 128): half a byte per weight + fp16 scales + int32 zeros."""
    config = json.loads((EXAMPLES / "llama-3-8b" / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config["quantization_config"] = SCHEMES["awq"] | {"group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = cli("plan", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    h, inner, layers, vocab = 4096, 14336, 32, 128256
    linears = [(4096, h), (1024, h), (1024, h), (h, 4096), (inner, h), (inner, h), (h, inner)]
    int4 = sum(o * i // 2 + (i // 128) * o * 2 + (i // 128) * (o // 8) * 4 for o, i in linears)
    rest = 2 * vocab * h * 2 + (2 * h) * 2 * layers + h * 2  # embed, head, norms (fp16)
    assert json.loads(result.output)["weight_bytes_total"] == int4 * layers + rest


def test_parts_with_wrong_shapes_or_no_config_are_refused():
    from reshard.errors import UnsupportedModelError
    from reshard.models.rules import match_tensors
    from reshard.models.shapes import synthesize_tensors
    from reshard.quant import check_parts

    config = json.loads((EXAMPLES / "llama-3-8b" / "config.json").read_text())
    config["quantization_config"] = SCHEMES["gptq"] | {"group_size": 128}
    hp = parse_hparams(config)
    tensors = synthesize_tensors(hp, "F16")
    roles = match_tensors(hp, tensors)
    check_parts(hp.quantization, tensors, roles, where="ckpt")  # as synthesized: consistent
    bad = dict(tensors)
    bad["model.layers.3.mlp.down_proj.scales"] = ("F16", (32, 14336))  # [out/g, in]: transposed
    with pytest.raises(UnsupportedModelError) as e:
        check_parts(hp.quantization, bad, roles, where="ckpt")
    assert str(e.value) == (
        "ckpt: tensor 'model.layers.3.mlp.down_proj.scales' is F16 [32, 14336], but gptq with "
        "'model.layers.3.mlp.down_proj.weight' of shape [4096, 14336] stores it as F16 "
        "[112, 4096]. The checkpoint and its quantization_config disagree."
    )
    config.pop("quantization_config")
    plain = parse_hparams(config)
    with pytest.raises(UnsupportedModelError, match="are quantized but config.json has no "):
        check_parts(None, tensors, match_tensors(plain, tensors), where="ckpt")


def test_reference_memory_counts_int4_unpacked(quantized):
    """The auto reference choice sizes the dequantized model: qweight holds 8 values an int32,
    so fp32 bytes = the twin's weights + the zeros and scales kept beside them."""
    from reshard.runtime.streamed import source_bytes

    src, twin = quantized("awq")
    stored = load_source(src)
    side = sum(t.numel() for n, t in stored.items() if n.endswith((".qzeros", ".scales")))
    weights = sum(t.numel() for t in twin.state_dict().values())
    assert source_bytes(src, torch.float32) == 4 * (weights + side)


def test_config_shapes_are_checked_through_the_packed_tensors(quantized, tmp_path):
    """The config-vs-tensor check reads an AWQ weight's logical [out, in] off its qweight."""
    src, _ = quantized("awq")
    copy = tmp_path / "src"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] = 64  # still splits in whole groups at tp 2
    (copy / "config.json").write_text(json.dumps(config))
    result = cli("convert", copy, "--tp", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "tensor 'model.layers.0.mlp.down_proj.weight' has 96 in dim 1 (shape [64, 96])" in (
        result.output
    )
    assert "says intermediate_size=64, which implies 64" in result.output


def test_a_quantized_output_relays_out_bitwise(quantized, tmp_path):
    """A reshard output is a source: tp 2 -> tp 1 gives back every packed tensor bitwise."""
    src, _ = quantized("awq")
    convert_model(str(src), tmp_path / "tp2", build_recipe(tp=2))
    convert_model(str(tmp_path / "tp2"), tmp_path / "tp1", build_recipe(tp=1))
    source, rank0 = load_source(src), load_rank(tmp_path / "tp1", 0)
    assert set(rank0) == set(source)
    for name, tensor in source.items():
        assert torch.equal(rank0[name].view(torch.uint8), tensor.view(torch.uint8)), name
