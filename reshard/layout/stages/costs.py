"""Per-item pipeline costs. Item 0 is the embedding, items 1..L the decoder layers, item L+1
the final norm + lm_head. A cost is a roofline estimate (analytic_costs) or the measured median
of one module of each distinct item kind at the real shapes (profile_layers -> costs.json);
weight bytes always come from config.json. Nothing here picks stages: see stages/solve.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...dtypes import CAST_SIZES
from ...errors import InputError, ReshardIOError
from ...models import family_of
from ...models.dims import tensor_shape
from ...models.hparams import HParams
from ...models.mla import MLA_RULES
from ...strict_json import read_json
from ..gpus import GPUS, GpuSpec, find_gpu

COSTS_FORMAT = "reshard-costs"
COSTS_VERSION = 1
MODES = ("prefill", "decode")
MAX_MICROS = 1e12  # 11.6 days per layer: past it a measured time is a typo (ns must fit int64)
# Fields that fix every item's shape: a costs.json measured on another shape is refused.
SHAPE_KEYS = (
    "architecture",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "sliding_window",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


@dataclass(frozen=True)
class Item:
    name: str  # "embed", "layer 7", "head"
    kind: str  # "embed", "layer:full_attention+dense", "head": items of one kind cost the same
    cost: int  # nanoseconds, roofline or measured median
    weight_bytes: int  # bytes of this item's tensors on its stage


def layer_kind(hp: HParams, layer: int) -> str:
    """Layers of one kind have identical shapes and cost: attention type x dense/MoE MLP."""
    mlp = "moe" if layer in hp.moe_layers else "dense"
    return f"layer:{hp.layer_types[layer]}+{mlp}"


def item_kinds(hp: HParams) -> list[str]:
    return ["embed", *(layer_kind(hp, i) for i in range(hp.num_layers)), "head"]


def _layers_by_kind(hp: HParams) -> dict[str, list[int]]:
    kinds: dict[str, list[int]] = {"embed": []}
    for layer in range(hp.num_layers):
        kinds.setdefault(layer_kind(hp, layer), []).append(layer)
    kinds["head"] = []
    return kinds


def _item_names(hp: HParams) -> list[str]:
    return ["embed", *(f"layer {i}" for i in range(hp.num_layers)), "head"]


# ---- analytic roofline ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Work:
    flops: float = 0.0
    traffic: float = 0.0  # bytes moved through device memory
    weight_bytes: int = 0

    def __add__(self, other: _Work) -> _Work:
        return _Work(
            self.flops + other.flops,
            self.traffic + other.traffic,
            self.weight_bytes + other.weight_bytes,
        )


def analytic_costs(
    hp: HParams,
    *,
    batch: int = 1,
    seq: int = 1,
    mode: str = "decode",
    dtype_bytes: int = 2,
    device: str = "H100",
) -> list[Item]:
    """Roofline cost per item: max(flops / peak, bytes moved / bandwidth) in nanoseconds.
    prefill: `batch` sequences of `seq` new tokens. decode: `batch` sequences each adding one
    token to a context of `seq` tokens (the KV cache read). Weight bytes count every tensor
    the item's stage holds: all experts of an MoE layer, and lm_head even when tied (the last
    stage holds its own copy)."""
    dev = _device(device)
    tokens = _tokens(batch, seq, mode)
    works = [_embed_work(hp, tokens, dtype_bytes)]
    for layer in range(hp.num_layers):
        attn = _attention_work(hp, layer, batch, seq, mode, dtype_bytes)
        works.append(attn + _mlp_work(hp, layer, tokens, dtype_bytes))
    works.append(_head_work(hp, batch, dtype_bytes))
    return [
        Item(name, kind, _roofline_ns(work, dev), work.weight_bytes)
        for name, kind, work in zip(_item_names(hp), item_kinds(hp), works, strict=True)
    ]


def _device(name: str) -> GpuSpec:
    """The roofline's FLOP/s and bandwidth: the row of gpus.py that `plan --gpu` names."""
    key = find_gpu(name)
    if key is None:
        raise InputError(f"device={name!r} is unknown. Known: {', '.join(GPUS)}.")
    return GPUS[key]


