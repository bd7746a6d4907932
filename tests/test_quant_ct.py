"""compressed-tensors int4/int8 (pack-quantized W4A16/W8A16, int-quantized W8A8) and NVFP4
(ModelOpt, compressed-tensors): split bitwise in whole packs, groups and 16-value blocks
(checked with safetensors' reader against the source), every fixture mixing ignored
(unquantized) linears with quantized ones; generation on a tp 2 x pp 2 gloo world equal to
transformers running the dequantized fp32 twin; refusals in plan and convert before a byte is
written; `plan` from real configs counting the stored bytes; export giving the bytes back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from helpers import TWIN_NEW_TOKENS as NEW_TOKENS  # noqa: E402
from helpers import (  # noqa: E402
    assert_all_tiers_pass,
    assert_bitwise_rebuild,
    load_rank,
    load_source,
    twin_generate,
)
from quant_fixtures_ct import SCHEMES, write_quantized_ct  # noqa: E402
from tolerances import assert_close_scaled  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.convert import convert_model  # noqa: E402
from reshard.errors import LayoutError, UnsupportedModelError  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.models.hparams import parse_hparams  # noqa: E402
from reshard.quant import QuantScheme, parse_quantization  # noqa: E402
from reshard.runtime.dequant import dequantize_tensors  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"
KINDS = {
    "w4a16": "ct_packed", "w4a16_zp": "ct_packed", "w8a16_channel": "ct_packed",
    "w4a16_tensor": "ct_packed", "w4a16_actorder": "ct_packed", "w8a8": "ct_int8",
    "w8a8_zp": "ct_int8",
    "nvfp4_ct": "ct_nvfp4", "nvfp4_modelopt": "nvfp4",
}  # fmt: skip
# Stored bytes per safetensors dtype, for counting plan's figures by hand.
SIZE = {"I32": 4, "I64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    made: dict[str, tuple[Path, object]] = {}

    def get(scheme: str):
        if scheme not in made:
            made[scheme] = write_quantized_ct(tmp_path_factory.mktemp(scheme), scheme)
        return made[scheme]

    return get


# --- pure: parsing ----------------------------------------------------------------------------


def test_schemes_parse_from_quantization_config():
    parsed = {
        name: parse_quantization({"quantization_config": qc}, where="c")
        for name, qc in SCHEMES.items()
    }
    assert {n: s.kind for n, s in parsed.items()} == KINDS
    w4 = parsed["w4a16"]
    assert (w4.bits, w4.strategy, w4.group_size, w4.zero_point) == (4, "group", 16, False)
    assert w4.ignore == ("lm_head", r"re:.*layers\.1\.mlp\.(gate|up|down)_proj$")
    assert w4.targets == ("Linear",)
    assert parsed["w4a16_zp"].zero_point
    assert (parsed["w8a16_channel"].bits, parsed["w8a16_channel"].strategy) == (8, "channel")
    assert parsed["w8a8"].parts == ("weight", "weight_scale")  # dynamic activations: no scale
    assert parsed["nvfp4_ct"].parts == (
        "weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"
    )  # fmt: skip
    assert parsed["nvfp4_modelopt"].parts == (
        "weight", "weight_scale", "weight_scale_2", "input_scale"
    )  # fmt: skip
    # A manifest round trip keeps every field.
    for scheme in parsed.values():
        assert QuantScheme.from_dict(scheme.to_dict()) == scheme


def _ct_group(**weights):
    base = SCHEMES["w4a16"]["config_groups"]["group_0"]
    return {
        **SCHEMES["w4a16"],
        "config_groups": {"g": {**base, "weights": base["weights"] | weights}},
    }


@pytest.mark.parametrize(
    ("qc", "text"),
    [
        (_ct_group(num_bits=3), "num_bits=3, strategy='group'): reshard splits pack-quantized"),
        (_ct_group(group_size=12), "group_size=12: reshard splits the group (group_size a "
         "positive multiple of 8), channel and tensor strategies"),
        (_ct_group(actorder="group", strategy="channel"), "actorder 'group' orders the groups"),
        (_ct_group(strategy="tensor", symmetric=False), "asymmetric per-tensor zero point"),
        (_ct_group(strategy="block"), "strategy='block')"),
        ({**SCHEMES["w4a16"], "config_groups": {"a": {}, "b": {}}},
         "config_groups holds 2 groups"),
        ({**SCHEMES["w4a16"], "ignore": "lm_head"}, "ignore='lm_head' must be a list"),
        ({"quant_method": "modelopt", "quant_algo": "FP8"}, "modelopt quant_algo='FP8'"),
        ({**SCHEMES["nvfp4_ct"], "format": "pack-quantized"}, "format 'pack-quantized'"),
    ],
)  # fmt: skip
def test_unsupported_forms_are_refused(qc, text):
    with pytest.raises(UnsupportedModelError) as e:
        parse_quantization({"quantization_config": qc}, where="config.json")
    assert str(e.value).startswith("config.json: ") and text in str(e.value)


# --- convert + verify -------------------------------------------------------------------------


def _dequantized_equals_twin(src: Path, twin) -> None:
    """The runtime's dequantization of the source == the twin's fp32 weights, bitwise."""
    hp = parse_hparams(json.loads((src / "config.json").read_text()))
    ours = dequantize_tensors(load_source(src), hp.quantization, None)
    for name, expected in twin.state_dict().items():
        if name in ours:
            assert torch.equal(ours[name].float(), expected), name


# One gloo world per scheme; the strategy variants (int8 per channel packed 4 a word, int4 per
# tensor, asymmetric int8) run the same sharded code and are proven bitwise + at world size 1.
WORLDS = ["w4a16", "w4a16_zp", "w4a16_actorder", "w8a8", "nvfp4_ct", "nvfp4_modelopt"]


@pytest.mark.world
@pytest.mark.parametrize("scheme", WORLDS)
def test_tp2_pp2_bitwise_and_token_exact(quantized, tmp_path, scheme):
    src, twin = quantized(scheme)
    _dequantized_equals_twin(src, twin)
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2, pp=2))
    assert_bitwise_rebuild(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    links = manifest["quantization"]["weights"]
    assert manifest["quantization"]["scheme"]["kind"] == KINDS[scheme]
    assert len(links) == 4 * 7 - 3  # every linear of the 4 layers but layer 1's ignored MLP
    assert not any(w.startswith("model.layers.1.mlp.") for w in links)
    for weight, parts in links.items():  # each rank with a part holds all of them
        for entry in manifest["ranks"]:
            held = [p in entry["tensors"] for p in parts.values()]
            assert all(held) or not any(held), (weight, entry["rank"])
    rows = assert_all_tiers_pass(out, max_new_tokens=NEW_TOKENS)
    for row in rows:  # the runtime's reference is transformers on the dequantized twin
        assert row["reference_ids"] == twin_generate(twin, row["prompt_ids"]), row


@pytest.mark.float_sensitive
@pytest.mark.parametrize("scheme", ["w8a16_channel", "w4a16_tensor"])
def test_channel_and_tensor_strategies_split_and_match_the_twin(quantized, tmp_path, scheme):
    """int8 packed 4 a word with one scale per row; int4 with one scale for the tensor:
    bitwise at tp 2 x pp 2, and the twin's tokens at world size 1."""
    from reshard.runtime.generate import generate_greedy
    from reshard.runtime.load import load_source_model

    src, twin = quantized(scheme)
    _dequantized_equals_twin(src, twin)
    convert_model(str(src), tmp_path / "out", build_recipe(tp=2, pp=2))
    assert_bitwise_rebuild(src, tmp_path / "out")
    prompt = [5, 17, 3, 88, 42, 9, 61]
    ours = generate_greedy(load_source_model(src, dtype="float32"), [prompt], NEW_TOKENS)
    assert ours[0].tokens == twin_generate(twin, prompt)


