"""config.json readers the mixture-of-experts families share: expert count and width under
each family's own keys, which layers are MoE, and top-k checked against the expert count."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from .config_values import FIX, get_bool, get_int, get_int_list


def read_experts(
    config: dict[str, Any], where: str, layers: int, *, family: str, width_key: str
) -> dict[str, Any]:
    """HParams' MoE fields for Mixtral / Qwen-MoE style configs: experts under
    num_local_experts or num_experts, MoE on every decoder_sparse_step-th layer not in
    mlp_only_layers, each expert `width_key` wide."""
    key = "num_local_experts" if config.get("num_local_experts") else "num_experts"
    num_experts = get_int(config, key, where, default=0, minimum=0)
    if num_experts <= 0:
        raise CheckpointError(f"{where}: {family} needs num_experts/num_local_experts > 0.")
    step = get_int(config, "decoder_sparse_step", where, default=1, minimum=0) or 1
    dense = set(get_int_list(config, "mlp_only_layers", where))
    top_k = get_int(config, "num_experts_per_tok", where, default=0, minimum=0)
    if top_k > num_experts:
        raise CheckpointError(
            f"{where}: num_experts_per_tok={top_k} is more than {key}={num_experts}. {FIX}"
        )
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": get_int(config, width_key, where, default=0, minimum=0),
        "n_group": get_int(config, "n_group", where, default=1, minimum=1)
        if config.get("n_group")
        else 1,  # expert groups: placement keeps them on nodes (--gpus-per-node)
        "norm_topk_prob": get_bool(config, "norm_topk_prob", where, default=False),
        "moe_layers": tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
    }
