"""Which tp / ep layouts would cut a block, pack or group of a quantized model, from
config.json alone: `split_problems` is what `plan`, `convert` and `plan --suggest` refuse
with, before any byte is written. The per-tensor check at slicing time is in quant/slicing.py;
this module sits in layout/ because it reads the family's rules (quant/ knows no model).
"""

from __future__ import annotations

from ..models import family_of
from ..models.hparams import HParams
from ..models.rules import rules_for
from ..quant import FORMATS, PACK, QuantScheme, mxfp4
from ..quant.format import quantizes

# (tensor leaf, logical dim that a split cuts) per parallel MLP linear.
_MLP = (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))


def units(scheme: QuantScheme) -> tuple[int, int]:
    """Whole units a split must keep along (out, in) of a quantized weight."""
    if scheme.kind in FORMATS:
        return FORMATS[scheme.kind].units(scheme)
    if scheme.kind == "fp8_block":
        return scheme.block
    if scheme.kind == "awq":
        return PACK, scheme.group_size
    if scheme.kind == "gptq":  # act-order keeps scales whole: only the qweight pack binds
        return PACK, PACK if scheme.desc_act else scheme.group_size
    return 1, 1


def split_problems(hp: HParams, tp: int, ep: int = 1) -> list[str]:
    """One line per kind of weight whose per-rank slice would cut a unit, with what fits."""
    scheme = hp.quantization
    if scheme is None:
        return []
    if scheme.kind == "mxfp4":
        return mxfp4.split_problems(hp, tp, ep, expert_eps)
    unit = units(scheme)
    cut: dict[tuple, list[str]] = {}  # one line per module group (attention, mlp, experts)
    for example, dim, size, parts in _splits(hp, tp, ep):
        name = _first_quantized(hp, scheme, example)
        if parts <= 1 or size % parts or name is None:
            continue  # nothing cut, the plain divisibility check reports it, or unquantized
        if (size // parts) % unit[dim]:
            key = (name.rsplit(".", 2)[0], dim, size // parts, size, parts)
            cut.setdefault(key, []).append(name)
    return [
        _problem(hp, scheme, names, dim, per, size, parts, unit, tp)
        for (_, dim, per, size, parts), names in cut.items()
    ]


def _splits(hp: HParams, tp: int, ep: int):
    """(example tensor, cut dim, logical size along it, ways it is split)."""
    etp = tp // ep if ep and tp % ep == 0 else tp
    for leaf, dim, size, parts in _attention_splits(hp, tp):
        yield f"model.layers.0.self_attn.{leaf}.weight", dim, size, parts
    dense = [i for i in range(hp.num_layers) if i not in hp.moe_layers]
    if hp.intermediate_size and dense:
        for leaf, dim in _MLP:
            yield f"model.layers.{dense[0]}.mlp.{leaf}.weight", dim, hp.intermediate_size, tp
    if hp.is_moe:
        features = family_of(hp).features
        first = f"model.layers.{hp.moe_layers[0]}.{features.moe_block}.experts.0."
        for leaf, (_, dim) in zip(features.expert_names, _MLP, strict=True):  # w1/w3/w2 too
            yield f"{first}{leaf}.weight", dim, hp.moe_intermediate_size, etp
    if hp.shared_expert_intermediate_size:
        first = _shared_expert_prefix(hp)
        for leaf, dim in _MLP:
            yield f"{first}{leaf}.weight", dim, hp.shared_expert_intermediate_size, tp


def _first_quantized(hp: HParams, scheme: QuantScheme, example: str) -> str | None:
    """`example` (layer L's tensor), or the same tensor of the first later layer that the
    scheme quantizes (an ignore list may leave some layers unquantized), or None."""
    model, layers, layer, rest = example.split(".", 3)  # model.layers.L.<rest>
    for i in range(int(layer), hp.num_layers):
        name = f"{model}.{layers}.{i}.{rest}"
        if quantizes(scheme, name.rpartition(".")[0]):
            return name
    return None


def _attention_splits(hp: HParams, tp: int):
    """(leaf, cut dim, logical size, ways split) of the head-split attention linears. MLA
    (DeepSeek-V3) splits q_b (or q_proj) and kv_b rows and o_proj columns by heads; its
    a-projections are replicated, and it has no k/v projections."""
    if hp.is_mla:
        kv_b = hp.num_heads * (hp.qk_nope_head_dim + hp.v_head_dim)
        q = "q_b_proj" if hp.q_lora_rank else "q_proj"
        return ((q, 0, hp.q_size, tp), ("kv_b_proj", 0, kv_b, tp),
                ("o_proj", 1, hp.num_heads * hp.v_head_dim, tp))  # fmt: skip
    kv_parts = tp if hp.num_kv_heads >= tp else hp.num_kv_heads  # replicated: one head each
    return (
        ("q_proj", 0, hp.q_size, tp),
        ("o_proj", 1, hp.q_size, tp),
        ("k_proj", 0, hp.kv_size, kv_parts),
        ("v_proj", 0, hp.kv_size, kv_parts),
    )


def _shared_expert_prefix(hp: HParams) -> str:
    """`model.layers.L.mlp.shared_expert(s).` of the first MoE layer, from the family's rules
    (Qwen2-MoE says shared_expert, DeepSeek-V3 shared_experts)."""
    template = next(
        r.template for r in rules_for(hp) if ".shared_expert" in r.template and r.role == "row"
    )
    return template.format(layer=hp.moe_layers[0]).rsplit(".", 2)[0] + "."


def _problem(hp, scheme, names, dim, per, size, parts, unit, tp) -> str:
    what = "rows" if dim == 0 else "columns"
    kind = FORMATS[scheme.kind].unit_name if scheme.kind in FORMATS else "pack/group"
    kind = {"fp8_block": "block"}.get(scheme.kind, kind)
    name = names[0]
    alike = [n.rsplit(".", 2)[1] for n in names[1:]]
    also = f" (and {', '.join(alike)} alike)" if alike else ""
    line = (
        f"tensor '{name}'{also} would hold {per} of its {size} {what} per rank (split "
        f"{parts} ways), not a multiple of the {scheme.kind} {kind} size {unit[dim]}"
    )
    if ".experts." in name:
        fits = expert_eps(hp, tp, unit)
        if fits:
            eps = ", ".join(f"--ep {e} (expert tp {tp // e})" for e in fits)
            return f"{line}; with tp={tp} these fit: {eps}"
    return line


def expert_eps(hp: HParams, tp: int, unit: tuple[int, int]) -> list[int]:
    """The ep (dividing tp and the expert count) whose expert tp keeps whole units."""
    out = []
    for ep in range(2, tp + 1):
        if tp % ep or hp.num_experts % ep:
            continue
        etp = tp // ep
        width = hp.moe_intermediate_size
        per = width // etp
        if etp == 1 or (width % etp == 0 and not per % unit[0] and not per % unit[1]):
            out.append(ep)
    return out