@pytest.mark.float_sensitive
def test_w8a8_zero_points_split_with_the_rows(quantized, tmp_path):
    """Asymmetric int8: weight_zero_point int8 [out, 1] beside the scale, cut with the rows;
    bitwise at tp 2 x pp 2 and the twin's tokens at world size 1."""
    from reshard.runtime.generate import generate_greedy
    from reshard.runtime.load import load_source_model

    src, twin = quantized("w8a8_zp")
    _dequantized_equals_twin(src, twin)
    convert_model(str(src), tmp_path / "out", build_recipe(tp=2, pp=2))
    assert_bitwise_rebuild(src, tmp_path / "out")
    gate = "model.layers.0.mlp.gate_proj.weight_zero_point"  # [96, 1]
    assert torch.equal(load_rank(tmp_path / "out", 1)[gate], load_source(src)[gate][48:])
    assert int(load_source(src)[gate].abs().max()) > 0  # zero points that matter
    prompt = [5, 17, 3, 88, 42, 9, 61]
    ours = generate_greedy(load_source_model(src, dtype="float32"), [prompt], NEW_TOKENS)
    assert ours[0].tokens == twin_generate(twin, prompt)


def test_w4a16_splits_keep_packs_and_groups(quantized, tmp_path):
    """Pinned numbers, tp 2: q_proj [64, 64] is weight_packed [64, 8]: rank 1 holds rows
    32:64. down_proj [64, 96] (row-parallel) is weight_packed [64, 12] and weight_scale
    [64, 6]: rank 1 holds words 6:12 and groups 3:6. weight_shape [64, 96] whole on both."""
    src, _ = quantized("w4a16")
    convert_model(str(src), tmp_path / "out", build_recipe(tp=2))
    source, rank0, rank1 = (
        load_source(src),
        load_rank(tmp_path / "out", 0),
        load_rank(tmp_path / "out", 1),
    )
    q, down = "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"
    assert source[f"{down}.weight_packed"].shape == (64, 12)
    assert torch.equal(rank1[f"{q}.weight_packed"], source[f"{q}.weight_packed"][32:])
    assert torch.equal(rank1[f"{down}.weight_packed"], source[f"{down}.weight_packed"][:, 6:])
    scale = rank1[f"{down}.weight_scale"].view(torch.int16)
    assert torch.equal(scale, source[f"{down}.weight_scale"][:, 3:].view(torch.int16))
    assert (
        rank0[f"{down}.weight_shape"].tolist() == [64, 96] == rank1[f"{down}.weight_shape"].tolist()
    )
    ignored = "model.layers.1.mlp.down_proj.weight"  # plain fp32, split like any row weight
    assert torch.equal(rank1[ignored], source[ignored][:, 48:])


