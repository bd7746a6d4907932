"""Hyper-parameters normalised from a Hugging Face `config.json` into one frozen dataclass.

Configs written by transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`) read the same. Values stay global (whole-model); per-rank shapes are
derived elsewhere. Nothing here knows about parallelism.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModelError

# config.json "architectures" entry -> model family (one spec module per family).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",  # Llama 2, 3, 3.1, 3.2
    "MistralForCausalLM": "llama",  # Mistral 7B: Llama layout + sliding window
    "Qwen2ForCausalLM": "qwen2",  # q/k/v biases
    "Qwen3ForCausalLM": "qwen3",  # q_norm / k_norm
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class HParams:
    architecture: str
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # HF rope_scaling / rope_parameters minus the theta
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v carry biases (Qwen2; Llama with attention_bias=true)
    o_bias: bool  # o_proj carries a bias (Llama with attention_bias=true)
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    hidden_act: str
    # Per layer: "full_attention" or "sliding_attention"; sliding_window applies to the latter.
    layer_types: tuple[str, ...]
    sliding_window: int | None
    torch_dtype: str  # the checkpoint's declared dtype ("bfloat16", ...)
    # Mixture of experts (num_experts == 0 for dense models).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = field(default_factory=tuple)  # layer indices that are MoE

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HParams:
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        return cls(**d)


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: no config.json. A Hugging Face model folder needs one; "
            "download it with the weights."
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}). Re-download config.json.") from None


def parse_hparams(config: dict[str, Any], *, where: str = "config.json") -> HParams:
    """Normalise a config.json dict. Architecture comes only from `architectures`."""
    archs = config.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise UnsupportedModelError(
            f"{where}: architectures={archs} is not supported. Supported: "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    arch = known[0]
    family = ARCHITECTURES[arch]

    def need(key: str) -> Any:
        if key not in config:
            raise CheckpointError(f"{where}: missing '{key}', which {arch} requires.")
        return config[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    layers = int(need("num_hidden_layers"))
    rope_theta, rope_scaling = _rope(config)

    return HParams(
        architecture=arch,
        family=family,
        hidden_size=hidden,
        intermediate_size=int(config.get("intermediate_size") or 0),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(need("vocab_size")),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2"
        or bool(config.get("qkv_bias", family == "qwen2_moe"))
        or bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)) and family not in ("qwen2", "qwen2_moe"),
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        hidden_act=str(config.get("hidden_act", "silu")),
        layer_types=_layer_types(config, layers, family),
        sliding_window=_sliding_window(config),
        torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
        **_moe_fields(config, family, layers, where),
    )


def _moe_fields(config: dict[str, Any], family: str, layers: int, where: str) -> dict[str, Any]:
    """The MoE fields of HParams; all zero / empty for dense families."""
    if family not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return {}
    num_experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    if num_experts <= 0:
        raise CheckpointError(f"{where}: {family} needs num_experts/num_local_experts > 0.")
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": int(config.get("num_experts_per_tok") or 0),
        "moe_intermediate_size": _expert_width(config, family),
        "shared_expert_intermediate_size": shared if family == "qwen2_moe" else 0,
        # Mixtral always renormalises its top-k weights, whatever the config says.
        "norm_topk_prob": family == "mixtral" or bool(config.get("norm_topk_prob", False)),
        "moe_layers": tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
    }


def _expert_width(config: dict[str, Any], family: str) -> int:
    # Mixtral's experts are intermediate_size wide; the Qwen MoEs have their own key.
    key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    return int(config.get(key) or 0)


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = config.get("rope_parameters")
    if isinstance(params, dict):  # transformers >= 5
        theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        if rest.get("rope_type", rest.get("type", "default")) == "default":
            return theta, None
        return theta, rest
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        return theta, dict(scaling)
    return theta, None


def _sliding_window(config: dict[str, Any]) -> int | None:
    window = config.get("sliding_window")
    if "use_sliding_window" in config and not config["use_sliding_window"]:
        return None
    return int(window) if window else None


def _layer_types(config: dict[str, Any], layers: int, family: str) -> tuple[str, ...]:
    """Which layers use the sliding window, following transformers' config classes: an explicit
    `layer_types` wins; else Qwen2 slides from max_window_layers on, Qwen2-MoE slides on even
    layers below it, and Mistral / Qwen3-MoE slide on every layer."""
    types = config.get("layer_types")
    window = _sliding_window(config)
    full = tuple("full_attention" for _ in range(layers))
    if window is None:
        return full
    if types:
        return tuple(types)
    first = int(config.get("max_window_layers", 0))
    if family == "qwen2":
        slides = [i >= first for i in range(layers)]
    elif family == "qwen2_moe":
        slides = [(i + 1) % 2 == 1 and i < first for i in range(layers)]
    else:
        slides = [True] * layers
    return tuple("sliding_attention" if s else "full_attention" for s in slides)


def load_hparams(model_dir: Path) -> HParams:
    path = Path(model_dir) / "config.json"
    return parse_hparams(read_config(path), where=str(path))
