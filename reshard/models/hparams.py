"""Hyper-parameters normalised from a Hugging Face `config.json` into one frozen dataclass.

Configs written by transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`) read the same. Values stay global (whole-model); per-rank shapes are
derived elsewhere. Nothing here knows about parallelism.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from ..dtypes import DTYPE_NAMES
from ..errors import CheckpointError, ReshardIOError, UnsupportedModelError
from ..quant import QuantScheme, parse_quantization
from ..strict_json import read_json
from . import BY_ARCHITECTURE
from .config_values import FIX, get_bool, get_dict, get_float, get_int, get_str, get_str_list

MAX_LAYERS = 100_000  # the deepest published decoders have ~160 layers

# A field added after manifests were first pinned (tests/golden): to_dict() leaves it out while
# it holds its default, so the manifests of families that never set it stay byte-identical.
OMIT_DEFAULT = {"omit_default": True}


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
    # From quantization_config, parsed once (None: not quantized); a dict only on disk.
    quantization: QuantScheme | None = None
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
    # Gemma: attention scale query_pre_attn_scalar**-0.5 (None: head_dim**-0.5); tanh
    # soft-capping cap * tanh(x / cap) of the attention scores and of the final logits (None:
    # off); the rope base of sliding-window layers (Gemma-3; None: rope_theta on every layer).
    query_pre_attn_scalar: float | None = field(default=None, metadata=OMIT_DEFAULT)
    attn_logit_softcapping: float | None = field(default=None, metadata=OMIT_DEFAULT)
    final_logit_softcapping: float | None = field(default=None, metadata=OMIT_DEFAULT)
    sliding_rope_theta: float | None = field(default=None, metadata=OMIT_DEFAULT)
    # gpt-oss's clamped SwiGLU: gate clamped above at the limit, up within +-limit,
    # (up + 1) * gate * sigmoid(alpha * gate) (None: the family's plain activation).
    swiglu_limit: float | None = field(default=None, metadata=OMIT_DEFAULT)
    swiglu_alpha: float | None = field(default=None, metadata=OMIT_DEFAULT)
    # Gated DeltaNet linear attention (layer_types "linear_attention"; Qwen3-Next): key and
    # value heads and widths, and the causal conv's kernel. Each value head belongs to key
    # head v // (value heads / key heads); a linear layer keeps a fixed state per sequence.
    linear_num_key_heads: int = field(default=0, metadata=OMIT_DEFAULT)
    linear_num_value_heads: int = field(default=0, metadata=OMIT_DEFAULT)
    linear_key_head_dim: int = field(default=0, metadata=OMIT_DEFAULT)
    linear_value_head_dim: int = field(default=0, metadata=OMIT_DEFAULT)
    linear_conv_kernel_dim: int = field(default=0, metadata=OMIT_DEFAULT)

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

    @property
    def linear_key_size(self) -> int:
        """Rows of a linear layer's q (and of its k): key heads x key head width."""
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_size(self) -> int:
        """Rows of a linear layer's v (and of its output gate z): value heads x width."""
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_values_per_key(self) -> int:
        """Value heads per key head (the group a key head's q and k serve)."""
        return self.linear_num_value_heads // max(self.linear_num_key_heads, 1)

    def is_linear(self, layer: int) -> bool:
        """A gated DeltaNet layer: no KV cache, a fixed recurrent + conv state instead."""
        return self.layer_types[layer] == "linear_attention"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["moe_layers"] = list(self.moe_layers)
        d["quantization"] = self.quantization.to_dict() if self.quantization else None
        for spec in dataclass_fields(self):
            if spec.metadata.get("omit_default") and d[spec.name] == spec.default:
                del d[spec.name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HParams:
        d = dict(d)
        d["layer_types"] = tuple(d["layer_types"])
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        q = d.get("quantization")  # KeyError / ValueError: not a scheme (a damaged manifest)
        d["quantization"] = QuantScheme.from_dict(q) if q else None
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
    return _with_modelopt(config, path.parent / MODELOPT_CONFIG)


# ModelOpt exports older than its config.json `quantization_config` describe the scheme in a
# file of their own ({"producer": ..., "quantization": {"quant_algo": "NVFP4", ...}}).
MODELOPT_CONFIG = "hf_quant_config.json"


def _with_modelopt(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """config.json, with hf_quant_config.json beside it as its quantization_config when
    config.json has none (as vLLM reads these checkpoints)."""
    if "quantization_config" in config or not path.is_file():
        return config
    doc = read_json(path, what=MODELOPT_CONFIG, fix=f"Re-download {MODELOPT_CONFIG}.")
    if not isinstance(doc, dict):
        raise CheckpointError(
            f"{path}: {MODELOPT_CONFIG} is a JSON {type(doc).__name__}, not an object. "
            f"Re-download {MODELOPT_CONFIG}."
        )
    return {**config, "quantization_config": {"quant_method": "modelopt", **doc}}


def parse_hparams(config: dict[str, Any], *, where: str = "config.json") -> HParams:
    """Normalise a config.json dict. Architecture comes only from `architectures`. Every value
    is type-checked (config_values): a wrong type is an error naming the key, not a crash.
    The generic keys are read here; the family's module reads its own (Family.read_config)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json is not a JSON object. {FIX}")
    arch = _architecture(config, where)
    family = BY_ARCHITECTURE[arch]
    heads = get_int(config, "num_attention_heads", where, arch=arch)
    # Per-layer tables are built from it: a hostile 10**30 must not allocate them.
    layers = get_int(config, "num_hidden_layers", where, maximum=MAX_LAYERS, arch=arch)
    rope_theta, rope_scaling = _rope(config, where)
    fields = dict(
        architecture=arch,
        family=family.name,
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
        attention_bias=get_bool(config, "qkv_bias", where, default=False)
        or get_bool(config, "attention_bias", where, default=False),
        o_bias=get_bool(config, "attention_bias", where, default=False),
        mlp_bias=get_bool(config, "mlp_bias", where, default=False),
        qk_norm=False,
        hidden_act=get_str(config, "hidden_act", where, default="silu"),
        sliding_window=_sliding_window(config, where),
        torch_dtype=_torch_dtype(config, where),
        quantization=parse_quantization(config, where=where),
    )
    explicit = _explicit_layer_types(config, layers, where)  # checked before anything per layer
    fields.update(family.read_config(config, where, fields))
    default_sliding = fields.pop("default_sliding", None)
    window = fields["sliding_window"]  # the family may set its own default
    # A hybrid family (linear attention) reads and checks its own layer types.
    own_types = fields.pop("layer_types", None)
    if own_types is None and "linear_attention" in explicit:
        raise UnsupportedModelError(
            f"{where}: 'layer_types' lists linear_attention layers, which {arch} does not "
            "have in reshard (only hybrid families read them). Check config.json."
        )
    fields["layer_types"] = own_types or _layer_types(layers, explicit, default_sliding, window)
    return HParams(**fields)


def _architecture(config: dict[str, Any], where: str) -> str:
    archs = get_str_list(config, "architectures", where)
    known = [a for a in archs if a in BY_ARCHITECTURE]
    if not known:
        raise UnsupportedModelError(
            f"{where}: architectures={archs} is not supported. Supported: "
            f"{', '.join(sorted(BY_ARCHITECTURE))}."
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
    value = get_str(config, key, where, default="float32")
    if value not in CONFIG_DTYPES:
        raise CheckpointError(
            f"{where}: '{key}' is {value[:40]!r}, not a torch dtype (known: "
            f"{', '.join(sorted(CONFIG_DTYPES))}). {FIX}"
        )
    return value


# What config.json's torch_dtype / dtype may say: torch's names (and transformers' "auto").
CONFIG_DTYPES = frozenset({*DTYPE_NAMES.values(), "auto", "float", "half", "double"})
# transformers' rope types (modeling_rope_utils.ROPE_INIT_FUNCTIONS, and "default"): any other
# is a typo. Those the runtime lacks still convert (reshard/runtime/rope.py says which run).
# "su": Phi-3's older name for longrope (its family reads it as longrope, as transformers does).
ROPE_TYPES = ("default", "dynamic", "linear", "llama3", "longrope", "proportional", "su", "yarn")


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
    if params is not None and "full_attention" in params:  # transformers 5, per layer type
        params = get_dict(params, "full_attention", where) or {}
        key = "rope_parameters.full_attention"
    scaling = params if params is not None else get_dict(config, "rope_scaling", where)
    scaling = dict(scaling or {})
    holder = scaling if "rope_theta" in scaling else config  # transformers >= 5 nests theta
    theta = get_float(holder, "rope_theta", where, default=10000.0, positive=True)
    scaling.pop("rope_theta", None)
    rope_type = get_str(scaling, "rope_type", where, default=scaling.get("type") or "default")
    if rope_type not in ROPE_TYPES:
        name = "rope_type" if "rope_type" in scaling else "type"
        raise CheckpointError(
            f"{where}: '{key}.{name}' is {str(rope_type)[:40]!r}, not a rope type transformers "
            f"knows ({', '.join(ROPE_TYPES)}). {FIX}"
        )
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


LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")


def _explicit_layer_types(config: dict[str, Any], layers: int, where: str) -> tuple[str, ...]:
    types = get_str_list(config, "layer_types", where)
    if types and (len(types) != layers or not set(types) <= set(LAYER_TYPES)):
        raise CheckpointError(
            f"{where}: 'layer_types' must list one of {', '.join(LAYER_TYPES)} for each of the "
            f"{layers} layers (num_hidden_layers); it has {len(types)} entries. {FIX}"
        )
    return tuple(types)


def _layer_types(
    layers: int,
    explicit: tuple[str, ...],
    default_sliding: tuple[bool, ...] | None,
    window: int | None,
) -> tuple[str, ...]:
    """Which layers use the sliding window, following transformers' config classes: an explicit
    `layer_types` wins; else the family's default pattern (Family.read_config's
    `default_sliding`), else every layer slides (Mistral, Qwen3-MoE). No window: all full."""
    if window is None:
        return tuple("full_attention" for _ in range(layers))
    if explicit:
        return explicit
    slides = default_sliding if default_sliding is not None else (True,) * layers
    return tuple("sliding_attention" if s else "full_attention" for s in slides)


def load_hparams(model_dir: Path) -> HParams:
    path = Path(model_dir) / "config.json"
    return parse_hparams(read_config(path), where=str(path))
