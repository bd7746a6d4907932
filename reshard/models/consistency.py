"""config.json against the tensors, before planning: every shape the config implies, and the
dtypes the runtime can load. A contradiction here used to convert "fine" and then drop a
vocab row silently or crash the generate tier; now it names the tensor, the config keys and
both numbers. Tensors of roles this table does not describe are left to their own checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..dtypes import FLOAT_CODES, PLAIN_FLOAT_CODES
from ..errors import CheckpointError
from ..quant import check_parts, logical_shape
from . import family_of
from .deltanet import linear_leaf, linear_shapes
from .hparams import HParams
from .mla import mla_shapes
from .rules import TensorRole

FLOATS = FLOAT_CODES
PLAIN_FLOATS = PLAIN_FLOAT_CODES  # what a 1-D norm or bias may be
FIX = "config.json and the weights do not belong together; re-download them as one."


def check_tensors_against_config(
    hp: HParams,
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    roles: Mapping[str, TensorRole],
    *,
    cast: str,
    files: Mapping[str, str],
    config: str,
) -> None:
    """`tensors`: name -> (dtype, shape); `cast`: the recipe's dtype ("keep" or a target);
    `files`: name -> the file that holds it; `config`: the config.json path, for messages."""
    # A quantized weight's parts are checked against its logical shape (quant.check_parts
    # checks each part's own stored shape and dtype); the plain tensors one by one.
    _check_quantized_shapes(hp, tensors, roles, files, config)
    checked = {n: v for n, v in tensors.items() if roles[n].role != "drop" and not roles[n].part}
    for name, (dtype, shape) in checked.items():
        _check_shape(hp, name, tuple(shape), files[name], config)
        _check_float(name, dtype, len(shape), files[name])
    if cast == "keep":
        _check_one_dtype(checked, files)


def _check_quantized_shapes(hp: HParams, tensors, roles, files, config: str) -> None:
    scheme = hp.quantization
    check_parts(scheme, tensors, roles, where=str(Path(config).parent))
    if scheme is None:
        return
    for name, role in roles.items():
        if role.part in ("weight", "qweight", "mx_blocks", "weight_packed") and name in tensors:
            logical = logical_shape(scheme, role.logical, tensors)
            _check_shape(hp, role.logical, logical, files[name], config)


def labelled_shape(hp: HParams, name: str) -> tuple[tuple[str, int], ...]:
    """The shape config.json implies, each dim with the keys that set it."""
    hidden = (f"hidden_size={hp.hidden_size}", hp.hidden_size)
    head_dim = f"head_dim={hp.head_dim}"
    q = (f"num_attention_heads={hp.num_heads} x {head_dim}", hp.q_size)
    kv = (f"num_key_value_heads={hp.num_kv_heads} x {head_dim}", hp.kv_size)
    experts = (f"num_experts={hp.num_experts}", hp.num_experts)
    leaf = ".".join(name.rsplit(".", 2)[-2:])  # "q_proj.weight", "experts.down_proj"
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return ((f"vocab_size={hp.vocab_size}", hp.vocab_size), hidden)
    if (linear := linear_leaf(name)) is not None and linear in linear_shapes(hp):
        return linear_shapes(hp)[linear]
    if leaf == "q_proj.weight" and family_of(hp).features.attention_output_gate:
        return ((f"2 x {q[0]} (q and its output gate)", 2 * hp.q_size), hidden)  # per head
    if hp.is_mla and ".self_attn." in name or leaf == "gate.e_score_correction_bias":
        bias = leaf.endswith(".bias")
        shape = mla_shapes(hp)[leaf.removesuffix(".bias") + ".weight" if bias else leaf]
        return shape[:1] if bias else shape
    if ".experts." in name and family_of(hp).features.stacked_experts:
        return _stacked_shape(hp, leaf, hidden, experts)
    if leaf.endswith(".e_score_correction_bias"):  # MiniMax-M2: on the MoE block
        return (experts,)
    span = family_of(hp).features.qk_norm_over_heads  # q/k norms over all heads
    if leaf.endswith(".bias"):
        return labelled_shape(hp, name.removesuffix(".bias") + ".weight")[:1]
    table = {
        "q_proj.weight": (q, hidden),
        "k_proj.weight": (kv, hidden),
        "v_proj.weight": (kv, hidden),
        "o_proj.weight": (hidden, q),
        "qkv_proj.weight": ((f"{q[0]} + 2 x {kv[0]}", hp.q_size + 2 * hp.kv_size), hidden),
        "q_norm.weight": (q,) if span else ((head_dim, hp.head_dim),),
        "k_norm.weight": (kv,) if span else ((head_dim, hp.head_dim),),
        "gate.weight": (experts, hidden),
        "shared_expert_gate.weight": (("1", 1), hidden),
        "self_attn.sinks": ((f"num_attention_heads={hp.num_heads}", hp.num_heads),),
        "router.weight": (experts, hidden),
        "router.bias": (experts,),
    }
    if leaf in table:
        return table[leaf]
    if leaf.endswith("norm.weight"):
        return (hidden,)
    return _mlp_shape(hp, name, leaf, hidden, experts)


def _stacked_shape(hp: HParams, leaf: str, hidden, experts):
    """gpt-oss's [E, in, out] experts (intermediate_size is the expert width there)."""
    inner = (f"intermediate_size={hp.moe_intermediate_size}", hp.moe_intermediate_size)
    double = (f"2 x {inner[0]}", 2 * inner[1])
    table = {
        "experts.gate_up_proj": (experts, hidden, double),
        "experts.gate_up_proj_bias": (experts, double),
        "experts.down_proj": (experts, inner, hidden),
        "experts.down_proj_bias": (experts, hidden),
    }
    return table[leaf]


