"""How a split of a quantized weight's logical [out, in] maps onto each stored part, in whole
blocks, packs or groups: the per-tensor check at slicing time (plan), behind the config-level
refusals of layout/quant_splits.py. Pure: no I/O, no torch.
"""

from __future__ import annotations

from ..errors import LayoutError
from . import mxfp4
from .scheme import FORMATS, PACK, QuantScheme


# part -> (logical dim 0 = out, logical dim 1 = in) -> (stored dim, unit) or None (kept whole).
def _part_map(scheme: QuantScheme, part: str) -> tuple:
    if scheme.kind in FORMATS:
        return FORMATS[scheme.kind].part_map(scheme, part)
    g = scheme.group_size
    bn, bk = scheme.block or (1, 1)
    table = {
        "weight": ((0, 1), (1, 1)),
        "scale_inv": ((0, bn), (1, bk)),
        "weight_scale": ((0, 1), None) if scheme.kind == "fp8_channel" else (None, None),
        "input_scale": (None, None),
        "qzeros": ((1, PACK), None if scheme.desc_act else (0, g)),
        "scales": ((1, 1), None if scheme.desc_act else (0, g)),
        "g_idx": (None, (0, 1)),
    }
    table["qweight"] = ((1, PACK), (0, 1)) if scheme.kind == "awq" else ((1, 1), (0, PACK))
    return table[part]


def stored_slice(
    scheme: QuantScheme, role, lo: int, hi: int, dim: int, logical, stored
) -> tuple[int, int, int] | None:
    """The logical range [lo, hi) along `dim` of the weight -> (stored dim, start, stop) of
    part `role.part`, or None when that part is kept whole. Refuses a range that would cut a
    block, pack or group."""
    rule = _part_map(scheme, role.part)[dim]
    if rule is None:
        return None
    sdim, unit = rule
    if lo % unit or (hi % unit and hi != logical[dim]):
        what = "rows" if dim == 0 else "columns"
        raise LayoutError(
            f"tensor '{role.name}': this rank's {what} {lo}:{hi} of '{role.logical}' "
            f"({hi - lo} per rank) cut a {scheme.kind} unit of {unit} {what}. Choose a "
            f"tp (or an expert tp = tp/ep) that leaves a multiple of {unit} per rank."
        )
    return sdim, lo // unit, min(-(-hi // unit), stored[sdim])


def stored_pieces(scheme: QuantScheme, role, pieces, logical, stored):
    """Map the pieces of the logical weight (at most one cut dim) onto part `role.part`:
    (pieces, local stored shape)."""
    if scheme.kind == "mxfp4":  # gpt-oss's [E, in, out] experts: quant/mxfp4.py
        return mxfp4.stored_pieces(role, pieces, logical, stored)
    out = []
    local = list(stored)
    for p in pieces:
        start, stop = [0] * len(stored), list(stored)
        for dim in (0, 1):
            if p.stop[dim] - p.start[dim] == logical[dim]:
                continue
            cut = stored_slice(scheme, role, p.start[dim], p.stop[dim], dim, logical, stored)
            if cut is not None:
                sdim, a, b = cut
                start[sdim], stop[sdim] = a, b
                local[sdim] = b - a
        out.append(type(p)(role.name, tuple(start), tuple(stop), tuple(0 for _ in stored)))
    return tuple(out), tuple(local)
