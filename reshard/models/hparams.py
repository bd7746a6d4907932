"""Hyper-parameters normalised from a Hugging Face `config.json` into one frozen dataclass.

Configs written by transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`) read the same. Values stay global (whole-model); per-rank shapes are
derived elsewhere. Nothing here knows about parallelism.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config_values import (
    FIX,
    get_bool,
    get_dict,
    get_float,
    get_int,
    get_int_list,
    get_str,
    get_str_list,
)
from ..errors import CheckpointError, ReshardIOError, UnsupportedModelError
from ..quant import parse_quantization
from ..io.strict_json import read_json

# config.json "architectures" entry -> model family (one spec module per family).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",  # Llama 2, 3, 3.1, 3.2
    "MistralForCausalLM": "llama",  # Mistral 7B: Llama layout + sliding window
    "Qwen2ForCausalLM": "qwen2",  # q/k/v biases
    "Qwen3ForCausalLM": "qwen3",  # q_norm / k_norm
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",  # MLA, grouped sigmoid routing, shared experts
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
    # reshard.quant.QuantScheme as a dict, from quantization_config (None: not quantized).
    quantization: dict[str, Any] | None = None
    # Router: "softmax" (Mixtral, Qwen) or "sigmoid" with a selection bias, groups of
    # experts (n_group, best topk_group kept) and a scale on the weights (DeepSeek-V3).
    router_scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # Multi-head latent attention (kv_lora_rank > 0; DeepSeek-V3). head_dim is then the rope
    # part (qk_rope_head_dim), as transformers sets it; q_lora_rank 0 means a plain q_proj.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    num_mtp_layers: int = 0  # multi-token-prediction layers stored past num_hidden_layers

    @property
    def num_expert_groups(self) -> int:
        """Expert groups for node-aware placement (n_group > 1), else 0."""
        return self.n_group if self.n_group > 1 else 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of q and k: nope + rope parts under MLA, else head_dim."""
        return self.qk_nope_head_dim + self.head_dim if self.is_mla else self.head_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.qk_head_dim

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
        config = read_json(path, what="config.json", fix="Re-download config.json.")
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: no config.json. A Hugging Face model folder needs one; "
            "download it with the weights."
        ) from None
    except OSError as e:
        raise ReshardIOError(
            f"{path}: cannot read ({e.strerror}). Check the file's permissions."
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path}: config.json is a JSON {type(config).__name__}, not an object. "
            "Re-download config.json."
        )
    return config