def _tokens(batch: int, seq: int, mode: str) -> int:
    if mode not in MODES:
        raise InputError(f"mode={mode!r}: use one of {', '.join(MODES)}.")
    if batch < 1 or seq < 1:
        raise InputError(f"batch={batch}, seq={seq}: both must be >= 1.")
    return batch * seq if mode == "prefill" else batch


def _roofline_ns(work: _Work, dev: GpuSpec) -> int:
    seconds = max(work.flops / dev.flops, work.traffic / dev.bandwidth)
    return max(1, round(seconds * 1e9))


def _attended(seq: int, window: int | None, mode: str) -> int:
    """(query, key) pairs per sequence. Causal prefill: position p sees min(p, window) keys."""
    span = min(seq, window or seq)
    if mode == "decode":
        return span
    return span * (span + 1) // 2 + (seq - span) * span


def _attention_work(hp: HParams, layer: int, batch: int, seq: int, mode: str, db: int) -> _Work:
    if hp.is_linear(layer):
        return _linear_work(hp, batch, _tokens(batch, seq, mode), db)
    h, q, kv = hp.hidden_size, hp.q_size, hp.kv_size
    gate = q if family_of(hp).features.attention_output_gate else 0  # q_proj's gate rows
    matmul = h * (q + gate + 2 * kv) + q * h  # q/k/v and o
    small = h + (q + 2 * kv) * hp.attention_bias + h * hp.o_bias + 2 * hp.head_dim * hp.qk_norm
    sliding = hp.layer_types[layer] == "sliding_attention"
    window = hp.sliding_window if sliding else None
    pairs = batch * _attended(seq, window, mode)
    # decode reads the cached K and V it attends to; prefill writes K and V once.
    kv_rows = batch * (min(seq, window or seq) if mode == "decode" else seq)
    flops = 2 * _tokens(batch, seq, mode) * matmul + 4 * pairs * hp.num_heads * hp.head_dim
    if hp.is_mla:  # weights from MLA's own shapes; q.k over nope + rope, then v; latent cache
        matmul, small = _mla_params(hp)
        heads = hp.num_heads * (hp.qk_head_dim + hp.v_head_dim)
        flops = 2 * _tokens(batch, seq, mode) * matmul + 2 * pairs * heads
    cached = hp.kv_lora_rank + hp.head_dim if hp.is_mla else 2 * kv  # per token: latent or K+V
    weights = (matmul + small) * db
    return _Work(flops, weights + kv_rows * cached * db, weights)


def _linear_work(hp: HParams, batch: int, tokens: int, db: int) -> _Work:
    """Gated DeltaNet: its projections, and per token a [v, k] state update and read per value
    head; each sequence's fixed state read and written once a step."""
    h, keys, values = hp.hidden_size, hp.linear_key_size, hp.linear_value_size
    heads = hp.linear_num_value_heads
    matmul = h * (2 * keys + 2 * values + 2 * heads) + values * h  # in_proj_qkvz, _ba, out
    channels = 2 * keys + values
    small = h + channels * hp.linear_conv_kernel_dim + 2 * heads + hp.linear_value_head_dim
    state = heads * hp.linear_key_head_dim * hp.linear_value_head_dim
    state += channels * (hp.linear_conv_kernel_dim - 1)
    flops = 2 * tokens * matmul + 6 * tokens * heads * hp.linear_key_head_dim * (
        hp.linear_value_head_dim
    )
    weights = (matmul + small) * db
    return _Work(flops, weights + 2 * batch * state * db, weights)