def test_zero_points_split_in_packs_of_rows(quantized, tmp_path):
    """Asymmetric W4A16: weight_zero_point [out/8, in/16] int32 packed along out. gate_proj
    [96, 64] column-parallel at tp 2: rank 1 holds rows 48:96 = zero-point words 6:12;
    down_proj [64, 96] row-parallel: every zero-point row, groups 3:6."""
    src, _ = quantized("w4a16_zp")
    convert_model(str(src), tmp_path / "out", build_recipe(tp=2))
    source, rank1 = load_source(src), load_rank(tmp_path / "out", 1)
    gate, down = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"
    assert source[f"{gate}.weight_zero_point"].shape == (12, 4)
    assert torch.equal(rank1[f"{gate}.weight_zero_point"], source[f"{gate}.weight_zero_point"][6:])
    assert torch.equal(
        rank1[f"{down}.weight_zero_point"], source[f"{down}.weight_zero_point"][:, 3:]
    )


def test_actorder_row_split_keeps_scales_whole_at_tp4(quantized, tmp_path):
    """actorder group: weight_g_idx names each column's group, so a row split cuts
    weight_packed words and weight_g_idx with the columns and keeps weight_scale whole; only
    the 8-value word binds, so tp 4 (24 of down_proj's 96 columns a rank) converts."""
    src, _ = quantized("w4a16_actorder")
    convert_model(str(src), tmp_path / "out", build_recipe(tp=4))
    assert_bitwise_rebuild(src, tmp_path / "out")
    source, rank3 = load_source(src), load_rank(tmp_path / "out", 3)
    down = "model.layers.0.mlp.down_proj"
    assert torch.equal(rank3[f"{down}.weight_packed"], source[f"{down}.weight_packed"][:, 9:])
    assert torch.equal(rank3[f"{down}.weight_g_idx"], source[f"{down}.weight_g_idx"][72:])
    scale = rank3[f"{down}.weight_scale"].view(torch.int16)
    assert torch.equal(scale, source[f"{down}.weight_scale"].view(torch.int16))  # [64, 6]


