"""MXFP4 (gpt-oss's released expert format) on a tiny gpt-oss quantized here: the packing is
written from the OCP MX spec and transformers' reader (32 fp4 e2m1 values a block, two a
byte, low nibble first; one e8m0 exponent a block), independently of reshard's dequantizer,
which is checked against transformers' own `convert_moe_packed_tensors`. The reference is
the dequantized fp32 twin in transformers' GptOssForCausalLM. Splits keep whole blocks and
a layout that would cut one is refused before any write, naming the tensor, the block and
the layouts that fit; plan counts the stored bytes; export gives the original bytes back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from checkpoints import config_for  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import (  # noqa: E402
    assert_all_tiers_pass,
    assert_bitwise_rebuild,
    convert,
    hf_generate,
    load_rank,
    skewed_load,
)
from test_gpt_oss import ARCH, FIXTURE, PROMPTS  # noqa: E402
from tolerances import assert_close_scaled  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.export import export_output  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.plan import load_shapes, plan_model  # noqa: E402
from reshard.runtime.dequant import dequantize_weight  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402

NEW_TOKENS = 6
WIDTH = 64  # two blocks of down_proj's input per expert: expert tp 2 keeps one each
MXFP4 = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
    ],
}  # fmt: skip
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # e2m1 magnitudes, codes 0..7
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] float -> blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32].
    Scale 2**(floor(log2 amax) - 2) puts the block's largest value in fp4's top binade
    (max 6 = 1.5 x 2**2); each value rounds to the nearest e2m1 magnitude."""
    rows = w.transpose(1, 2).float()  # [E, out, in]
    blocks = rows.reshape(*rows.shape[:2], -1, 32)  # [E, out, G, 32]
    amax = blocks.abs().amax(-1).clamp(min=2.0**-100)
    exponent = torch.floor(torch.log2(amax)) - 2  # [E, out, G]
    scaled = blocks / torch.exp2(exponent)[..., None]
    codes = (scaled.abs()[..., None] - FP4).abs().argmin(-1)  # nearest magnitude, 0..7
    codes = codes | ((scaled < 0).long() << 3)  # bit 3: the sign
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # low nibble first
    return packed, (exponent + 127).to(torch.uint8)


def write_mxfp4(path: Path) -> object:
    """Save the quantized checkpoint; return the fp32 transformers twin holding the values
    transformers' own MXFP4 reader gives."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    config = config_for(ARCH, **{**FIXTURE, "intermediate_size": WIDTH})
    model = transformers.GptOssForCausalLM(config).eval()
    stored = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("sinks", "bias")):
                param.copy_(torch.randn_like(param))
        for name, param in model.state_dict().items():
            if name.endswith(EXPERT_WEIGHTS):
                blocks, scales = quantize_mxfp4(param)
                stored[f"{name}_blocks"], stored[f"{name}_scales"] = blocks, scales
                twin = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                param.copy_(twin)
            else:
                stored[name] = param.detach().clone().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(stored, path / "model.safetensors", metadata={"format": "pt"})
    config_json = {**config.to_dict(), "dtype": "float32", "quantization_config": MXFP4}
    (path / "config.json").write_text(json.dumps(config_json))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("gpt-oss-mxfp4") / "src"
    return path, write_mxfp4(path)


@pytest.mark.float_sensitive
def test_dequantizer_equals_transformers_reader(mxfp4):
    """reshard's runtime dequantization of every expert weight, bitwise against
    transformers' convert_moe_packed_tensors; the fixture uses the whole e2m1 range."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path, _ = mxfp4
    tensors = load_file(path / "model.safetensors")
    for name in (n for n in tensors if n.endswith("_blocks")):
        base = name.removesuffix("_blocks")
        blocks, scales = tensors[name], tensors[f"{base}_scales"]
        ours = dequantize_weight(_scheme(), {"mx_blocks": blocks, "mx_scales": scales})
        assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    codes = torch.cat([(tensors[n] & 15).flatten() for n in tensors if n.endswith("_blocks")])
    assert set(codes.tolist()) == set(range(16))


def _scheme():
    from reshard.quant import QuantScheme

    return QuantScheme("mxfp4")