def _mla_params(hp: HParams) -> tuple[int, int]:
    """(matrix, norm + bias) parameters of one MLA block, from its rules' dims."""
    skip = ("q_proj.weight",) if hp.q_lora_rank else ("q_a_proj.weight", "q_a_layernorm.weight",
                                                       "q_b_proj.weight")  # fmt: skip
    shapes = [
        tensor_shape(hp, r)
        for r in MLA_RULES
        if ".self_attn." in r.template and r.template.endswith(".weight")
        and not r.template.endswith(skip)
    ]  # fmt: skip
    sizes = [math.prod(shape) for shape in shapes]
    small = sum(n for n, shape in zip(sizes, shapes, strict=True) if len(shape) == 1)
    return sum(sizes) - small, hp.hidden_size + small


def _dense_mlp_work(h: int, inter: int, tokens: int, db: int, bias: bool = False) -> _Work:
    params = 3 * h * inter + (2 * inter + h) * bias  # gate, up, down
    return _Work(2 * tokens * 3 * h * inter, params * db, params * db)


def _mlp_work(hp: HParams, layer: int, tokens: int, db: int) -> _Work:
    h = hp.hidden_size
    # post_attention_layernorm; Gemma adds pre_/post_feedforward_layernorm
    norms = 3 if family_of(hp).features.sandwich_norms else 1
    norm = _Work(0, norms * h * db, norms * h * db)
    if layer not in hp.moe_layers:
        return norm + _dense_mlp_work(h, hp.intermediate_size, tokens, db, hp.mlp_bias)
    return norm + _moe_work(hp, tokens, db)


def _moe_work(hp: HParams, tokens: int, db: int) -> _Work:
    h, n_experts, top_k = hp.hidden_size, hp.num_experts, _top_k(hp)
    expert = 3 * h * hp.moe_intermediate_size
    # Uniform routing: expected distinct experts the tokens' top-k picks touch. Only those are
    # read, so a batch-1 decode reads top_k experts and a long prefill reads nearly all.
    touched = n_experts * (1 - (1 - top_k / n_experts) ** tokens)
    router = h * n_experts
    work = _Work(
        2 * tokens * (router + top_k * expert),
        (router + touched * expert) * db,
        (router + n_experts * expert) * db,
    )
    if hp.shared_expert_intermediate_size:  # Qwen2-MoE: a dense MLP + a [1, H] sigmoid gate
        shared = _dense_mlp_work(h, hp.shared_expert_intermediate_size, tokens, db)
        work = work + shared + _Work(2 * tokens * h, h * db, h * db)
    return work


def _top_k(hp: HParams) -> int:
    if not 1 <= hp.num_experts_per_tok <= hp.num_experts:
        raise InputError(
            f"config.json: num_experts_per_tok={hp.num_experts_per_tok} with "
            f"num_experts={hp.num_experts}; an MoE model needs 1 <= top-k <= experts."
        )
    return hp.num_experts_per_tok


def _embed_work(hp: HParams, tokens: int, db: int) -> _Work:
    row = hp.hidden_size * db
    return _Work(0, 2 * tokens * row, hp.vocab_size * row)  # read the looked-up rows, write out


def _head_work(hp: HParams, batch: int, db: int) -> _Work:
    # Engines compute logits only at each sequence's last position, so prefill costs as decode.
    weights = (hp.vocab_size * hp.hidden_size + hp.hidden_size) * db
    return _Work(2 * batch * hp.hidden_size * hp.vocab_size, weights, weights)


# ---- costs.json ----------------------------------------------------------------------------


def model_shape(hp: HParams) -> dict[str, Any]:
    return {key: getattr(hp, key) for key in SHAPE_KEYS}


def write_costs(path: str | os.PathLike, profile: dict[str, Any]) -> None:
    """Write a profile (as profile_layers returns it) to `path`, atomically."""
    path = Path(path)
    _check_profile(profile, str(path))
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise ReshardIOError(f"{path}: cannot write the cost file ({e}).") from None