def _mlp_shape(hp: HParams, name: str, leaf: str, hidden, experts):
    if "shared_expert." in name or "shared_experts." in name:
        inner = (f"shared_expert_intermediate_size={hp.shared_expert_intermediate_size}",)
        inner += (hp.shared_expert_intermediate_size,)
    elif ".experts." in name:
        key = "intermediate_size" if hp.family == "mixtral" else "moe_intermediate_size"
        inner = (f"{key}={hp.moe_intermediate_size}", hp.moe_intermediate_size)
    else:
        inner = (f"intermediate_size={hp.intermediate_size}", hp.intermediate_size)
    if leaf == "experts.gate_up_proj":  # fused [E, 2I, H]
        return (experts, (f"2 x {inner[0]}", 2 * inner[1]), hidden)
    if leaf == "experts.down_proj":  # fused [E, H, I]
        return (experts, hidden, inner)
    if leaf.split(".")[0] in ("down_proj", "w2"):
        return (hidden, inner)
    if leaf == "gate_up_proj.weight":  # Phi-3: [gate; up]
        return ((f"2 x {inner[0]}", 2 * inner[1]), hidden)
    return (inner, hidden)


def _check_shape(hp: HParams, name: str, shape: tuple, where: str, config: str) -> None:
    expected = labelled_shape(hp, name)
    if len(shape) != len(expected):
        raise CheckpointError(
            f"{where}: tensor '{name}' has shape {list(shape)}, but {config} implies "
            f"{[v for _, v in expected]} ({', '.join(k for k, _ in expected)}). {FIX}"
        )
    for dim, (size, (keys, want)) in enumerate(zip(shape, expected, strict=True)):
        if size != want:
            raise CheckpointError(
                f"{where}: tensor '{name}' has {size} in dim {dim} (shape {list(shape)}), but "
                f"{config} says {keys}, which implies {want}. {FIX}"
            )


def _check_float(name: str, dtype: str, ndim: int, where: str) -> None:
    allowed = PLAIN_FLOATS if ndim == 1 else FLOATS
    if dtype not in allowed:
        raise CheckpointError(
            f"{where}: tensor '{name}' is {dtype}; a model weight must be a float dtype "
            f"({', '.join(allowed)}). The checkpoint is corrupt or not a plain HF export; "
            "re-export it."
        )


def _check_one_dtype(tensors: Mapping[str, tuple[str, tuple]], files: Mapping[str, str]) -> None:
    """The runtime runs every layer in the weights' own dtype: one dtype, or a cast."""
    counts: dict[str, list[str]] = {}
    for name, (dtype, _) in tensors.items():
        counts.setdefault(dtype, []).append(name)
    if len(counts) <= 1:
        return
    common = max(counts, key=lambda d: len(counts[d]))
    odd = next(d for d in counts if d != common)
    first = counts[odd][0]
    raise CheckpointError(
        f"{files[first]}: tensor '{first}' is {odd} but {len(counts[common])} others (e.g. "
        f"'{counts[common][0]}') are {common}; {len(counts[odd])} tensors are {odd}. Pass "
        f"--dtype bfloat16/float16/float32 to write one dtype, or re-export the checkpoint."
    )
