"""`reshard profile layers`: time the runtime's own modules (runtime/model.py: the embedding,
one DecoderLayer of each distinct item kind, the final norm + head) at the model's real shapes
with random weights, from config.json alone, on CPU or CUDA (CUDA events there). Each piece is
built by `build_model` as a pipeline stage holding only that item, so memory is one layer's,
whatever the depth. Quantized checkpoints are timed dequantized, in the profile's dtype: the
runtime's verify path, not a quantized kernel. The result is the costs.json that
layout/stages/costs.py reads back; no stage is picked here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..dtypes import CAST_SIZES
from ..errors import InputError, ReshardIOError
from ..layout.stages.costs import (
    COSTS_FORMAT,
    COSTS_VERSION,
    _layers_by_kind,
    _tokens,
    _weight_bytes,
    item_kinds,
    model_shape,
)
from ..models.hparams import HParams
from ..models.shapes import synthesize_tensors, tensor_shape
from ..progress import progress_bar
from ..runtime.cache import KVCache, Step
from ..runtime.dist import Comm
from ..runtime.model import CausalLM, build_model


def profile_layers(
    hp: HParams,
    *,
    device: str = "cpu",
    batch: int = 1,
    seq: int = 128,
    mode: str = "prefill",
    warmup: int = 10,
    iters: int = 30,
    dtype: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Time one piece of each distinct item kind at the real shapes with random weights, and
    return the costs.json content. dtype defaults to bfloat16 on CUDA, float32 on CPU."""
    _tokens(batch, seq, mode)
    if warmup < 0 or iters < 1:
        raise InputError(f"warmup={warmup}, iters={iters}: need warmup >= 0 and iters >= 1.")
    dev = _torch_device(device)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in CAST_SIZES:
        raise InputError(f"dtype={dtype!r}: use one of {', '.join(CAST_SIZES)}.")
    factory = {"device": dev, "dtype": getattr(torch, dtype)}
    weights = dict(zip(item_kinds(hp), _weight_bytes(hp), strict=True))
    # Names and shapes of the dequantized (dense) tensors, the ones the runtime computes with.
    shapes = {
        n: shape for n, (_, shape) in synthesize_tensors(replace(hp, quantization=None)).items()
    }
    kinds = {}
    by_kind = _layers_by_kind(hp)
    with progress_bar(len(by_kind), desc="profile", unit="kind", enabled=progress) as bar:
        for kind, layers in by_kind.items():
            run = _build_run(hp, shapes, kind, layers, (batch, seq, mode), factory)
            times = _time_us(run, dev, warmup, iters)
            kinds[kind] = {**_summarise(times), "weight_bytes": weights[kind], "layers": layers}
            del run
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            bar.update(1)
    return {
        "format": COSTS_FORMAT,
        "version": COSTS_VERSION,
        "model": model_shape(hp),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
        "dtype": dtype,
        "torch": torch.__version__,
        "batch": batch,
        "seq": seq,
        "mode": mode,
        "warmup": warmup,
        "iters": iters,
        "kinds": kinds,
    }


def _build_run(
    hp: HParams,
    shapes: dict[str, tuple[int, ...]],
    kind: str,
    layers: list[int],
    work: tuple[int, int, str],
    factory: dict,
) -> Callable[[], torch.Tensor]:
    """A no-argument call running one forward of the item kind's runtime module on ready
    inputs. work: (batch, seq, mode)."""
    batch, seq, mode = work
    new = seq if mode == "prefill" else 1  # tokens per sequence this step
    piece = build_piece(hp, shapes, kind, layers, factory)
    if kind == "embed":
        ids = torch.randint(hp.vocab_size, (batch, new), device=factory["device"])
        return _inference(lambda: piece.embed(ids))
    x = torch.randn(batch, new, hp.hidden_size, **factory)  # x: [B, S, H]
    if kind == "head":
        return _inference(lambda: piece.logits(x))  # engines take the last position's logits
    layer = piece.model.layers[str(layers[0])]  # the runtime's DecoderLayer
    cache = KVCache(batch, seq, factory["device"])
    step = _begin_step(cache, hp, batch, seq - new)
    full, sliding = piece.rotary(x, step)  # once per stage in the runtime: not timed here
    rope = sliding if layer.sliding else full  # as CausalLM.forward picks it
    return _inference(lambda: layer(x, rope, step, cache))


def build_piece(
    hp: HParams, shapes: dict[str, tuple[int, ...]], kind: str, layers: list[int], factory: dict
) -> CausalLM:
    """The runtime's stage holding only this item kind (one layer of a layer kind), with
    random weights of the real shapes. Each piece is a stage of a 3-stage pipeline, as the
    streamed reference builds them (runtime/streamed.py)."""
    if kind == "embed":
        names, stage = ["model.embed_tokens.weight"], 0
    elif kind == "head":  # the last stage holds lm_head even when the embeddings are tied
        names, stage = ["model.norm.weight", "lm_head.weight"], 2
        shapes = {**shapes, "lm_head.weight": tensor_shape(hp, "lm_head.weight")}
    else:
        prefix = f"model.layers.{layers[0]}."
        names, stage = [n for n in shapes if n.startswith(prefix)], 1
    tensors = {n: _random_tensor(n, shapes[n], factory) for n in names}
    comm = Comm(pp=3, pp_stage=stage)
    return build_model(hp, tensors, comm=comm, where=f"profile of {hp.architecture} ({kind})")


def _random_tensor(name: str, shape: tuple[int, ...], factory: dict) -> torch.Tensor:
    """Unit-scale activations (no overflow, no denormals to slow a CPU): matrices ~ N(0,
    1/fan_in), norm weights 1, biases 0."""
    if len(shape) == 1:
        return (torch.zeros if name.endswith("bias") else torch.ones)(shape, **factory)
    return torch.empty(shape, **factory).normal_(0.0, shape[-1] ** -0.5)


def _begin_step(cache: KVCache, hp: HParams, batch: int, context: int) -> Step:
    """The runtime's step for the new tokens after `context` cached ones (decode: seq - 1)."""
    device = cache.valid.device
    if context:
        cache.begin_step(torch.ones(batch, context, dtype=torch.bool, device=device), None)
    new = cache.max_len - context
    return cache.begin_step(
        torch.ones(batch, new, dtype=torch.bool, device=device), hp.sliding_window
    )


def _torch_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device={device!r} is not a torch device; use cpu or cuda[:N].") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReshardIOError(
            f"device={device!r} but this torch sees no CUDA GPU. Run on a GPU node or use "
            "--device cpu."
        )
    return dev


def _inference(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return fn()

    return run


def _time_us(run: Callable[[], Any], dev: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        run()
    if dev.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e6)
        return times
    # Events recorded back to back and read after one sync: GPU time, launch latency hidden.
    events = []
    torch.cuda.synchronize(dev)
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(dev)
    return [start.elapsed_time(end) * 1000 for start, end in events]


def _summarise(times_us: list[float]) -> dict[str, float]:
    if len(times_us) < 2:
        return {"median_us": times_us[0], "iqr_us": 0.0}
    q1, median, q3 = statistics.quantiles(times_us, n=4, method="inclusive")
    return {"median_us": median, "iqr_us": q3 - q1}
