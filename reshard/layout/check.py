"""Can this model run in this layout at all: head counts and widths against tp (and ep), pp
against the layers, --dtype against quantized weights, ep against a dense model. Checked
once, before stages are solved or a byte is read; each refusal names the numbers and a fix.
"""

from __future__ import annotations

from ..errors import LayoutError
from ..models.hparams import HParams
from .quant_splits import split_problems
from .recipe import Recipe


def valid_tp(hp: HParams, limit: int = 128) -> list[int]:
    """Every tp up to `limit` that the head counts and MLP widths allow."""
    return [t for t in range(1, limit + 1) if not _tp_problems(hp, t)]


def _tp_problems(hp: HParams, tp: int, ep: int = 1) -> list[str]:
    problems = []
    if hp.num_heads % tp:
        problems.append(f"num_attention_heads={hp.num_heads} is not divisible by tp={tp}")
    kv = hp.num_kv_heads
    if kv % tp and tp % kv:
        problems.append(
            f"num_key_value_heads={kv} neither divides nor is divisible by tp={tp} "
            "(kv heads are split when kv >= tp, replicated when tp % kv == 0)"
        )
    if (
        hp.intermediate_size
        and hp.intermediate_size % tp
        and hp.moe_layers != tuple(range(hp.num_layers))
    ):
        problems.append(f"intermediate_size={hp.intermediate_size} is not divisible by tp={tp}")
    linear_keys = hp.linear_num_key_heads
    if linear_keys and linear_keys % tp:
        problems.append(
            f"linear_num_key_heads={linear_keys} is not divisible by tp={tp} (linear-attention "
            "layers split on whole key heads with their value heads)"
        )
    etp = tp // ep
    if hp.moe_intermediate_size and hp.moe_intermediate_size % etp:
        problems.append(
            f"moe_intermediate_size={hp.moe_intermediate_size} is not divisible by the "
            f"expert tp={etp} (tp/ep)"
        )
    shared = hp.shared_expert_intermediate_size
    if shared and shared % tp:
        problems.append(f"shared_expert_intermediate_size={shared} is not divisible by tp={tp}")
    return problems + split_problems(hp, tp, ep)


def check_layout(hp: HParams, recipe: Recipe) -> None:
    problems = _tp_problems(hp, recipe.tp, recipe.ep)
    if problems:
        raise LayoutError(
            f"tp={recipe.tp} does not fit {hp.architecture}: {'; '.join(problems)}. "
            f"Valid tp for this model: {', '.join(map(str, valid_tp(hp, 64)))}."
        )
    if recipe.pp > hp.num_layers:
        raise LayoutError(
            f"pp={recipe.pp} exceeds the {hp.num_layers} decoder layers; each stage needs at "
            f"least one layer. Use pp <= {hp.num_layers}."
        )
    if recipe.dtype != "keep" and hp.quantization:
        raise LayoutError(
            f"--dtype {recipe.dtype}: {hp.architecture} is quantized "
            f"({hp.quantization.kind}); convert keeps quantized weights and their scales as "
            'they are and never casts them. Drop --dtype (or set dtype = "keep").'
        )
    if recipe.ep > 1 and not hp.is_moe:
        raise LayoutError(
            f"ep={recipe.ep} needs a mixture-of-experts model; {hp.architecture} is dense. "
            "Drop --ep."
        )