def test_nvfp4_splits_keep_16_value_blocks(quantized, tmp_path):
    """ModelOpt down_proj [64, 96]: weight uint8 [64, 48] and weight_scale fp8 [64, 6]; rank 1
    (tp 2) holds bytes 24:48 and scales 3:6; the 0-dim weight_scale_2 is whole on both."""
    src, _ = quantized("nvfp4_modelopt")
    convert_model(str(src), tmp_path / "out", build_recipe(tp=2))
    source, rank1 = load_source(src), load_rank(tmp_path / "out", 1)
    down = "model.layers.3.mlp.down_proj"
    assert source[f"{down}.weight"].shape == (64, 48)
    assert torch.equal(rank1[f"{down}.weight"], source[f"{down}.weight"][:, 24:])
    fp8 = rank1[f"{down}.weight_scale"].view(torch.uint8)
    assert torch.equal(fp8, source[f"{down}.weight_scale"][:, 3:].view(torch.uint8))
    assert rank1[f"{down}.weight_scale_2"].shape == () and torch.equal(
        rank1[f"{down}.weight_scale_2"], source[f"{down}.weight_scale_2"]
    )


@pytest.mark.parametrize(
    ("scheme", "text"),
    [
        ("w4a16", "tensor 'model.layers.0.mlp.down_proj.weight' would hold 24 of its 96 columns "
         "per rank (split 4 ways), not a multiple of the ct_packed pack/group size 16"),
        ("nvfp4_ct", "tensor 'model.layers.0.mlp.down_proj.weight' would hold 24 of its 96 "
         "columns per rank (split 4 ways), not a multiple of the ct_nvfp4 block size 16"),
        ("nvfp4_modelopt", "tensor 'model.layers.0.mlp.down_proj.weight' would hold 24 of its "
         "96 columns per rank (split 4 ways), not a multiple of the nvfp4 block size 16"),
    ],
)  # fmt: skip
def test_convert_refuses_a_cut_before_any_write(quantized, tmp_path, scheme, text):
    src, _ = quantized(scheme)
    out = tmp_path / "out"
    result = cli("convert", src, "--tp", 4, "-o", out)
    assert result.exit_code == 2, result.output
    assert text in result.output and "Valid tp for this model: 1, 2." in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_w8a8_per_channel_splits_at_tp4(quantized, tmp_path):
    """Per-channel int8 has no unit along in: tp 4 (24 of down_proj's 96 columns a rank)
    converts, where the group-16 forms are refused."""
    src, _ = quantized("w8a8")
    convert_model(str(src), tmp_path / "out", build_recipe(tp=4))
    assert_bitwise_rebuild(src, tmp_path / "out")
    rank3 = load_rank(tmp_path / "out", 3)
    assert rank3["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert rank3["model.layers.0.mlp.down_proj.weight"].shape == (64, 24)
    assert rank3["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 1)


def test_slicing_refuses_a_cut_zero_point_pack():
    """The per-tensor check behind split_problems: rows 4:8 of a weight whose zero points are
    packed 8 rows a word."""
    from reshard.models.family import Rule
    from reshard.models.rules import TensorRole
    from reshard.quant.slicing import stored_slice

    scheme = QuantScheme("ct_packed", group_size=16, bits=4, strategy="group", zero_point=True)
    rule = Rule("m.{layer}.q_proj.weight", "column", "layer")
    role = TensorRole("m.0.q_proj.weight_zero_point", rule, 0, None, "weight_zero_point",
                      "m.0.q_proj.weight")  # fmt: skip
    assert stored_slice(scheme, role, 8, 16, 0, (16, 64), (2, 4)) == (0, 1, 2)
    with pytest.raises(LayoutError) as e:
        stored_slice(scheme, role, 4, 8, 0, (16, 64), (2, 4))
    assert str(e.value) == (
        "tensor 'm.0.q_proj.weight_zero_point': this rank's rows 4:8 of 'm.0.q_proj.weight' "
        "(4 per rank) cut a ct_packed unit of 8 rows. Choose a tp (or an expert tp = tp/ep) "
        "that leaves a multiple of 8 per rank."
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_quantized_tensors_of_an_ignored_module_are_refused(quantized, tmp_path):
    """The config's ignore list and the tensors must agree: layer 0's q_proj stored packed
    while the config says it is ignored is refused, naming the tensors and the rules."""
    src = _copy(quantized("w4a16")[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["ignore"].append("model.layers.0.self_attn.q_proj")
    (src / "config.json").write_text(json.dumps(config))
    result = cli("convert", src, "--tp", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert (
        "tensors ['model.layers.0.self_attn.q_proj.weight_packed', "
        "'model.layers.0.self_attn.q_proj.weight_scale', "
        "'model.layers.0.self_attn.q_proj.weight_shape'] are quantized, but "
        "quantization_config leaves 'model.layers.0.self_attn.q_proj' unquantized"
    ) in result.output
    assert "The checkpoint and its quantization_config disagree." in result.output
    assert not (tmp_path / "out").exists()


def test_plain_linear_the_config_quantizes_is_refused(quantized, tmp_path):
    """The other way round: layer 1's MLP is stored unquantized, and a config without that
    ignore rule says it is quantized."""
    src = _copy(quantized("w4a16")[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head"]
    (src / "config.json").write_text(json.dumps(config))
    text = (
        "tensor 'model.layers.1.mlp.down_proj.weight' is stored unquantized (F32 [64, 96]), "
        "but quantization_config (int4 compressed-tensors pack-quantized, per-group 16 scale, "
        "symmetric) quantizes 'model.layers.1.mlp.down_proj': it is not in ignore ['lm_head']."
    )
    for args in (("plan", src, "--tp", 2), ("convert", src, "--tp", 2, "-o", tmp_path / "out")):
        result = cli(*args)
        assert result.exit_code == 2 and text in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_scale_with_the_wrong_shape_is_refused(quantized, tmp_path):
    """check_parts through the new forms: a weight_scale of [out, in/8] where group 16 says
    [out, in/16] names the tensor, both shapes and the scheme."""
    src, _ = quantized("w4a16")
    hp = parse_hparams(json.loads((src / "config.json").read_text()))
    from reshard.models.rules import match_tensors
    from reshard.quant import check_parts

    tensors = {n: (_dtype(t), tuple(t.shape)) for n, t in load_source(src).items()}
    name = "model.layers.0.mlp.down_proj.weight_scale"
    tensors[name] = ("BF16", (64, 12))
    with pytest.raises(UnsupportedModelError) as e:
        check_parts(hp.quantization, tensors, match_tensors(hp, tensors), where="ckpt")
    assert str(e.value) == (
        f"ckpt: tensor '{name}' is BF16 [64, 12], but ct_packed with "
        "'model.layers.0.mlp.down_proj.weight' of shape [64, 96] stores it as BF16 [64, 6]. "
        "The checkpoint and its quantization_config disagree."
    )


def _dtype(t: torch.Tensor) -> str:
    return {torch.int32: "I32", torch.int64: "I64", torch.bfloat16: "BF16",
            torch.float32: "F32"}[t.dtype]  # fmt: skip


def test_export_writes_the_original_bytes_back(quantized, tmp_path):
    """tp 2 x pp 2 rank files -> a Hugging Face checkpoint: every packed weight, scale, zero
    point, shape and global scale is the source's, bitwise (read with safetensors)."""
    for scheme in ("w4a16_zp", "nvfp4_modelopt"):
        src, _ = quantized(scheme)
        out, hf = tmp_path / f"{scheme}-out", tmp_path / f"{scheme}-hf"
        convert_model(str(src), out, build_recipe(tp=2, pp=2))
        result = cli("export", out, "-o", hf)
        assert result.exit_code == 0, result.output
        source, exported = load_source(src), load_source(hf)
        assert set(exported) == set(source)
        for name, tensor in source.items():
            assert exported[name].dtype == tensor.dtype, name
            raw = exported[name].reshape(-1).view(torch.uint8)
            assert torch.equal(raw, tensor.reshape(-1).view(torch.uint8)), name


def test_inspect_names_the_scheme(quantized):
    result = cli("inspect", quantized("w4a16")[0])
    assert result.exit_code == 0, result.output
    assert "int4 compressed-tensors pack-quantized, per-group 16 scale, symmetric" in (
        result.output
    )


# --- plan from config.json alone ------------------------------------------------------------


LLAMA_8B = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096),
            (14336, 4096), (4096, 14336)]  # fmt: skip


def _plan_total(folder: Path) -> int:
    result = cli("plan", folder, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["weight_bytes_total"]


def _unquantized_rest(vocab=128256, h=4096, layers=32) -> int:
    return 2 * vocab * h * 2 + (2 * h) * 2 * layers + h * 2  # embed, head, norms (bf16)


def test_plan_counts_w4a16_bytes_exactly():
    """Llama-3.1-8B W4A16 (group 128, symmetric): int32 words of 8 values, a bf16 scale per
    group and an int64 weight_shape per linear."""
    per_layer = sum(o * i // 2 + o * (i // 128) * 2 + 16 for o, i in LLAMA_8B)
    total = _plan_total(EXAMPLES / "llama-3.1-8b-instruct-w4a16")
    assert total == per_layer * 32 + _unquantized_rest()


def test_plan_counts_w8a8_bytes_exactly():
    per_layer = sum(o * i + o * 2 for o, i in LLAMA_8B)  # int8 + a bf16 scale per row
    assert _plan_total(EXAMPLES / "llama-3.1-8b-instruct-w8a8") == per_layer * 32 + (
        _unquantized_rest()
    )


def test_plan_counts_nvfp4_bytes_exactly():
    """ModelOpt NVFP4: half a byte a value, an fp8 scale per 16, fp32 weight_scale_2 and
    input_scale per linear."""
    per_layer = sum(o * i // 2 + o * i // 16 + 8 for o, i in LLAMA_8B)
    assert _plan_total(EXAMPLES / "llama-3.1-8b-instruct-nvfp4") == per_layer * 32 + (
        _unquantized_rest()
    )


def test_plan_counts_compressed_tensors_nvfp4_bytes_exactly():
    """compressed-tensors NVFP4 (W4A4): as ModelOpt's, with weight_global_scale and
    input_global_scale F32 [1] per linear."""
    per_layer = sum(o * i // 2 + o * i // 16 + 8 for o, i in LLAMA_8B)
    assert _plan_total(EXAMPLES / "llama-3.1-8b-instruct-nvfp4-ct") == per_layer * 32 + (
        _unquantized_rest()
    )


def test_plan_honours_the_ignore_list(tmp_path):
    """Layer 0 ignored: its 7 linears count in bf16 (2 bytes a value), the others packed."""
    config = json.loads((EXAMPLES / "llama-3.1-8b-instruct-w4a16" / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", r"re:model\.layers\.0\..*"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    packed = sum(o * i // 2 + o * (i // 128) * 2 + 16 for o, i in LLAMA_8B)
    plain = sum(o * i * 2 for o, i in LLAMA_8B)
    assert _plan_total(tmp_path) == packed * 31 + plain + _unquantized_rest()


def test_plan_suggest_and_convert_refuse_a_cut_group_from_a_real_config(tmp_path):
    """Qwen3-30B-A3B W4A16 (group 128): an expert's 768 rows in 6 groups; tp 4 would give
    each rank 1.5 groups of down_proj: refused naming what fits; --ep 2 fits."""
    folder = EXAMPLES / "qwen3-30b-a3b-w4a16"
    result = cli("plan", folder, "--tp", 4)
    assert result.exit_code == 2, result.output
    assert (
        "tensor 'model.layers.0.mlp.experts.0.down_proj.weight' would hold 192 of its 768 "
        "columns per rank (split 4 ways), not a multiple of the ct_packed pack/group size 128; "
        "with tp=4 these fit: --ep 2 (expert tp 2), --ep 4 (expert tp 1)"
    ) in result.output
    assert cli("plan", folder, "--tp", 4, "--ep", 2, "--json").exit_code == 0
    suggest = cli("plan", folder, "--suggest", "--gpu", "H100", "--context", 4096)
    assert suggest.exit_code == 0, suggest.output
    line = next(ln for ln in suggest.output.splitlines() if ln.strip().startswith("tp 4:"))
    assert "192 of its 768 columns per rank" in line and "pack/group size 128" in line


@pytest.mark.world
def test_moe_w4a16_experts_split_in_groups_token_exact(tmp_path):
    """Qwen3-MoE, expert width 32 in groups of 16: tp 4 would cut down_proj's groups and is
    refused proposing ep; tp 2 x pp 2 splits every expert in two whole groups (expert tp 2),
    bitwise, and generates the twin's tokens."""
    src, twin = write_quantized_ct(tmp_path / "src", "w4a16", "Qwen3MoeForCausalLM")
    result = cli("convert", src, "--tp", 4, "-o", tmp_path / "refused")
    assert result.exit_code == 2, result.output
    assert (
        "tensor 'model.layers.0.mlp.experts.0.down_proj.weight' would hold 8 of its 32 columns "
        "per rank (split 4 ways), not a multiple of the ct_packed pack/group size 16; with "
        "tp=4 these fit: --ep 2 (expert tp 2), --ep 4 (expert tp 1)"
    ) in result.output
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    convert_model(str(src), out, build_recipe(tp=2, pp=2))
    assert_bitwise_rebuild(src, out)
    down = "model.layers.0.mlp.experts.3.down_proj"  # [64, 32]: weight_packed [64, 4]
    assert torch.equal(load_rank(out, 1)[f"{down}.weight_packed"], load_source(src)[
        f"{down}.weight_packed"][:, 2:])  # fmt: skip
    rows = assert_all_tiers_pass(out, max_new_tokens=NEW_TOKENS)
    for row in rows:
        assert row["reference_ids"] == twin_generate(twin, row["prompt_ids"]), row


def _legacy_modelopt(config_dir: Path, folder: Path, exclude: list[str]) -> Path:
    """The ModelOpt layout before config.json carried quantization_config: the scheme in
    hf_quant_config.json beside it."""
    shutil.copytree(config_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    doc = {
        "producer": {"name": "modelopt", "version": "0.23.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                         "exclude_modules": exclude},
    }  # fmt: skip
    (folder / "hf_quant_config.json").write_text(json.dumps(doc))
    return folder


@pytest.mark.float_sensitive
def test_hf_quant_config_json_is_read_when_config_json_has_none(quantized, tmp_path):
    """plan counts the same bytes from hf_quant_config.json as from quantization_config;
    convert carries the file to the output, which verifies and generates the twin's ids."""
    legacy = _legacy_modelopt(
        EXAMPLES / "llama-3.1-8b-instruct-nvfp4", tmp_path / "plan", ["lm_head"]
    )
    assert _plan_total(legacy) == _plan_total(EXAMPLES / "llama-3.1-8b-instruct-nvfp4")
    src, twin = quantized("nvfp4_modelopt")
    exclude = SCHEMES["nvfp4_modelopt"]["exclude_modules"]
    legacy = _legacy_modelopt(src, tmp_path / "src", exclude)
    convert_model(str(legacy), tmp_path / "out", build_recipe(tp=2))
    assert (tmp_path / "out" / "hf_quant_config.json").read_bytes() == (
        legacy / "hf_quant_config.json"
    ).read_bytes()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"]["kind"] == "nvfp4"
    from reshard.runtime.generate import generate_greedy
    from reshard.runtime.load import load_source_model

    prompt = [7, 3, 99, 12, 40]
    ours = generate_greedy(load_source_model(legacy, dtype="float32"), [prompt], NEW_TOKENS)
    assert ours[0].tokens == twin_generate(twin, prompt)


def test_a_broken_hf_quant_config_json_is_refused_naming_it(tmp_path):
    folder = _legacy_modelopt(EXAMPLES / "llama-3.1-8b-instruct-nvfp4", tmp_path / "m", [])
    (folder / "hf_quant_config.json").write_text('["NVFP4"]')
    result = cli("plan", folder)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: {folder / 'hf_quant_config.json'}: hf_quant_config.json is a JSON list, not "
        "an object. Re-download hf_quant_config.json."
    )


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16_channel", "nvfp4_ct", "nvfp4_modelopt"])
def test_reference_memory_counts_packed_values_unpacked(quantized, scheme):
    """The auto reference choice sizes the dequantized model: weight_packed holds 32/bits
    values an int32 (8 for int4, 4 for int8), an NVFP4 byte 2; scales and shapes are kept."""
    from reshard.runtime.streamed import source_bytes

    src, twin = quantized(scheme)
    side_leaves = ("weight_scale", "weight_shape", "weight_scale_2", "input_scale",
                   "weight_global_scale", "input_global_scale")  # fmt: skip
    stored = load_source(src)
    side = sum(t.numel() for n, t in stored.items() if n.rpartition(".")[2] in side_leaves)
    weights = sum(t.numel() for t in twin.state_dict().values())
    assert source_bytes(src, torch.float32) == 4 * (weights + side)


@pytest.mark.float_sensitive
@pytest.mark.parametrize("scheme", ["w4a16_zp", "nvfp4_modelopt"])
def test_streamed_reference_dequantizes_like_the_full_one(quantized, scheme):
    """The streamed reference (one layer at a time) dequantizes each piece as the full model
    does: zero points packed along out, 0-dim global scales."""
    from reshard.runtime.generate import generate_greedy
    from reshard.runtime.load import load_source_model
    from reshard.runtime.streamed import reference_streamed

    src, _ = quantized(scheme)
    prompt = [5, 17, 3, 88, 42, 9, 61]
    ours = generate_greedy(load_source_model(src, dtype="float32"), [prompt], NEW_TOKENS)
    streamed = reference_streamed(src, ours, dtype=torch.float32)
    assert streamed[0].tokens == ours[0].tokens
    assert_close_scaled(streamed[0].logits, ours[0].logits, what=f"{scheme} streamed logits")
