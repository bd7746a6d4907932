"""MiniMax-M2 against things reshard did not write: transformers' own forward and generate,
safetensors' reader on the source and on the rank files. Two gloo worlds: tp 2 x pp 2 and
tp 4 x ep 4 with redundant experts (kv heads 2 < tp 4: each k_norm slice replicated with its
kv head). Quirks switched off on purpose (q/k norms per head instead of over all heads, the
TP statistic not averaged, the selection bias ignored) fail.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from checkpoints import write_checkpoint  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from helpers import (  # noqa: E402
    GENERATE,
    assert_all_tiers_pass,
    check_moe_output,
    convert,
    hf_generate,
    hf_logits,
    skewed_load,
)
from tolerances import MODEL_ULPS, assert_close_scaled, scaled_bound  # noqa: E402

from reshard.cli import main  # noqa: E402
from reshard.errors import UnsupportedModelError  # noqa: E402
from reshard.models.hparams import load_hparams, parse_hparams  # noqa: E402
from reshard.models.shapes import synthesize_tensors  # noqa: E402
from reshard.runtime import qk_norm  # noqa: E402
from reshard.runtime.dist import Comm  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402
from reshard.runtime.moe import MoEBlock  # noqa: E402

ARCH = "MiniMaxM2ForCausalLM"
HEADS, KV, HD, HIDDEN = 4, 2, 16, 64
CONFIG = dict(
    num_hidden_layers=4, initializer_range=0.5, head_dim=HD, rotary_dim=8, num_local_experts=8,
    num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4], [1, 99]]
NEW_TOKENS = 8
ATTN = "model.layers.{}.self_attn."
LAYOUTS = {"tp2pp2": dict(tp=2, pp=2), "tp4ep4r4": dict(tp=4, ep=4, redundant=4)}


def jitter_norms(src: Path) -> None:
    """Norm weights 1 + N(0, 0.5) instead of transformers' ones: a norm cut at the wrong
    heads then changes the numbers."""
    tensors = load_file(src / "model.safetensors")
    rng = torch.Generator().manual_seed(2)
    for name in [n for n in tensors if n.endswith("norm.weight")]:
        tensors[name] = 1 + 0.5 * torch.randn(tensors[name].shape, generator=rng)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    src = write_checkpoint(tmp_path_factory.mktemp("minimax-m2"), ARCH, **CONFIG)
    jitter_norms(src)
    hf = transformers.MiniMaxM2ForCausalLM.from_pretrained(src).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return src, hf


@pytest.fixture(scope="module")
def outputs(minimax, tmp_path_factory):
    src, _ = minimax
    made = {}
    for name, recipe in LAYOUTS.items():
        out = tmp_path_factory.mktemp(name)
        if "redundant" in recipe:
            load = skewed_load(out.parent / f"{name}.json", 8, [0, 1, 2, 3])
            recipe = {**recipe, "load": load}
        made[name] = (out, convert(src, out, **recipe))
    return made


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def test_hparams_follow_the_config_class(minimax):
    src, hf = minimax
    hp = load_hparams(src)
    assert (hp.router_scoring, hp.n_group, hp.norm_topk_prob) == ("sigmoid", 1, True)
    assert hp.moe_layers == (0, 1, 2, 3) and hp.moe_intermediate_size == 96
    assert hp.rope_scaling == {"rope_type": "default", "partial_rotary_factor": 0.5}
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.5


def test_released_config_keys_read_alike():
    """The hub's config.json (transformers 4.46) says rotary_dim and scoring_func."""
    config = {"architectures": [ARCH], "hidden_size": 3072, "num_hidden_layers": 2,
              "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
              "vocab_size": 200064, "rotary_dim": 64, "rope_theta": 5000000,
              "num_local_experts": 256, "num_experts_per_tok": 8, "intermediate_size": 1536,
              "scoring_func": "sigmoid"}  # fmt: skip
    hp = parse_hparams(config)
    assert hp.rope_scaling["partial_rotary_factor"] == 0.5 and hp.rope_theta == 5e6
    assert (hp.num_experts, hp.moe_intermediate_size, hp.num_experts_per_tok) == (256, 1536, 8)
    with pytest.raises(UnsupportedModelError, match="scoring_func 'softmax'"):
        parse_hparams({**config, "scoring_func": "softmax"})