def parse_hparams(config: dict[str, Any], *, where: str = "config.json") -> HParams:
    """Normalise a config.json dict. Architecture comes only from `architectures`. Every value
    is type-checked (config_values): a wrong type is an error naming the key, not a crash."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json is not a JSON object. {FIX}")
    arch = _architecture(config, where)
    family = ARCHITECTURES[arch]
    heads = get_int(config, "num_attention_heads", where, arch=arch)
    layers = get_int(config, "num_hidden_layers", where, arch=arch)
    rope_theta, rope_scaling = _rope(config, where)
    return HParams(
        architecture=arch,
        family=family,
        hidden_size=get_int(config, "hidden_size", where, arch=arch),
        intermediate_size=get_int(config, "intermediate_size", where, default=0, minimum=0),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_kv_heads(config, heads, where),
        head_dim=_head_dim(config, heads, where, arch),
        vocab_size=get_int(config, "vocab_size", where, arch=arch),
        rms_norm_eps=get_float(config, "rms_norm_eps", where, default=1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=get_int(config, "max_position_embeddings", where, default=4096),
        tie_word_embeddings=get_bool(config, "tie_word_embeddings", where, default=False),
        attention_bias=family == "qwen2"
        or get_bool(config, "qkv_bias", where, default=family == "qwen2_moe")
        or get_bool(config, "attention_bias", where, default=False),
        o_bias=get_bool(config, "attention_bias", where, default=False)
        and family not in ("qwen2", "qwen2_moe"),
        mlp_bias=get_bool(config, "mlp_bias", where, default=False),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        hidden_act=get_str(config, "hidden_act", where, default="silu"),
        layer_types=_layer_types(config, layers, family, where),
        sliding_window=_sliding_window(config, where),
        torch_dtype=_torch_dtype(config, where),
        **_moe_fields(config, family, layers, where),
        quantization=parse_quantization(config, where=where),
        **_mla_fields(config, where),
    )


def _architecture(config: dict[str, Any], where: str) -> str:
    archs = get_str_list(config, "architectures", where)
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise UnsupportedModelError(
            f"{where}: architectures={archs} is not supported. Supported: "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    return known[0]


def _kv_heads(config: dict[str, Any], heads: int, where: str) -> int:
    kv_heads = get_int(config, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"{where}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}; every kv head must serve a whole group. {FIX}"
        )
    return kv_heads


def _head_dim(config: dict[str, Any], heads: int, where: str, arch: str) -> int:
    if config.get("kv_lora_rank") is not None:  # MLA: rope runs over qk_rope_head_dim only
        return get_int(config, "qk_rope_head_dim", where, arch=arch)
    if config.get("head_dim") is not None:
        return get_int(config, "head_dim", where)
    hidden = get_int(config, "hidden_size", where, arch=arch)
    if hidden < heads:
        raise CheckpointError(
            f"{where}: no 'head_dim', and hidden_size={hidden} // num_attention_heads={heads} "
            f"is 0. {FIX}"
        )
    return hidden // heads


def _torch_dtype(config: dict[str, Any], where: str) -> str:
    key = "torch_dtype" if config.get("torch_dtype") is not None else "dtype"
    return get_str(config, key, where, default="float32")


def _moe_fields(config: dict[str, Any], family: str, layers: int, where: str) -> dict[str, Any]:
    """The MoE fields of HParams; all zero / empty for dense families."""
    if family == "deepseek_v3":
        return _deepseek_moe_fields(config, layers, where)
    if family not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return {}
    key = "num_local_experts" if config.get("num_local_experts") else "num_experts"
    num_experts = get_int(config, key, where, default=0, minimum=0)
    if num_experts <= 0:
        raise CheckpointError(f"{where}: {family} needs num_experts/num_local_experts > 0.")
    step = get_int(config, "decoder_sparse_step", where, default=1, minimum=0) or 1
    dense = set(get_int_list(config, "mlp_only_layers", where))
    shared = get_int(config, "shared_expert_intermediate_size", where, default=0, minimum=0)
    top_k = get_int(config, "num_experts_per_tok", where, default=0, minimum=0)
    if top_k > num_experts:
        raise CheckpointError(
            f"{where}: num_experts_per_tok={top_k} is more than {key}={num_experts}. {FIX}"
        )
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": _expert_width(config, family, where),
        "shared_expert_intermediate_size": shared if family == "qwen2_moe" else 0,
        "n_group": get_int(config, "n_group", where, default=1, minimum=1)
        if config.get("n_group")
        else 1,  # expert groups: placement keeps them on nodes (--gpus-per-node)
        # Mixtral always renormalises its top-k weights, whatever the config says.
        "norm_topk_prob": family == "mixtral"
        or get_bool(config, "norm_topk_prob", where, default=False),
        "moe_layers": tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
    }


def _deepseek_moe_fields(config: dict[str, Any], layers: int, where: str) -> dict[str, Any]:
    """DeepSeek-V3 (transformers' DeepseekV3Config names and defaults): layers from
    first_k_dense_replace on are MoE; n_shared_experts shared experts act as one MLP
    n_shared x moe_intermediate_size wide; experts come in n_group groups."""
    experts = get_int(config, "n_routed_experts", where)
    top_k = get_int(config, "num_experts_per_tok", where)
    width = get_int(config, "moe_intermediate_size", where)
    groups = get_int(config, "n_group", where, default=1) if config.get("n_group") else 1
    keep = get_int(config, "topk_group", where, default=1) if config.get("topk_group") else 1
    if experts % groups or keep > groups or top_k > experts * keep // groups:
        raise CheckpointError(
            f"{where}: n_routed_experts={experts} must split into n_group={groups} equal "
            f"groups, topk_group={keep} <= n_group and num_experts_per_tok={top_k} <= the "
            f"experts of the kept groups. {FIX}"
        )
    dense = get_int(config, "first_k_dense_replace", where, default=3, minimum=0)
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": width,
        "shared_expert_intermediate_size": width
        * get_int(config, "n_shared_experts", where, default=1, minimum=0),
        "norm_topk_prob": get_bool(config, "norm_topk_prob", where, default=True),
        "moe_layers": tuple(range(dense, layers)),
        "router_scoring": "sigmoid",
        "n_group": groups,
        "topk_group": keep,
        "routed_scaling_factor": get_float(
            config, "routed_scaling_factor", where, default=2.5, positive=True
        ),
    }


def _mla_fields(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Multi-head latent attention sizes, present when config.json has kv_lora_rank."""
    if config.get("kv_lora_rank") is None:
        return {}
    q_rank = config.get("q_lora_rank")
    return {
        "q_lora_rank": 0 if q_rank is None else get_int(config, "q_lora_rank", where),
        "kv_lora_rank": get_int(config, "kv_lora_rank", where),
        "qk_nope_head_dim": get_int(config, "qk_nope_head_dim", where),
        "v_head_dim": get_int(config, "v_head_dim", where),
        "rope_interleave": get_bool(config, "rope_interleave", where, default=True),
        "num_mtp_layers": get_int(config, "num_nextn_predict_layers", where, default=0, minimum=0),
    }


def _expert_width(config: dict[str, Any], family: str, where: str) -> int:
    # Mixtral's experts are intermediate_size wide; the Qwen MoEs have their own key.
    key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    return get_int(config, key, where, default=0, minimum=0)


# Keys each rope type reads (reshard/runtime/rope.py); present and numeric, or refused here.
ROPE_NUMBERS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
    ),
    "yarn": ("factor",),
}  # fmt: skip


