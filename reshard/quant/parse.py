"""config.json's `quantization_config` read into a QuantScheme, one parser per quant_method,
each refusing a scheme reshard cannot split with the key that says so. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .compressed import parse_int
from .format import names_list
from .nvfp4 import parse_compressed as parse_nvfp4
from .nvfp4 import parse_modelopt
from .scheme import PACK, QuantScheme


def parse_quantization(config: dict[str, Any], *, where: str) -> QuantScheme | None:
    """config.json's quantization_config -> its QuantScheme (None: not quantized).
    Raises naming the key for a scheme reshard cannot split."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise UnsupportedModelError(
            f"{where}: quantization_config is {type(qc).__name__} {qc!r}, not an object. "
            "Re-download config.json."
        )
    method = str(qc.get("quant_method", "")).lower()
    parsers = {"fp8": _parse_fp8, "compressed-tensors": _parse_compressed, "awq": _parse_awq}
    parsers |= {"gptq": _parse_gptq, "modelopt": _parse_modelopt, "modelopt_fp4": _parse_modelopt}
    parsers["mxfp4"] = lambda qc, where: QuantScheme("mxfp4")
    if method not in parsers:
        raise UnsupportedModelError(
            f"{where}: quantization_config.quant_method={method!r} is not supported. "
            "Supported: fp8 (per-tensor or weight_block_size), compressed-tensors (FP8 tensor "
            "or channel, int4/int8 pack-quantized, int8 int-quantized, nvfp4-pack-quantized), "
            "modelopt (NVFP4), awq (gemm, 4 bit), gptq (4 bit), mxfp4."
        )
    return parsers[method](qc, where)


def _parse_fp8(qc: dict, where: str) -> QuantScheme:
    block = qc.get("weight_block_size")
    static = qc.get("activation_scheme", "dynamic") == "static"
    if not block:
        return QuantScheme("fp8_tensor", input_scale=static)
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(type(b) is int and b > 0 for b in block)
    ):
        raise UnsupportedModelError(
            f"{where}: quantization_config.weight_block_size={block!r} must be two positive "
            "integers [block_n, block_k]."
        )
    return QuantScheme("fp8_block", block=(block[0], block[1]), input_scale=static)


def _parse_modelopt(qc: dict, where: str) -> QuantScheme:
    return QuantScheme(**parse_modelopt(qc, where))


def _parse_compressed(qc: dict, where: str) -> QuantScheme:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        what = f"is {groups!r}, not an object of groups"
        if isinstance(groups, dict):
            what = f"holds {len(groups)} groups {sorted(groups)}"
        raise UnsupportedModelError(
            f"{where}: compressed-tensors config_groups {what}; reshard splits a checkpoint "
            "quantized with one group (one scheme for every quantized linear)."
        )
    group = next(iter(groups.values()))
    group = group if isinstance(group, dict) else {}
    w = group.get("weights") if isinstance(group.get("weights"), dict) else {}
    fmt = str(group.get("format") or qc.get("format", ""))
    rules = {"ignore": names_list(qc, "ignore", where)}
    rules["targets"] = names_list(group, "targets", where)
    if w.get("type") == "int":
        return QuantScheme(**parse_int(group, fmt, where), **rules)
    if w.get("type") == "float" and w.get("num_bits") == 4:
        return QuantScheme(**parse_nvfp4(group, fmt, where), **rules)
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise UnsupportedModelError(
            f"{where}: compressed-tensors weights type={w.get('type')!r} "
            f"num_bits={w.get('num_bits')!r}: reshard splits int (4 or 8 bit), "
            "float 8 bit (FP8) and float 4 bit (NVFP4) weights."
        )
    strategy = w.get("strategy")
    if strategy not in ("tensor", "channel"):
        raise UnsupportedModelError(
            f"{where}: compressed-tensors weights.strategy={strategy!r}: reshard splits "
            "'tensor' and 'channel' FP8 (block FP8: use quant_method fp8)."
        )
    acts = group.get("input_activations")
    static = isinstance(acts, dict) and not acts.get("dynamic", True)
    kind = "fp8_channel" if strategy == "channel" else "fp8_tensor"
    return QuantScheme(kind, input_scale=static)


def _parse_int4(qc: dict, where: str, method: str) -> int:
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    if bits != 4:
        raise UnsupportedModelError(
            f"{where}: {method} bits={bits!r}: reshard splits 4-bit {method} only."
        )
    if not isinstance(group, int) or group <= 0 or group % PACK:
        raise UnsupportedModelError(
            f"{where}: {method} group_size={group!r}: reshard needs a positive multiple of "
            f"{PACK} (group_size -1, one group per row, is not supported)."
        )
    return group


def _parse_awq(qc: dict, where: str) -> QuantScheme:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or qc.get("zero_point", True) is False:
        raise UnsupportedModelError(
            f"{where}: awq version={version!r} zero_point={qc.get('zero_point')!r}: reshard "
            "splits the GEMM layout with zero points only."
        )
    return QuantScheme("awq", group_size=_parse_int4(qc, where, "awq"))


def _parse_gptq(qc: dict, where: str) -> QuantScheme:
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise UnsupportedModelError(
            f"{where}: gptq checkpoint_format={fmt!r}: reshard reads the 'gptq' (v1) format."
        )
    group = _parse_int4(qc, where, "gptq")
    return QuantScheme("gptq", group_size=group, desc_act=bool(qc.get("desc_act", False)))