def test_config_alone_synthesizes_what_transformers_writes(minimax):
    src, _ = minimax
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        written = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    synthesized = synthesize_tensors(load_hparams(src), "F32")
    assert {n: shape for n, (_, shape) in synthesized.items()} == written


@pytest.mark.float_sensitive
def test_runtime_matches_transformers_and_generates_token_exact(minimax):
    src, hf = minimax
    model = load_source_model(src)
    for prompt, got in zip(PROMPTS, forward_logits(model, PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"prompt len {len(prompt)}")
    results = generate_greedy(model, PROMPTS, NEW_TOKENS)
    for result in results:
        assert result.tokens == hf_generate(hf, result.prompt, NEW_TOKENS), result.prompt
    assert len({t for r in results for t in r.tokens}) > 6


def _worst_error(src, hf) -> float:
    """Largest logit error over the prompts' positions, in units of the fp32 bound."""
    worst = 0.0
    for prompt, got in zip(PROMPTS, forward_logits(load_source_model(src), PROMPTS), strict=True):
        expected = hf_logits(hf, prompt)
        diff = float((got - expected).abs().max())
        worst = max(worst, diff / scaled_bound(expected, MODEL_ULPS, torch.float32))
    return worst


class PerHeadNorm(qk_norm.SpanRMSNorm):
    """The quirk switched off: each head normalised on its own."""

    def forward(self, x):
        dtype = x.dtype
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.view(x.shape[-2:]) * y.to(dtype)


def test_per_head_qk_norm_fails(minimax, monkeypatch):
    monkeypatch.setattr(qk_norm, "SpanRMSNorm", PerHeadNorm)
    assert _worst_error(*minimax) > 100


def test_ignoring_the_selection_bias_fails(minimax, monkeypatch):
    original = MoEBlock.route_grouped

    def unbiased(self, flat):
        self.get_parameter(self.bias_name).data = torch.zeros_like(
            self.get_parameter(self.bias_name)
        )
        return original(self, flat)

    monkeypatch.setattr(MoEBlock, "route_grouped", unbiased)
    assert _worst_error(*minimax) > 100


class SumComm(Comm):
    """A TP group simulated in one process: all_reduce adds the other ranks' values."""

    def __init__(self, tp: int, others: torch.Tensor | None):
        super().__init__(tp=tp)
        self.others = others

    def all_reduce(self, x):
        return x if self.others is None else x + self.others


@pytest.mark.float_sensitive
def test_tp_statistic_is_averaged_over_the_group():
    """Two ranks of one q_norm: their outputs side by side equal the whole norm's, and only
    because the mean of squares is shared (a rank's own mean gives other numbers)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, HEADS, HD) * 3  # [B, S, h, hd]
    weight = torch.randn(HEADS * HD)
    whole = qk_norm.SpanRMSNorm(HEADS * HD, 1e-6, Comm())
    whole.weight = torch.nn.Parameter(weight)
    halves = x.split(HEADS // 2, dim=2)
    squares = [h.reshape(2, 3, -1).pow(2).mean(-1, keepdim=True) for h in halves]
    parts, alone = [], []
    for r, half in enumerate(halves):
        norm = qk_norm.SpanRMSNorm(HEADS * HD // 2, 1e-6, SumComm(2, squares[1 - r]))
        norm.weight = torch.nn.Parameter(weight.view(2, -1)[r])
        parts.append(norm(half))
        norm.comm = SumComm(1, None)  # the quirk: this rank's own statistic
        alone.append(norm(half))
    assert_close_scaled(torch.cat(parts, dim=2), whole(x), ulps=8)
    with torch.no_grad():
        assert float((torch.cat(alone, dim=2) - whole(x)).abs().max()) > 0.01


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_norms_split_with_their_heads_bitwise(minimax, outputs, layout):
    """q_norm rows follow q_proj's heads; k_norm rows follow k_proj's kv head (replicated
    at tp 4, as vLLM shards it by kv head); the selection bias whole."""
    src, _ = minimax
    source = read_all(src)
    out, manifest = outputs[layout]
    tp = manifest["layout"]["tp"]
    for entry in manifest["ranks"]:
        r = entry["tp_rank"]
        tensors = {}
        for file in sorted({info["file"] for info in entry["tensors"].values()}):
            with safe_open(str(out / file), "pt") as f:
                tensors.update({n: f.get_tensor(n) for n in f.keys()})
        kv_per = HD * max(KV // tp, 1)
        first_kv = (r * KV // tp) * HD if KV < tp else r * kv_per
        kv_rows = slice(first_kv, first_kv + kv_per)
        for layer in range(4):
            p = ATTN.format(layer)
            if p + "q_norm.weight" not in tensors:
                continue
            q_rows = slice(r * HEADS * HD // tp, (r + 1) * HEADS * HD // tp)
            assert tensors[p + "q_norm.weight"].equal(source[p + "q_norm.weight"][q_rows])
            assert tensors[p + "k_norm.weight"].equal(source[p + "k_norm.weight"][kv_rows])
            assert tensors[p + "k_proj.weight"].equal(source[p + "k_proj.weight"][kv_rows])
            bias = f"model.layers.{layer}.block_sparse_moe.e_score_correction_bias"
            assert tensors[bias].equal(source[bias])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_bitwise_rebuild_exports_and_maps(minimax, outputs, layout):
    src, _ = minimax
    out, manifest = outputs[layout]
    maps = check_moe_output(src, out, manifest)
    if "redundant" in LAYOUTS[layout]:
        assert all(sum(p.logcnt) == 12 and max(p.logcnt) > 1 for p in maps.values())


@pytest.mark.world
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_verify_tier_passes_and_matches_transformers(minimax, outputs, layout):
    """One gloo world each: sharded greedy ids equal the unsharded runtime's (logits within
    verify's fp32 bound) and transformers' own generate."""
    _, hf = minimax
    rows = assert_all_tiers_pass(outputs[layout][0], **GENERATE)
    for row in rows:
        want = hf_generate(hf, row["prompt_ids"], NEW_TOKENS)
        assert row["sharded_ids"] == want, row["prompt_ids"]


# --- plan on the released config (examples/configs) -----------------------------------------

EXAMPLE = Path(__file__).parent.parent / "examples/configs/minimax-m2"


def test_example_weights_in_their_stored_dtypes():
    """MiniMax-M2 as released: every attention and expert matrix FP8 (1 byte) with an F32
    scale per 128 x 128 block; embeddings, lm_head, norms, routers and biases BF16."""
    from reshard.layout.memory.model import kv_bytes_per_token

    hp = load_hparams(EXAMPLE)
    h, v, layers, experts = 3072, 200064, 62, 256
    blocks = lambda rows, cols: -(-rows // 128) * -(-cols // 128)  # noqa: E731
    matrices = [(6144, h), (1024, h), (1024, h), (h, 6144)] + [(1536, h), (1536, h), (h, 1536)] * (
        experts
    )
    fp8 = sum(r * c + 4 * blocks(r, c) for r, c in matrices)
    bf16 = 2 * (6144 + 1024 + 2 * h + experts * h + experts)  # norms, router, bias
    total = 2 * 2 * v * h + 2 * h + layers * (fp8 + bf16)
    written = sum(
        {"F8_E4M3": 1, "F32": 4, "BF16": 2}[dtype] * math.prod(shape)
        for dtype, shape in synthesize_tensors(hp).values()
    )
    assert written == total == 230_024_081_408  # 229B parameters
    assert kv_bytes_per_token(hp, range(layers), 1, 2) == layers * 8 * 128 * 2 * 2


def test_example_tp8_needs_ep_for_whole_fp8_blocks():
    result = CliRunner().invoke(main, ["plan", str(EXAMPLE), "--tp", "8"])
    assert result.exit_code == 2, result.output
    assert (
        "tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' (and w3 alike) would "
        "hold 192 of its 1536 rows per rank (split 8 ways), not a multiple of the fp8_block "
        "block size 128; with tp=8 these fit: --ep 2 (expert tp 4), --ep 4 (expert tp 2), "
        "--ep 8 (expert tp 1)" in result.output
    )
    result = CliRunner().invoke(main, ["plan", str(EXAMPLE), "--tp", "8", "--ep", "8"])
    assert result.exit_code == 0, result.output
    assert "230.71 GB written in all" in result.output
