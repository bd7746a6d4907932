"""Every source tensor to its role, by the family's rules (models/<family>.py).

`match_tensors` classifies every source tensor by exactly one rule and checks that every
required tensor is there; nothing is silently dropped. The tables live in one small module per
family; the code here only wraps them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UnsupportedModelError
from ..quant import check_quantized_role, split_name
from . import family_of
from .family import Rule
from .hparams import HParams

# DeepSeek-V3's multi-token-prediction layer(s), stored as layers num_hidden_layers.. on:
# not part of next-token generation (transformers ignores them too), so skipped, not written.
MTP_RULE_TEMPLATE = "model.layers.{layer}.*"
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorRole:
    name: str
    rule: Rule
    layer: int | None
    expert: int | None
    part: str | None = None  # a quantized weight's stored part (reshard.quant.SUFFIXES)
    logical: str | None = None  # the `<module>.weight` a part belongs to

    @property
    def role(self) -> str:
        return self.rule.role


def rules_for(hp: HParams) -> tuple[Rule, ...]:
    return family_of(hp).rules


def match_tensors(hp: HParams, names, *, where: str = "the checkpoint") -> dict[str, TensorRole]:
    """Classify every tensor name; raise naming the first unknown or missing tensor."""
    rules = rules_for(hp)
    compiled = [(r, r.regex) for r in rules]
    roles: dict[str, TensorRole] = {}
    names = list(names)
    every = set(names)
    for name in names:
        if (mtp := _mtp_layer(hp, name)) is not None:
            roles[name] = TensorRole(name, Rule(MTP_RULE_TEMPLATE, "drop", "mtp"), mtp, None)
            continue
        logical, part = split_name(name, every)
        hits = [(r, m) for r, rx in compiled if (m := rx.match(logical))]
        if len(hits) != 1:
            raise UnsupportedModelError(
                f"{where}: tensor '{name}' matches {len(hits)} rules of the {hp.family} spec "
                f"({hp.architecture}); expected exactly one. reshard does not know how to "
                "split it; open an issue with the tensor name and config.json."
            )
        rule, m = hits[0]
        groups = m.groupdict()
        layer = int(groups["layer"]) if groups.get("layer") is not None else None
        expert = int(groups["expert"]) if groups.get("expert") is not None else None
        _check_indices(hp, name, rule, layer, expert, where)
        if part:
            check_quantized_role(name, rule.role, where)
        roles[name] = TensorRole(name, rule, layer, expert, part, logical if part else None)
    _check_required(hp, rules, roles, where)
    return roles


def is_mtp_name(hp: HParams, name: str) -> bool:
    """A tensor of a multi-token-prediction layer (skipped by convert and the runtime)."""
    return _mtp_layer(hp, name) is not None


def _mtp_layer(hp: HParams, name: str) -> int | None:
    if hp.num_mtp_layers and name.startswith("mtp."):  # Qwen3-Next's own `mtp.` module
        return hp.num_layers
    m = _LAYER_INDEX.match(name)
    layer = int(m.group(1)) if m else -1
    mtp = hp.num_layers <= layer < hp.num_layers + hp.num_mtp_layers
    return layer if mtp else None


def _check_indices(hp, name, rule, layer, expert, where) -> None:
    if layer is not None and not 0 <= layer < hp.num_layers:
        raise UnsupportedModelError(
            f"{where}: tensor '{name}' names layer {layer}, but config.json has "
            f"num_hidden_layers={hp.num_layers}. The config and the weights disagree."
        )
    moe_layer = layer in hp.moe_layers
    if rule.scope in ("moe", "expert") and not moe_layer:
        raise UnsupportedModelError(
            f"{where}: tensor '{name}' is an MoE tensor but config.json makes layer {layer} "
            "dense (decoder_sparse_step / mlp_only_layers). The config and weights disagree."
        )
    if rule.scope in ("attention", "linear") and (rule.scope == "linear") != hp.is_linear(layer):
        kind = "linear-attention" if rule.scope == "linear" else "softmax-attention"
        raise UnsupportedModelError(
            f"{where}: tensor '{name}' belongs to a {kind} layer but config.json makes layer "
            f"{layer} a {hp.layer_types[layer]} layer (layer_types / full_attention_interval). "
            "The config and the weights disagree."
        )
    if rule.scope == "dense" and moe_layer:
        raise UnsupportedModelError(
            f"{where}: tensor '{name}' is a dense-MLP tensor but config.json makes layer "
            f"{layer} an MoE layer. The config and the weights disagree."
        )
    if expert is not None and not 0 <= expert < hp.num_experts:
        raise UnsupportedModelError(
            f"{where}: tensor '{name}' names expert {expert}, but config.json has "
            f"{hp.num_experts} experts. The config and the weights disagree."
        )


def _expected(hp: HParams, rule: Rule):
    layers = range(hp.num_layers)
    if rule.scope == "global":
        yield rule.template
    elif rule.scope == "layer":
        yield from (rule.template.format(layer=i) for i in layers)
    elif rule.scope == "dense":
        yield from (rule.template.format(layer=i) for i in layers if i not in hp.moe_layers)
    elif rule.scope == "moe":
        yield from (rule.template.format(layer=i) for i in hp.moe_layers)
    elif rule.scope in ("attention", "linear"):
        linear = rule.scope == "linear"
        yield from (rule.template.format(layer=i) for i in layers if hp.is_linear(i) == linear)
    else:
        for i in hp.moe_layers:
            yield from (rule.template.format(layer=i, expert=e) for e in range(hp.num_experts))


def _expected_in_layer(hp: HParams, rule: Rule, layer: int) -> list[str]:
    if rule.scope == "expert":
        return [rule.template.format(layer=layer, expert=e) for e in range(hp.num_experts)]
    return [rule.template.format(layer=layer)]


def _check_required(hp: HParams, rules, roles, where) -> None:
    present = set(roles) | {r.logical for r in roles.values() if r.logical}
    for rule in rules:
        if rule.optional or rule.group:
            continue
        if rule.template == "lm_head.weight" and hp.tie_word_embeddings:
            continue
        for name in _expected(hp, rule):
            if name not in present:
                raise UnsupportedModelError(
                    f"{where}: required tensor '{name}' ({rule.role}) is missing for "
                    f"{hp.architecture}. The checkpoint is incomplete; re-download it."
                )
    _check_expert_groups(hp, rules, present, where)


def _check_expert_groups(hp: HParams, rules, present, where) -> None:
    grouped = [r for r in rules if r.group]
    for layer in hp.moe_layers:
        complete = []
        for group in sorted({r.group for r in grouped}):
            members = [r for r in grouped if r.group == group]
            names = [n for r in members for n in _expected_in_layer(hp, r, layer)]
            if names and all(n in present for n in names):
                complete.append(group)
            elif any(n in present for n in names):
                missing = next(n for n in names if n not in present)
                raise UnsupportedModelError(
                    f"{where}: layer {layer} has some {group} expert tensors but not "
                    f"'{missing}'. The checkpoint is incomplete; re-download it."
                )
        if len(complete) != 1:
            raise UnsupportedModelError(
                f"{where}: layer {layer} needs its routed experts stored either per expert or "
                f"fused as 3-D tensors (found {complete or 'neither'})."
            )