def read_costs(path: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally validate a costs.json; item_costs_from_profile checks the model."""
    path = Path(path)
    try:
        profile = read_json(path, what="cost file", fix=_remedy(path))  # strict, never a traceback
    except FileNotFoundError:
        raise InputError(f"{path}: no such cost file. {_remedy(path)}") from None
    except OSError as e:
        raise InputError(f"{path}: not a readable JSON cost file ({e}). {_remedy(path)}") from None
    _check_profile(profile, str(path))
    return profile


def _remedy(where: str | os.PathLike) -> str:
    return f"Create it with `reshard profile layers MODEL -o {where}`."


def _check_profile(profile: Any, where: str) -> None:
    if not isinstance(profile, dict) or profile.get("format") != COSTS_FORMAT:
        raise InputError(f"{where}: not a reshard cost file (format != {COSTS_FORMAT!r}).")
    if profile.get("version") != COSTS_VERSION:
        raise InputError(
            f"{where}: cost file version {profile.get('version')!r}, this reshard reads "
            f"version {COSTS_VERSION}. {_remedy(where)}"
        )
    missing = [k for k in ("model", "kinds", "device", "batch", "seq", "mode") if k not in profile]
    if missing or not isinstance(profile["kinds"], dict) or not isinstance(profile["model"], dict):
        raise InputError(f"{where}: missing or malformed {missing or ['kinds']}. {_remedy(where)}")
    for kind, entry in profile["kinds"].items():
        if not isinstance(entry, dict):
            raise InputError(
                f"{where}: kind {_short(kind)} is {_short(entry)}, not an object with "
                f"median_us and iqr_us. {_remedy(where)}"
            )
        for key in ("median_us", "iqr_us"):
            _check_micros(where, kind, key, entry.get(key))


def _check_micros(where: str, kind: str, key: str, value: Any) -> None:
    """A time in microseconds: a number (not a bool) in [0, MAX_MICROS]."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 <= value <= MAX_MICROS:
        raise InputError(
            f"{where}: kind {_short(kind)} needs numbers median_us >= 0 and iqr_us >= 0 (times "
            f"in microseconds, at most {MAX_MICROS:.0e}); key 'kinds.{kind}.{key}' is "
            f"{_short(value)}. {_remedy(where)}"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def item_costs_from_profile(
    hp: HParams, profile: dict[str, Any], *, where: str = "costs.json"
) -> list[Item]:
    """Every item gets the measured median of its kind (in ns); weight bytes from config.json
    in the checkpoint's dtype. Refuses a profile of another model shape or one missing a kind."""
    _check_profile(profile, where)
    _check_profile_shape(hp, profile["model"], where)
    kinds = profile["kinds"]
    for kind, layers in _layers_by_kind(hp).items():
        if kind not in kinds:
            where_used = f" (layers {_span(layers)})" if layers else ""
            raise InputError(
                f"{where}: no timing for item kind {kind!r}{where_used}; it has "
                f"{sorted(kinds)}. {_remedy(where)}"
            )
    return [
        Item(name, kind, max(1, round(kinds[kind]["median_us"] * 1000)), w)
        for name, kind, w in zip(_item_names(hp), item_kinds(hp), _weight_bytes(hp), strict=True)
    ]


def _weight_bytes(hp: HParams) -> list[int]:
    # In the checkpoint's dtype, whatever dtype the timing ran in.
    dtype_bytes = CAST_SIZES.get(hp.torch_dtype, 2)
    return [item.weight_bytes for item in analytic_costs(hp, dtype_bytes=dtype_bytes)]


def _check_profile_shape(hp: HParams, measured: dict[str, Any], where: str) -> None:
    expected = model_shape(hp)
    diff = [k for k in SHAPE_KEYS if measured.get(k) != expected[k]]
    if diff:
        was = ", ".join(f"{k}={measured.get(k)!r}" for k in diff)
        now = ", ".join(f"{k}={expected[k]!r}" for k in diff)
        raise InputError(
            f"{where} was measured on a model with {was}, but this model has {now}. "
            f"Profile this model: `reshard profile layers MODEL -o {where}`."
        )


def _span(layers: list[int]) -> str:
    shown = ", ".join(str(i) for i in layers[:4])
    return shown + (f", ... {len(layers)} in all" if len(layers) > 4 else "")
