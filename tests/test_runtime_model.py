"""The world-size-1 runtime against transformers on tiny random checkpoints of every supported
architecture: all-position logits (fp32, within tests/tolerances.py's bound scaled to the
logits) and greedy ids. Prompts of different lengths run as one left-padded batch in the
runtime and one by one in transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import checkpoints  # noqa: E402
from helpers import hf_generate, hf_logits  # noqa: E402
from tolerances import assert_close_scaled  # noqa: E402

from reshard.errors import CheckpointError, InputError, UnsupportedModelError  # noqa: E402
from reshard.models.hparams import load_hparams, parse_hparams  # noqa: E402
from reshard.runtime.generate import forward_logits, generate_greedy  # noqa: E402
from reshard.runtime.load import load_source_model  # noqa: E402
from reshard.runtime.model import build_model  # noqa: E402
from reshard.runtime.rope import compute_inv_freq  # noqa: E402

pytestmark = pytest.mark.float_sensitive  # every test compares floats with transformers' forward

NEW_TOKENS = 8
PROMPTS = [[5, 17, 3, 88, 42, 9, 61, 30, 7, 12, 90], [33, 2, 71], [64, 8, 19, 27, 50, 4]]

_COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
    initializer_range=0.5,
    max_position_embeddings=256,
)

# The conversion fixture's tiny DeepSeek-V3, with narrower experts and an explicit scale.
DEEPSEEK_V3 = {**checkpoints.DEEPSEEK_V3, "moe_intermediate_size": 16, "routed_scaling_factor": 2.5}

# name -> (config class, model class, extra config). Each row covers something specific.
ARCHS = {
    # Llama 3.1 rope scaling (a short original context so every band is hit), tied embeddings,
    # GQA, q/k/v/o and MLP biases.
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    # Sliding window (4) shorter than the longest prompt (11).
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    # q/k/v biases; the window only on layers >= max_window_layers; tied embeddings.
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            use_sliding_window=True, sliding_window=5, max_window_layers=1, tie_word_embeddings=True
        ),
    ),
    # q_norm/k_norm; head_dim (16) != hidden / heads (8); no GQA.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, num_key_value_heads=4)),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
    # Shared expert + sigmoid gate, top-k not renormalised, layer 0 dense.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
            mlp_only_layers=[0],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
    ),
    # MLA with low-rank q and interleaved rope, 16 experts in 4 groups (2 kept), sigmoid
    # router, a shared expert, layer 0 dense.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK_V3),
    # q_lora_rank null (one q_proj), rope in halves, yarn with mscale_all_dim, no renorm.
    "deepseek_v3_plain_q": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **DEEPSEEK_V3,
            "q_lora_rank": None,
            "rope_interleave": False,
            "norm_topk_prob": False,
            "rope_scaling": dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=64,
                mscale=1.0,
                mscale_all_dim=1.0,
                beta_fast=32,
                beta_slow=1,
            ),
        },
    ),
}


def make_checkpoint(arch: str, path: Path, seed: int = 0):
    """Save a tiny random HF model of `arch` into `path`; return the HF model (fp32, eval)."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # transformers zeroes DeepSeek's selection bias: make it matter
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.5)
    model.generation_config.eos_token_id = None  # decode a fixed number of tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_checkpoint(request.param, path)


def test_all_position_logits_match_transformers(checkpoint):
    arch, path, hf = checkpoint
    ours = forward_logits(load_source_model(path), PROMPTS)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what=f"{arch} prompt len {len(prompt)}")


def test_greedy_generation_matches_transformers(checkpoint):
    arch, path, hf = checkpoint
    results = generate_greedy(load_source_model(path), PROMPTS, NEW_TOKENS)
    for prompt, result in zip(PROMPTS, results, strict=True):
        expected = hf_generate(hf, prompt, NEW_TOKENS)
        assert result.tokens == expected, f"{arch}: prompt of length {len(prompt)}"
        assert len(set(expected)) > 1, f"{arch}: fixture too degenerate (one repeated token)"
        # Row k chose token k: HF's logits at the same positions of prompt + generated ids.
        full = hf_logits(hf, prompt + result.tokens)[len(prompt) - 1 : -1]
        assert_close_scaled(result.logits, full, what=f"{arch}: decode-step logits")


def test_fused_in_memory_experts_match(tmp_path):
    """transformers 5 keeps experts fused in memory ([E, 2I, H] gate rows then up rows)."""
    hf = make_checkpoint("qwen3_moe", tmp_path)
    tensors = {k: v.detach() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in tensors)
    ours = build_model(load_hparams(tmp_path), tensors)
    for prompt, got in zip(PROMPTS, forward_logits(ours, PROMPTS), strict=True):
        assert_close_scaled(got, hf_logits(hf, prompt), what="fused experts")


def test_mixtral_in_memory_names_match(tmp_path):
    """Mixtral's in-memory names (`mlp.experts.gate_up_proj`) load like the on-disk ones."""
    hf = make_checkpoint("mixtral", tmp_path)
    ours = build_model(load_hparams(tmp_path), dict(hf.state_dict()))
    got = forward_logits(ours, PROMPTS[:1])[0]
    assert_close_scaled(got, hf_logits(hf, PROMPTS[0]), what="mixtral in-memory names")


@pytest.mark.parametrize(
    "scaling",
    [
        dict(rope_type="linear", factor=4.0),
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    ],
)
def test_inv_freq_matches_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        **_COMMON, rope_theta=10000.0, rope_scaling=scaling, architectures=["LlamaForCausalLM"]
    )
    expected, expected_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours, scale = compute_inv_freq(parse_hparams(config.to_dict()))
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(expected_scale)


def test_unsupported_rope_type_is_refused():
    config = {**_COMMON, "architectures": ["LlamaForCausalLM"], "num_attention_heads": 4}
    config["rope_scaling"] = {"rope_type": "longrope", "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match="rope type 'longrope'"):
        compute_inv_freq(parse_hparams(config))


def test_missing_tensor_names_the_tensor(tmp_path):
    hf = make_checkpoint("qwen3", tmp_path)
    tensors = dict(hf.state_dict())
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(CheckpointError, match="k_norm"):
        build_model(load_hparams(tmp_path), tensors, where="unit")


def test_bad_prompts_are_input_errors(tmp_path):
    make_checkpoint("qwen3", tmp_path)
    model = load_source_model(tmp_path)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate_greedy(model, [[1, 2], []], 2)
    with pytest.raises(InputError, match=r"outside \[0, 101\)"):
        generate_greedy(model, [[1, 101]], 2)


def test_sharded_source_with_index_loads_like_one_file(tmp_path):
    """model.safetensors.index.json + several files, and a dtype cast on load."""
    hf = make_checkpoint("mixtral", tmp_path / "one")
    hf.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    one, many = load_source_model(tmp_path / "one"), load_source_model(tmp_path / "many")
    for name, tensor in one.state_dict().items():
        assert torch.equal(tensor, many.state_dict()[name]), name
    half = load_source_model(tmp_path / "many", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert generate_greedy(half, PROMPTS[:1], 2)[0].logits.dtype == torch.float32
