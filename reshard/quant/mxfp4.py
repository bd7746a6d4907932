"""MXFP4 (config.json `quant_method: mxfp4`, gpt-oss's routed experts): a weight `W` stored
[E, in, out] in the float checkpoint is stored as `W_blocks` uint8 [E, out, in/32, 16] (32
fp4 e2m1 values a block, two a byte, low nibble first) and `W_scales` uint8 [E, out, in/32]
(one e8m0 exponent a block, bias 127). A split along `in` must keep whole 32-value blocks;
along `out` or the experts any cut is fine. Pure: no I/O, no torch (runtime/dequant.py
dequantizes, only to verify).
"""

from __future__ import annotations

from ..errors import LayoutError

BLOCK = 32  # fp4 values per block: one scale each
BLOCK_BYTES = BLOCK // 2
PARTS = ("mx_blocks", "mx_scales")
SUFFIXES = {"_blocks": "mx_blocks", "_scales": "mx_scales"}


def split_name(module: str, leaf: str, names) -> tuple[str, str] | None:
    """(logical `module.W`, part) of `module.W_blocks` / `module.W_scales` (a lone one too,
    so the check of parts names its missing sibling); None otherwise."""
    for suffix, part in SUFFIXES.items():
        base = leaf.removesuffix(suffix)
        if base and base != leaf:
            return f"{module}.{base}", part
    return None


def stored_tensors(name: str, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Logical `name` [E, in, out] -> {stored name: ("U8", stored shape)}."""
    experts, inn, out = shape
    return {
        f"{name}_blocks": ("U8", (experts, out, inn // BLOCK, BLOCK_BYTES)),
        f"{name}_scales": ("U8", (experts, out, inn // BLOCK)),
    }


def logical_shape(name: str, tensors) -> tuple[int, int, int]:
    """[E, in, out] of logical `name` from its blocks' shape in `tensors` (name -> (dtype,
    shape))."""
    experts, out, blocks, _ = tensors[f"{name}_blocks"][1]
    return experts, blocks * BLOCK, out


# logical dim -> (stored dim, unit): experts stay dim 0, `in` is stored dim 2 in blocks,
# `out` is stored dim 1.
_DIMS = {0: (0, 1), 1: (2, BLOCK), 2: (1, 1)}


def stored_pieces(role, pieces, logical, stored):
    """Map pieces of the logical [E, in, out] weight onto part `role.part` ([E, out, in/32,
    16] or [E, out, in/32]): (pieces, local stored shape). Refuses a range that cuts a block
    (split_problems refuses such layouts from config.json first)."""
    out, local = [], list(stored)
    for p in pieces:
        start, stop, dest = [0] * len(stored), list(stored), [0] * len(stored)
        for dim, (sdim, unit) in _DIMS.items():
            lo, hi = p.start[dim], p.stop[dim]
            if lo % unit or hi % unit:
                raise LayoutError(
                    f"tensor '{role.name}': this rank's input columns {lo}:{hi} of "
                    f"'{role.logical}' ({hi - lo} per rank) cut an mxfp4 block of {unit}. "
                    f"Choose an expert tp (tp/ep) that leaves a multiple of {unit} per rank."
                )
            start[sdim], stop[sdim] = lo // unit, hi // unit
            dest[sdim] = p.dest[dim] // unit
            if dim:
                local[sdim] = (hi - lo) // unit
        out.append(type(p)(role.name, tuple(start), tuple(stop), tuple(dest)))
    local[0] = max((p.dest[0] + 1 for p in pieces), default=0)
    return tuple(out), tuple(local)


def split_problems(hp, tp: int, ep: int, expert_eps) -> list[str]:
    """The experts' `in` split (down_proj: intermediate_size / expert tp) must keep whole
    blocks; attention, router and embeddings are not quantized."""
    etp = tp // ep if ep and tp % ep == 0 else tp
    width = hp.moe_intermediate_size
    if etp <= 1 or width % etp or (width // etp) % BLOCK == 0:
        return []
    layer = hp.moe_layers[0]
    line = (
        f"tensor 'model.layers.{layer}.mlp.experts.down_proj_blocks' (and every MoE layer's "
        f"alike) would hold {width // etp} of its {width} input columns per rank (split {etp} "
        f"ways), not a multiple of the mxfp4 block size {BLOCK}"
    )
    fits = expert_eps(hp, tp, (1, BLOCK))
    if fits:
        line += f"; with tp={tp} these fit: " + ", ".join(
            f"--ep {e} (expert tp {tp // e})" for e in fits
        )
    return [line]