@pytest.mark.float_sensitive
def test_world_one_matches_the_dequantized_twin(mxfp4):
    path, twin = mxfp4
    model = load_source_model(path)
    for prompt, got in zip(PROMPTS, forward_logits(model, PROMPTS), strict=True):
        with torch.no_grad():
            expected = twin(torch.tensor([prompt])).logits[0]
        assert_close_scaled(got, expected, what=f"prompt len {len(prompt)}")
    expected_ids = [hf_generate(twin, p, NEW_TOKENS) for p in PROMPTS]
    assert [r.tokens for r in generate_greedy(model, PROMPTS, NEW_TOKENS)] == expected_ids
    assert len({tuple(ids) for ids in expected_ids}) == len(PROMPTS)


def test_plan_counts_the_stored_bytes(mxfp4, tmp_path):
    """From config.json alone, plan's tensors are the file's names, U8 dtypes and shapes; at
    tp 2 its per-rank bytes are what convert writes."""
    path, _ = mxfp4
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        written = {
            n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in f.keys()
        }
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((path / "config.json").read_text())
    shapes = load_shapes(str(tmp_path / "cfg"))
    assert {n: (d, tuple(s)) for n, (d, s) in shapes.tensors.items()} == written
    plan = plan_model(shapes, build_recipe(tp=2))
    manifest = convert(path, tmp_path / "out", tp=2)
    for entry in manifest["ranks"]:
        on_disk = sum(
            t.numel() * t.element_size()
            for t in load_rank(tmp_path / "out", entry["rank"]).values()
        )
        assert sum(f.nbytes for f in plan.files if f.rank == entry["rank"]) == on_disk