def _rope(config: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    params = get_dict(config, "rope_parameters", where)
    key = "rope_parameters" if params is not None else "rope_scaling"
    scaling = params if params is not None else get_dict(config, "rope_scaling", where)
    scaling = dict(scaling or {})
    holder = scaling if "rope_theta" in scaling else config  # transformers >= 5 nests theta
    theta = get_float(holder, "rope_theta", where, default=10000.0, positive=True)
    scaling.pop("rope_theta", None)
    rope_type = get_str(scaling, "rope_type", where, default=scaling.get("type") or "default")
    for name in ROPE_NUMBERS.get(rope_type, ()):
        value = scaling.get(name)
        if type(value) not in (int, float) or value <= 0:
            raise CheckpointError(
                f"{where}: '{key}.{name}' is {value!r}; rope type '{rope_type}' needs a "
                f"positive number. {FIX}"
            )
    return theta, (None if rope_type == "default" else scaling)


def _sliding_window(config: dict[str, Any], where: str) -> int | None:
    # A present but false or null use_sliding_window switches the window off (Qwen2).
    if "use_sliding_window" in config and not get_bool(
        config, "use_sliding_window", where, default=False
    ):
        return None
    window = get_int(config, "sliding_window", where, default=0, minimum=0)
    return window or None


LAYER_TYPES = ("full_attention", "sliding_attention")


def _layer_types(config: dict[str, Any], layers: int, family: str, where: str) -> tuple[str, ...]:
    """Which layers use the sliding window, following transformers' config classes: an explicit
    `layer_types` wins; else Qwen2 slides from max_window_layers on, Qwen2-MoE slides on even
    layers below it, and Mistral / Qwen3-MoE slide on every layer."""
    types = get_str_list(config, "layer_types", where)
    if types and (len(types) != layers or not set(types) <= set(LAYER_TYPES)):
        raise CheckpointError(
            f"{where}: 'layer_types' must list one of {', '.join(LAYER_TYPES)} for each of the "
            f"{layers} layers (num_hidden_layers); it has {len(types)} entries. {FIX}"
        )
    full = tuple("full_attention" for _ in range(layers))
    if _sliding_window(config, where) is None:
        return full
    if types:
        return tuple(types)
    first = get_int(config, "max_window_layers", where, default=0, minimum=0)
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
