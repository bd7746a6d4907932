"""config.json against the tensors, before planning: every shape the config implies, and the
dtypes the runtime can load. A contradiction here used to convert "fine" and then drop a
vocab row silently or crash the generate tier; now it names the tensor, the config keys and
both numbers, each shape from the tensor's rule (models/dims.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..dtypes import FLOAT_CODES, PLAIN_FLOAT_CODES
from ..errors import CheckpointError
from ..quant import check_parts, logical_shape
from .dims import labelled_shape
from .family import Rule
from .hparams import HParams
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
        _check_shape(hp, roles[name].rule, name, tuple(shape), files[name], config)
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
            _check_shape(hp, role.rule, role.logical, logical, files[name], config)


def _check_shape(hp: HParams, rule: Rule, name: str, shape: tuple, where: str, config: str):
    expected = labelled_shape(hp, rule)
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