def check_block_slices(src: Path, out: Path, manifest: dict) -> None:
    """Each rank's blocks/scales are the source's rows of its experts: gate_up's out rows
    [2 lo, 2 hi) with every block, down's whole out rows with input blocks [lo/32, hi/32)."""
    source = load_file(src / "model.safetensors")
    etp = manifest["layout"]["tp"] // manifest["layout"]["ep"]
    experts = manifest["layout"].get("experts") or {}
    for entry in manifest["ranks"]:
        shard = load_rank(out, entry["rank"])
        first, last = manifest["layout"]["stages"][entry["pp_stage"]]["layers"]
        r, ep_rank = entry["tp_rank"] % etp, entry["tp_rank"] // etp
        lo, hi = r * WIDTH // etp, (r + 1) * WIDTH // etp
        for layer in range(first, last + 1):
            ids = torch.tensor(_experts(experts, layer, ep_rank, manifest["layout"]["ep"]))
            p = f"model.layers.{layer}.mlp.experts."
            for part in ("_blocks", "_scales"):
                gate_up = source[p + "gate_up_proj" + part][ids][:, 2 * lo : 2 * hi]
                assert torch.equal(shard[p + "gate_up_proj" + part], gate_up)
                down = source[p + "down_proj" + part][ids][:, :, lo // 32 : hi // 32]
                assert torch.equal(shard[p + "down_proj" + part], down)


def _experts(experts: dict, layer: int, ep_rank: int, ep: int) -> list[int]:
    entry = experts.get("layers", {}).get(str(layer))
    if entry is None:
        per = 8 // ep
        return list(range(ep_rank * per, (ep_rank + 1) * per))
    per = entry["slots_per_rank"]
    return [e for e in entry["phy2log"][ep_rank * per : (ep_rank + 1) * per] if e >= 0]


LAYOUTS = {
    "tp2-pp2": {"tp": 2, "pp": 2},  # expert tp 2: down's two input blocks go one a rank
    "tp4-ep2-redundant": {"tp": 4, "ep": 2, "redundant": 2},
}


@pytest.mark.world
@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_sharded_mxfp4_is_bitwise_and_token_exact(mxfp4, tmp_path, case):
    path, twin = mxfp4
    recipe = dict(LAYOUTS[case])
    if recipe.get("redundant"):
        recipe["load"] = skewed_load(tmp_path / "expert_load.json", 8, [0, 1, 2, 3])
    manifest = convert(path, tmp_path / "out", **recipe)
    assert manifest["quantization"]["scheme"]["kind"] == "mxfp4"
    assert_bitwise_rebuild(path, tmp_path / "out")
    check_block_slices(path, tmp_path / "out", manifest)
    rows = assert_all_tiers_pass(tmp_path / "out", prompt_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r["sharded_ids"] for r in rows] == [hf_generate(twin, p, NEW_TOKENS) for p in PROMPTS]
    export_output(tmp_path / "out", tmp_path / "hf")
    original = load_file(path / "model.safetensors")
    back = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_layout_that_cuts_a_block_is_refused_before_any_write(mxfp4, tmp_path):
    """Expert tp 4 leaves 16 of down_proj's 64 input columns a rank: half a block."""
    path, _ = mxfp4
    expected = (
        "error: tp=4 does not fit GptOssForCausalLM: tensor "
        "'model.layers.0.mlp.experts.down_proj_blocks' (and every MoE layer's alike) would "
        "hold 16 of its 64 input columns per rank (split 4 ways), not a multiple of the mxfp4 "
        "block size 32; with tp=4 these fit: --ep 2 (expert tp 2), --ep 4 (expert tp 1). "
    )
    for command in (
        ["plan", str(path), "--tp", "4"],
        ["convert", str(path), "--tp", "4", "-o", str(tmp_path / "out")],
    ):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(expected), result.output
    assert not (tmp_path / "out").exists()
    assert CliRunner().invoke(main, ["plan", str(path), "--tp", "4", "--ep", "2"]).exit_code == 0


def _copy_without(src: Path, dst: Path, drop: str) -> None:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    del tensors[drop]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_blocks_without_their_scales_are_refused(mxfp4, tmp_path):
    path, _ = mxfp4
    src = tmp_path / "src"
    _copy_without(path, src, "model.layers.2.mlp.experts.down_proj_scales")
    result = CliRunner().invoke(main, ["convert", str(src), "--tp", "2", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    down = "model.layers.2.mlp.experts.down_proj"
    assert result.output == (
        f"error: {src}: quantized weight '{down}' is stored as ['{down}_blocks'], but mxfp4 "
        f"stores ['{down}_blocks', '{down}_scales']. The checkpoint and its "
        "quantization_config disagree.\n"
    )
    assert not (tmp_path / "o").exists()


def test_blocks_without_a_quantization_config_are_refused(mxfp4, tmp_path):
    path, _ = mxfp4
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").symlink_to(path / "model.safetensors")
    result = CliRunner().invoke(main, ["plan", str(src), "--tp", "2"])
    assert result.exit_code == 2, result.output
    assert "model.layers.0.mlp.experts.down_proj_blocks" in result.output
    assert "are quantized but config.json has no quantization_config" in result.output


def test_a_piece_that_cuts_a_block_is_refused_at_slicing_time():
    """The per-tensor guard behind split_problems: input columns 16:32 of down_proj."""
    from reshard.errors import LayoutError
    from reshard.layout.plan import Piece
    from reshard.models.family import Rule
    from reshard.models.rules import TensorRole
    from reshard.quant import mxfp4

    down = "model.layers.0.mlp.experts.down_proj"
    rule = Rule("model.layers.{layer}.mlp.experts.down_proj", "stacked_expert", "moe")
    role = TensorRole(f"{down}_blocks", rule, 0, None, "mx_blocks", down)
    piece = Piece(role.name, (0, 16, 0), (1, 32, 64), (0, 0, 0))
    with pytest.raises(LayoutError) as refused:
        mxfp4.stored_pieces(role, (piece,), (8, 64, 64), (8, 64, 2, 16))
    assert str(refused.value) == (
        f"tensor '{down}_blocks': this rank's input columns 16:32 of '{down}' (16 per rank) "
        "cut an mxfp4 block of 32. Choose an expert tp (tp/ep) that leaves a multiple of 32 "
        "per rank."
    )
    whole = Piece(role.name, (3, 32, 0), (4, 64, 64), (1, 0, 0))
    pieces, local = mxfp4.stored_pieces(role, (whole,), (8, 64, 64), (8, 64, 2, 16))
    assert pieces == (Piece(role.name, (3, 0, 1, 0), (4, 64, 2, 16), (1, 0, 0, 0)),)
    assert local == (2, 64, 1, 16)
