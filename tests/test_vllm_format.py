"""`reshard convert --format vllm`, checked without vLLM: every file's keys, shapes and dtypes
against what vLLM 0.32's own loader expects (tests/golden/vllm/, recorded from the loader by
scripts/vllm_golden.py), every stacked tensor against the source bytes read with safetensors,
every verify tier, export and re-layout back to the source bytes, and each refusal by its text.
tests/test_vllm_engine.py then has vLLM's CPU build load and run the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from quant_fixtures import write_quantized  # noqa: E402
from vllm_models import write_model  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.convert import convert_model  # noqa: E402
from reshard.errors import LayoutError  # noqa: E402
from reshard.export import export_output  # noqa: E402
from reshard.io.manifest import read_manifest  # noqa: E402
from reshard.layout.formats.vllm import VERSIONS  # noqa: E402
from reshard.layout.formats.vllm_check import check_vllm_layout, check_vllm_plan  # noqa: E402
from reshard.layout.formats.vllm_serve import vllm_even_split  # noqa: E402
from reshard.layout.plan import Layout, Stage  # noqa: E402
from reshard.layout.recipe import build_recipe  # noqa: E402
from reshard.models import FAMILIES  # noqa: E402
from reshard.models.hparams import parse_hparams  # noqa: E402
from reshard.verify.levels import verify_output  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "vllm"
DTYPES = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> source folder, each written once."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = write_model(tmp_path_factory.mktemp(name), name)
        return cache[name]

    return get


def convert_vllm(src: Path, out: Path, **layout) -> Path:
    convert_model(str(src), out, build_recipe(format="vllm", **layout))
    return out


def golden_layout(doc: dict) -> dict:
    lay = doc["layout"]
    return dict(tp=lay["tp"], pp=lay["pp"], ep=lay["tp"] if lay["ep"] else 1)


def rank_files(out: Path, pp_rank: int, tp_rank: int, pp: int) -> list[Path]:
    stem = f"model-rank-{tp_rank}" if pp == 1 else f"model-pp-{pp_rank}-tp-{tp_rank}"
    return sorted(out.glob(f"{stem}-part-*.safetensors"))


def file_keys(paths: list[Path]) -> dict[str, list]:
    keys = {}
    for path in paths:
        with safe_open(path, "pt") as f:
            for k in f.keys():  # noqa: SIM118
                view = f.get_slice(k)
                keys[k] = [list(view.get_shape()), DTYPES[view.get_dtype()]]
    return keys


def read_all(paths) -> dict[str, torch.Tensor]:
    out = {}
    for path in paths:
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


# --- names, shapes and dtypes: vLLM's own list ------------------------------------------------


@pytest.mark.parametrize("golden", sorted(p.name for p in GOLDEN.glob("*.json")))
def test_files_hold_exactly_what_vllms_loader_expects(models, tmp_path, golden):
    doc = json.loads((GOLDEN / golden).read_text())
    assert doc["vllm"].startswith(VERSIONS[-1])
    name = golden.split("-tp")[0]
    layout = golden_layout(doc)
    out = convert_vllm(models(name), tmp_path / "out", **layout)
    for rank, expected in doc["ranks"].items():
        pp_rank, tp_rank = (int(part[2:]) for part in rank.split("-"))
        got = file_keys(rank_files(out, pp_rank, tp_rank, layout["pp"]))
        assert got == expected, (rank, sorted(set(got) ^ set(expected)))
    written = {p.name for p in out.glob("model-*.safetensors")}
    assert len(written) == len(doc["ranks"])  # no file vLLM would not read


def test_every_family_that_claims_vllm_has_a_golden_key_list():
    goldens = {json.loads(p.read_text())["architecture"] for p in GOLDEN.glob("*-tp2.json")}
    for family in FAMILIES:
        if "vllm" in family.formats:
            assert set(family.architectures) & goldens, family.name


# --- bytes: each stacked tensor is its native pieces ------------------------------------------


def test_llama_qkv_gate_up_vocab_and_scales_are_the_source_bytes(models, tmp_path):
    """kv 1 < tp 2: both ranks hold kv head 0; vocab 101 -> 128, rank 1 holds rows 64..100."""
    src = read_all(models("llama").glob("*.safetensors"))
    out = convert_vllm(models("llama"), tmp_path / "out", tp=2)
    for r in (0, 1):
        got = read_all(rank_files(out, 0, r, 1))
        layer = "model.layers.2"
        q = src[f"{layer}.self_attn.q_proj.weight"][r * 64 : (r + 1) * 64]
        k, v = src[f"{layer}.self_attn.k_proj.weight"], src[f"{layer}.self_attn.v_proj.weight"]
        assert same_bytes(got[f"{layer}.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
        gate = src[f"{layer}.mlp.gate_proj.weight"][r * 128 : (r + 1) * 128]
        up = src[f"{layer}.mlp.up_proj.weight"][r * 128 : (r + 1) * 128]
        assert same_bytes(got[f"{layer}.mlp.gate_up_proj.weight"], torch.cat([gate, up]))
        o = src[f"{layer}.self_attn.o_proj.weight"][:, r * 64 : (r + 1) * 64]
        assert same_bytes(got[f"{layer}.self_attn.o_proj.weight"], o.contiguous())
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = src[name][r * 64 : (r + 1) * 64]
            padded = torch.cat([rows, torch.zeros(64 - len(rows), 128, dtype=rows.dtype)])
            assert same_bytes(got[name], padded), name
        for scale in ("_k_scale", "_v_scale", "_q_scale", "_prob_scale"):
            value = got[f"{layer}.self_attn.attn.{scale}"]
            assert value.dtype == torch.float32 and value.shape == () and value.item() == 1.0


def test_tied_head_is_written_once_as_lm_head(models, tmp_path):
    src = read_all(models("qwen2").glob("*.safetensors"))
    assert "lm_head.weight" not in src  # tied: the source stores the embedding only
    one = read_all(rank_files(convert_vllm(models("qwen2"), tmp_path / "pp1", tp=2), 0, 1, 1))
    assert "model.embed_tokens.weight" not in one
    assert same_bytes(one["lm_head.weight"][:37], src["model.embed_tokens.weight"][64:])
    two = convert_vllm(models("qwen2"), tmp_path / "pp2", tp=2, pp=2)
    first, last = read_all(rank_files(two, 0, 0, 2)), read_all(rank_files(two, 1, 0, 2))
    assert "lm_head.weight" not in first and "model.embed_tokens.weight" not in last
    embed = src["model.embed_tokens.weight"][:64]
    assert same_bytes(first["model.embed_tokens.weight"], embed)
    assert same_bytes(last["lm_head.weight"], embed)


@pytest.mark.parametrize("ep", [1, 2])
def test_experts_stack_as_w13_and_w2(models, tmp_path, ep):
    """ep 1: every expert, each split 2 ways ([gate_r; up_r]); ep 2: whole experts, rank r
    holds experts 2r, 2r + 1 (vLLM's linear placement)."""
    src = read_all(models("qwen2_moe").glob("*.safetensors"))
    out = convert_vllm(models("qwen2_moe"), tmp_path / "out", tp=2, ep=ep)
    layer, inter = "model.layers.1.mlp", 64
    for r in (0, 1):
        got = read_all(rank_files(out, 0, r, 1))
        experts = range(4) if ep == 1 else range(2 * r, 2 * r + 2)
        rows = slice(r * 32, (r + 1) * 32) if ep == 1 else slice(0, inter)
        w13 = torch.stack(
            [
                torch.cat(
                    [
                        src[f"{layer}.experts.{e}.gate_proj.weight"][rows],
                        src[f"{layer}.experts.{e}.up_proj.weight"][rows],
                    ]
                )
                for e in experts
            ]
        )
        w2 = torch.stack([src[f"{layer}.experts.{e}.down_proj.weight"][:, rows] for e in experts])
        assert same_bytes(got[f"{layer}.experts.routed_experts.w13_weight"], w13)
        assert same_bytes(got[f"{layer}.experts.routed_experts.w2_weight"], w2.contiguous())
        assert same_bytes(got[f"{layer}.gate.weight"], src[f"{layer}.gate.weight"])


@pytest.mark.parametrize("ep", [1, 2])
def test_gpt_oss_experts_are_transposed_and_w2_bias_is_on_rank_0(models, tmp_path, ep):
    """vLLM's gpt-oss holds each rank's experts [E, out, in] (w13's rows keep gate and up
    interleaved), w13's bias with them, and adds w2's bias on an expert's first TP rank only:
    ep 1 splits every expert 2 ways (rank 1's w2_bias all zeros); ep 2 gives each rank two
    whole experts, with their biases. Sinks split with the heads."""
    src = read_all(models("gpt_oss").glob("*.safetensors"))
    out = convert_vllm(models("gpt_oss"), tmp_path / "out", tp=2, ep=ep)
    layer, inter, heads = "model.layers.1", 64, 4
    assert src[f"{layer}.mlp.experts.down_proj_bias"].abs().min() > 0  # zeros would hide it
    for r in (0, 1):
        got = read_all(rank_files(out, 0, r, 1))
        experts = slice(None) if ep == 1 else slice(2 * r, 2 * r + 2)
        cols = slice(r * inter, (r + 1) * inter) if ep == 1 else slice(None)  # 2*I per rank
        rows = slice(r * inter // 2, (r + 1) * inter // 2) if ep == 1 else slice(None)
        moe = f"{layer}.mlp.experts"
        gate_up = src[f"{moe}.gate_up_proj"][experts][:, :, cols]
        down = src[f"{moe}.down_proj"][experts][:, rows]
        want = {
            "routed_experts.w13_weight": gate_up.transpose(1, 2).contiguous(),
            "routed_experts.w13_bias": src[f"{moe}.gate_up_proj_bias"][experts][:, cols],
            "routed_experts.w2_weight": down.transpose(1, 2).contiguous(),
            "routed_experts.w2_bias": src[f"{moe}.down_proj_bias"][experts],
        }
        if ep == 1 and r == 1:
            want["routed_experts.w2_bias"] = torch.zeros_like(want["routed_experts.w2_bias"])
        for key, tensor in want.items():
            assert same_bytes(got[f"{moe}.{key}"], tensor.contiguous()), (r, key)
        sinks = src[f"{layer}.self_attn.sinks"][r * heads // 2 : (r + 1) * heads // 2]
        assert same_bytes(got[f"{layer}.attn.sinks"], sinks)
        assert same_bytes(got[f"{layer}.mlp.router.bias"], src[f"{layer}.mlp.router.bias"])
    manifest = read_manifest(out).doc
    entry = manifest["ranks"][1]["tensors"]
    w13 = entry["model.layers.0.mlp.experts.routed_experts.w13_weight"]
    assert w13["transposed"] is True and w13["shape"] == (
        [4, 64, 128] if ep == 1 else [2, 128, 128]
    )
    w2_bias = entry["model.layers.0.mlp.experts.routed_experts.w2_bias"]
    if ep == 1:
        assert (w2_bias["pieces"], w2_bias["fill"]) == ([], 0.0)
        assert w2_bias["parts"][0]["name"] == "model.layers.0.mlp.experts.down_proj_bias"
    else:
        assert "fill" not in w2_bias  # rank 1's own experts 2 and 3, real on each rank
        assert [p["start"][0] for p in w2_bias["pieces"]] == [2, 3]


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_gpt_oss_in_tiny_bands_is_byte_identical(models, tmp_path, monkeypatch, dtype):
    """Transposed experts move in bands of at most the writer's buffer (io/transposed.py): a
    1000-byte buffer (one stored row a band) writes the same bytes, casts included; a
    re-layout and an export read them back in such bands, and the weights tier compares in
    1000-byte bands too."""
    from reshard.io import writer
    from reshard.verify import weights

    cast = {"dtype": dtype} if dtype else {}
    whole = convert_vllm(models("gpt_oss"), tmp_path / "whole", tp=2, **cast)
    monkeypatch.setattr(writer, "buffer_bytes", lambda workers: 1000)
    monkeypatch.setattr(weights, "WINDOW", 1000)
    banded = convert_vllm(models("gpt_oss"), tmp_path / "banded", tp=2, **cast)
    again = convert_vllm(whole, tmp_path / "again", tp=2)  # a re-layout to the same files
    for path in sorted(whole.glob("model-*.safetensors")):
        assert (banded / path.name).read_bytes() == path.read_bytes(), path.name
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    for out in (banded, again):
        passed, results = verify_output(out, levels=("weights",))
        assert passed, [r.details for r in results]
    export_output(whole, tmp_path / "hf")
    source = read_all(models("gpt_oss").glob("*.safetensors"))
    exported = read_all((tmp_path / "hf").glob("*.safetensors"))
    for key, tensor in source.items():
        assert same_bytes(exported[key], tensor.to(exported[key].dtype)), key


def test_mla_stacks_q_a_and_kv_a(models, tmp_path):
    src = read_all(models("deepseek_v3").glob("*.safetensors"))
    out = convert_vllm(models("deepseek_v3"), tmp_path / "out", tp=2)
    got = read_all(rank_files(out, 0, 1, 1))
    attn = "model.layers.1.self_attn"
    fused = torch.cat([src[f"{attn}.q_a_proj.weight"], src[f"{attn}.kv_a_proj_with_mqa.weight"]])
    assert same_bytes(got[f"{attn}.fused_qkv_a_proj.weight"], fused)


def test_qwen3_5_deltanet_inputs_stack_as_qkvz_and_ba(models, tmp_path):
    """Qwen3.5 stores the DeltaNet inputs apart; vLLM's in_proj_qkvz is each rank's
    [q_r; k_r; v_r; z_r] and in_proj_ba [b_r; a_r] (whole key-head groups, 2 value heads
    each), conv1d's channels [q_r; k_r; v_r], and A_log in float32."""
    src = read_all(models("qwen3_5_moe").glob("*.safetensors"))
    out = convert_vllm(models("qwen3_5_moe"), tmp_path / "out", tp=2)
    lin = "model.layers.2.linear_attn"
    key, value = 2 * 128, 4 * 128  # 2 key heads, 4 value heads, head dims 128
    qkv, conv = src[f"{lin}.in_proj_qkv.weight"], src[f"{lin}.conv1d.weight"]

    def mine(t, r, half=key // 2, vhalf=value // 2):  # rank r's q, k, v channels
        q = t[r * half : (r + 1) * half]
        k = t[key + r * half : key + (r + 1) * half]
        v = t[2 * key + r * vhalf : 2 * key + (r + 1) * vhalf]
        return torch.cat([q, k, v])

    for r in (0, 1):
        got = read_all(rank_files(out, 0, r, 1))
        z = src[f"{lin}.in_proj_z.weight"][r * 256 : (r + 1) * 256]
        assert same_bytes(got[f"{lin}.in_proj_qkvz.weight"], torch.cat([mine(qkv, r), z]))
        b = src[f"{lin}.in_proj_b.weight"][2 * r : 2 * r + 2]
        a = src[f"{lin}.in_proj_a.weight"][2 * r : 2 * r + 2]
        assert same_bytes(got[f"{lin}.in_proj_ba.weight"], torch.cat([b, a]))
        assert same_bytes(got[f"{lin}.conv1d.weight"], mine(conv, r))
        a_log = src[f"{lin}.A_log"][2 * r : 2 * r + 2]
        assert got[f"{lin}.A_log"].dtype == torch.float32
        assert torch.equal(got[f"{lin}.A_log"], a_log.float())


def test_sigmoid_routers_are_written_in_float32(models, tmp_path):
    """GLM-4.5's and MiniMax-M2's routers run in fp32 in vLLM: weight and correction bias are
    the checkpoint's bf16 values, exactly, as F32; GLM's bias moves to the routed experts."""
    for name, moe, bias_to in (
        ("glm4_moe", "model.layers.1.mlp", "experts.routed_experts.e_score_correction_bias"),
        ("minimax_m2", "model.layers.1.block_sparse_moe", "e_score_correction_bias"),
    ):
        src = read_all(models(name).glob("*.safetensors"))
        got = read_all(rank_files(convert_vllm(models(name), tmp_path / name, tp=2), 0, 1, 1))
        bias_from = "gate." * (name == "glm4_moe") + "e_score_correction_bias"
        for ours, theirs in (("gate.weight", "gate.weight"), (bias_to, bias_from)):
            assert got[f"{moe}.{ours}"].dtype == torch.float32, (name, ours)
            assert torch.equal(got[f"{moe}.{ours}"], src[f"{moe}.{theirs}"].float()), (name, ours)


def test_one_worker_and_two_write_the_same_bytes(models, tmp_path):
    """Stacked tensors take bytes from several source tensors, copied by several threads."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out, workers in ((a, 1), (b, 2)):
        convert_model(
            str(models("qwen2_moe")), out, build_recipe(format="vllm", tp=2), workers=workers
        )
    for path in sorted(a.glob("model-*.safetensors")):
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


# --- every verify tier, export and re-layout -------------------------------------------------


@pytest.mark.parametrize(
    "name,layout",
    [
        ("llama", dict(tp=2)),
        ("qwen2", dict(tp=2, pp=2)),
        ("qwen2_moe", dict(tp=2, ep=2)),
        ("gpt_oss", dict(tp=2, pp=2)),
        ("gpt_oss", dict(tp=2, ep=2)),
    ],
)
def test_every_verify_tier_passes_on_a_vllm_output(models, tmp_path, name, layout):
    out = convert_vllm(models(name), tmp_path / "out", **layout)
    passed, results = verify_output(out, levels=("hashes", "weights", "generate"))
    assert [(r.level, r.passed) for r in results] == [
        ("hashes", True),
        ("weights", True),
        ("generate", True),
    ], [r.details for r in results]
    assert passed


@pytest.mark.parametrize(
    "name,ep", [("qwen2_moe", 2), ("deepseek_v3", 2), ("qwen2", 1), ("gpt_oss", 1)]
)
def test_export_of_a_vllm_output_gives_back_the_source_bytes(models, tmp_path, name, ep):
    out = convert_vllm(models(name), tmp_path / "out", tp=2, ep=ep)
    export_output(out, tmp_path / "hf")
    source = read_all(models(name).glob("*.safetensors"))
    exported = read_all((tmp_path / "hf").glob("*.safetensors"))
    assert set(exported) == set(source)
    for key, tensor in source.items():
        if key.endswith("e_score_correction_bias"):  # vLLM's fp32 parameter: an exact cast
            assert same_bytes(exported[key], tensor.float()), key
            continue
        assert same_bytes(exported[key], tensor), key


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_a_vllm_output_relayouts_to_native_and_back_to_vllm(models, tmp_path, name):
    """gpt-oss: its transposed experts are read back untransposed, and written transposed
    again from a native source; the weights tier compares both against their sources."""
    vllm_out = convert_vllm(models(name), tmp_path / "vllm", tp=2)
    native = tmp_path / "native"
    convert_model(str(vllm_out), native, build_recipe(tp=1))
    src = read_all(models(name).glob("*.safetensors"))
    assert all(
        same_bytes(t, src[k]) for k, t in read_all([native / "rank-00000.safetensors"]).items()
    )
    again = convert_vllm(native, tmp_path / "again", tp=2)
    for path in sorted(vllm_out.glob("model-*.safetensors")):
        assert read_all([path]).keys() == read_all([again / path.name]).keys()
        for k, t in read_all([path]).items():
            assert same_bytes(read_all([again / path.name])[k], t), k
    for out in (native, again):  # each against the output it was read from
        passed, results = verify_output(out, levels=("weights",))
        assert passed, [r.details for r in results]


def test_the_manifest_records_the_format_and_each_stacked_part(models, tmp_path):
    out = convert_vllm(models("llama"), tmp_path / "out", tp=2)
    manifest = read_manifest(out).doc
    assert manifest["layout"]["format"] == {"name": "vllm", "vllm_version": "0.32"}
    assert manifest["layout"]["vocab_padded"] == 128
    qkv = manifest["ranks"][1]["tensors"]["model.layers.0.self_attn.qkv_proj.weight"]
    assert [(p["name"], p["shape"], p["at"]) for p in qkv["parts"]] == [
        ("model.layers.0.self_attn.q_proj.weight", [64, 128], [0, 0]),
        ("model.layers.0.self_attn.k_proj.weight", [32, 128], [64, 0]),
        ("model.layers.0.self_attn.v_proj.weight", [32, 128], [96, 0]),
    ]
    assert [(p["source"], p["start"], p["dest"]) for p in qkv["pieces"]] == [
        ("model.layers.0.self_attn.q_proj.weight", [64, 0], [0, 0]),
        ("model.layers.0.self_attn.k_proj.weight", [0, 0], [64, 0]),
        ("model.layers.0.self_attn.v_proj.weight", [0, 0], [96, 0]),
    ]
    scale = manifest["ranks"][0]["tensors"]["model.layers.0.self_attn.attn._k_scale"]
    assert scale["fill"] == 1.0 and scale["pieces"] == [] and scale["shape"] == []


# --- the launch ----------------------------------------------------------------------------


def test_serve_script_and_the_printed_command(models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "convert",
            str(models("llama")),
            "--tp",
            "2",
            "--format",
            "vllm",
            "-o",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"vllm serve {out} --load-format sharded_state --tensor-parallel-size 2" in result.output
    script = (out / "vllm-serve.sh").read_text()
    assert (
        'exec vllm serve "$HERE" --load-format sharded_state --tensor-parallel-size 2 "$@"'
        in script
    )
    assert "VLLM_PP_LAYER_PARTITION" not in script


def test_serve_script_sets_the_partition_when_stages_differ_from_vllms_split(models, tmp_path):
    even = convert_vllm(models("llama"), tmp_path / "even", tp=2, pp=2)
    assert "VLLM_PP_LAYER_PARTITION" not in (even / "vllm-serve.sh").read_text()
    uneven = convert_vllm(models("llama"), tmp_path / "uneven", tp=2, pp=2, stages=((0, 0), (1, 3)))
    script = (uneven / "vllm-serve.sh").read_text()
    assert "export VLLM_PP_LAYER_PARTITION=1,3\n" in script
    assert "--tensor-parallel-size 2 --pipeline-parallel-size 2" in script


@pytest.mark.parametrize(
    "layers,pp,sizes", [(4, 2, [2, 2]), (5, 2, [3, 2]), (10, 4, [2, 3, 3, 2]), (7, 4, [2, 2, 2, 1])]
)
def test_vllms_even_split(layers, pp, sizes):
    """vllm.distributed.utils.get_pp_indices: the remainder goes to the stages before the last,
    last-but-one first."""
    assert vllm_even_split(layers, pp) == sizes


# --- refusals, before any write -------------------------------------------------------------


def refuse(args: list[str], out: Path) -> str:
    result = CliRunner().invoke(main, ["convert", *args, "--format", "vllm", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert not out.exists()  # refused before OUT was made
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_an_unimplemented_vllm_version_is_refused(models, tmp_path):
    line = refuse([str(models("llama")), "--tp", "2", "--vllm-version", "0.31"], tmp_path / "o")
    assert "--vllm-version 0.31" in line and "vLLM 0.32 only" in line and "--format native" in line


def test_a_quantized_checkpoint_is_refused(tmp_path):
    src, _ = write_quantized(tmp_path / "src", "fp8_block")
    line = refuse([str(src), "--tp", "2"], tmp_path / "o")
    assert "is quantized (fp8_block)" in line and "--format native" in line


def test_dp_with_moe_is_refused(models, tmp_path):
    line = refuse([str(models("qwen2_moe")), "--tp", "2", "--dp", "2"], tmp_path / "o")
    assert "dp=2" in line and "file names carry no DP rank" in line


def test_ep_smaller_than_tp_is_refused(models, tmp_path):
    line = refuse([str(models("qwen2_moe")), "--tp", "4", "--ep", "2"], tmp_path / "o")
    assert "ep=2, tp=4" in line and "Use --ep 4" in line


def test_redundant_experts_are_refused(models, tmp_path):
    args = [str(models("qwen2_moe")), "--tp", "2", "--ep", "2", "--redundant", "2"]
    line = refuse(args, tmp_path / "o")
    assert "redundant experts" in line and "vLLM builds its own expert map" in line


def test_a_non_contiguous_placement_is_refused(models, tmp_path):
    args = [str(models("qwen2_moe")), "--tp", "2", "--ep", "2", "--placement", "round_robin"]
    line = refuse(args, tmp_path / "o")
    assert "not placed contiguously" in line and "--placement contiguous" in line


def test_keep_mtp_is_refused(models, tmp_path):
    line = refuse([str(models("deepseek_v3")), "--tp", "2", "--keep-mtp"], tmp_path / "o")
    assert "--keep-mtp" in line and "draft model" in line


def test_a_stage_without_layers_is_refused():
    """The cost solver may leave a stage with the head alone; vLLM cannot."""
    stages = (Stage(0, 0, 3, True, False), Stage(1, 4, 3, False, True))
    layout = Layout(2, 2, 1, 1, stages, 101, 128, "keep", format="vllm", format_version="0.32")
    with pytest.raises(LayoutError, match="stage 1 has no decoder layer; vLLM gives every"):
        check_vllm_plan(layout, {})


def hp_of(**overrides):
    config = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 384, "intermediate_size": 768,
        "num_hidden_layers": 2, "num_attention_heads": 12, "num_key_value_heads": 6,
        "vocab_size": 101, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    return parse_hparams({**config, **overrides}, where="config.json")


def test_a_tp_that_does_not_divide_vllms_padded_vocab_is_refused():
    """12 heads split 6 ways, but vLLM's vocab of 128 rows does not."""
    with pytest.raises(LayoutError, match=r"multiple of 64 \(128\).*tp=6 cannot"):
        check_vllm_layout(hp_of(), build_recipe(tp=6, format="vllm"), VERSIONS)


def test_a_family_without_vllm_names_is_refused(monkeypatch):
    import reshard.layout.formats.vllm_check as vllm_check

    family = vllm_check.family_of(hp_of())
    monkeypatch.setattr(
        vllm_check,
        "family_of",
        lambda hp: type(family)(**{**family.__dict__, "formats": ("native",)}),
    )
    with pytest.raises(LayoutError, match="does not yet write LlamaForCausalLM in vLLM 0.32"):
        check_vllm_layout(hp_of(), build_recipe(tp=2, format="vllm"), VERSIONS)


def test_an_unknown_format_is_refused_by_the_cli(models, tmp_path):
    result = CliRunner().invoke(
        main, ["convert", str(models("llama")), "--format", "sglang", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "'sglang' is not one of 'native', 'vllm'" in result.output


def test_a_recipe_can_ask_for_the_vllm_format(models, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[layout]\ntp = 2\n[output]\nformat = "vllm"\nvllm_version = "0.32"\n')
    out = tmp_path / "out"
    convert_model(str(models("llama")), out, build_recipe(recipe))
    assert sorted(p.name for p in out.glob("model-*")) == [
        "model-rank-0-part-0.safetensors",
        "model-rank-1-part-0.safetensors",
    ]


def test_an_untied_head_vllm_would_drop_is_refused(tmp_path):
    """vLLM's Gemma-2 always ties its head: a checkpoint with its own lm_head cannot load."""
    from checkpoints import write_checkpoint
    from vllm_models import DENSE

    src = write_checkpoint(tmp_path / "src", "Gemma2ForCausalLM", **DENSE)  # untied
    line = refuse([str(src), "--tp", "2"], tmp_path / "o")
    assert "keeps one tensor as 'model.embed_tokens.weight'" in line
    assert "lm_head.weight and model.embed_tokens.weight for it" in line
    assert "--format native" in line
