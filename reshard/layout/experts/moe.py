"""Expert placement for a conversion: recipe + measured load -> a Placement per MoE layer,
and the manifest / engine-export views of the result. The algorithms live in place.py."""

from __future__ import annotations

import json

from ...errors import LayoutError
from ...models.hparams import HParams
from ..recipe import Recipe
from .nodes import NodeLayout, place_model_on_nodes
from .place import Placement, place_model
from .report import read_expert_load, to_sglang, to_trtllm_yaml

SGLANG_FILE = "expert_location.sglang.json"
TRTLLM_FILE = "moe_load_balancer.yaml"


def check_gpus_per_node(hp: HParams, recipe: Recipe) -> None:
    """gpus_per_node places expert groups on nodes; without groups or ep it would do nothing."""
    if recipe.gpus_per_node is None:
        return
    if hp.num_expert_groups < 1 or recipe.ep == 1:
        why = "ep is 1" if hp.num_expert_groups else f"{hp.architecture} has no expert groups"
        raise LayoutError(
            f"{recipe.origin}: gpus_per_node={recipe.gpus_per_node} keeps expert groups "
            f"(config.json n_group) on nodes, but {why}; drop --gpus-per-node, or use it with "
            "--suggest to size nodes."
        )


def solve_placements(hp: HParams, recipe: Recipe) -> dict[int, Placement]:
    if recipe.ep == 1:
        if recipe.redundant:
            raise LayoutError(
                f"{recipe.where('redundant')}={recipe.redundant} needs ep > 1 (a replica on the "
                "rank that already holds the expert saves nothing). Set ep or drop redundant."
            )
        return {}
    loads = read_expert_load(recipe.load).layers if recipe.load else None
    if recipe.gpus_per_node is not None and recipe.placement == "balanced":
        nodes = NodeLayout(recipe.ep, recipe.gpus_per_node, hp.num_expert_groups)
        return place_model_on_nodes(loads, hp.num_experts, hp.moe_layers, nodes, recipe.redundant)
    return place_model(
        loads, hp.num_experts, hp.moe_layers, recipe.ep, recipe.redundant, recipe.placement
    )


def placements_entry(plan) -> dict | None:
    """The manifest's `layout.experts` (None for a dense model)."""
    if plan.experts is None:
        return None
    return {
        "ep": plan.layout.ep,
        "etp": plan.layout.etp,
        "redundant": plan.experts.redundant,
        "placement": plan.experts.placement,
        "load": plan.experts.load,
        "layers": {
            str(layer): {
                "phy2log": list(p.phy2log),
                "log2phy": [list(row) for row in p.log2phy],
                "logcnt": list(p.logcnt),
                "slots_per_rank": p.slots_per_rank,
            }
            for layer, p in sorted(plan.placements.items())
        },
    }


def export_files(plan) -> dict[str, bytes]:
    """Engine inputs for the same placement: SGLang --init-expert-location and TensorRT-LLM's
    moe_load_balancer.yaml. Written next to the shards."""
    if not plan.placements:
        return {}
    sglang = to_sglang(plan.placements, num_layers=plan.hparams.num_layers)
    return {
        SGLANG_FILE: (json.dumps(sglang) + "\n").encode(),
        TRTLLM_FILE: to_trtllm_yaml(plan.placements).encode(),
    }
