"""`reshard profile layers`: time one module of each distinct item kind at the model's real
shapes with random weights, from config.json alone, on CPU or CUDA (CUDA events there).
The result is the costs.json that layout/stages/costs.py reads back; no stage is picked here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, ReshardIOError
from ..layout.stages.costs import (
    COSTS_FORMAT,
    COSTS_VERSION,
    _layers_by_kind,
    _tokens,
    _top_k,
    _weight_bytes,
    item_kinds,
    model_shape,
)
from ..models.hparams import DTYPE_BYTES, HParams
from ..progress import progress_bar

# ---- profiling -----------------------------------------------------------------------------
# Self-contained modules with the decoder's math (GQA attention with RoPE, RMSNorm, SwiGLU or
# routed experts), built from config.json alone with random weights.


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, S, hd]; cos/sin: [S, hd] (HF's rotate_half convention)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Attention(nn.Module):
    def __init__(self, hp: HParams, layer: int, **factory: Any) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = hp.num_heads, hp.num_kv_heads, hp.head_dim
        # q/k/v fused into one matmul: the same FLOPs and bytes as three.
        qkv = hp.q_size + 2 * hp.kv_size
        self.qkv = nn.Linear(hp.hidden_size, qkv, bias=hp.attention_bias, **factory)
        self.o = nn.Linear(hp.q_size, hp.hidden_size, bias=hp.o_bias, **factory)
        qk = (_RMSNorm(self.hd, hp.rms_norm_eps, **factory) for _ in range(2))
        self.q_norm, self.k_norm = qk if hp.qk_norm else (nn.Identity(), nn.Identity())
        sliding = hp.layer_types[layer] == "sliding_attention"
        self.window = hp.sliding_window if sliding else None

    def forward(self, x: torch.Tensor, rope: tuple, cache: tuple | None) -> torch.Tensor:
        b, s, _ = x.shape  # x: [B, S, H]
        q, k, v = self.qkv(x).split([self.heads * self.hd, *[self.kv_heads * self.hd] * 2], -1)
        q = self.q_norm(q.view(b, s, self.heads, self.hd)).transpose(1, 2)  # [B, nh, S, hd]
        k = self.k_norm(k.view(b, s, self.kv_heads, self.hd)).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        if cache is None:
            out = self._prefill(q, k, v)
        else:  # decode: write the new K/V into the cache's last slot, attend over the window
            cache[0][:, :, -1:], cache[1][:, :, -1:] = k, v
            span = min(cache[0].shape[2], self.window or cache[0].shape[2])
            k, v = cache[0][:, :, -span:], cache[1][:, :, -span:]
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q.shape[2]
        if self.window is None or self.window >= s:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        pos = torch.arange(s, device=q.device)
        offset = pos[:, None] - pos[None, :]
        mask = (offset >= 0) & (offset < self.window)  # [S, S]: causal band
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class _MLP(nn.Module):
    def __init__(self, h: int, inter: int, bias: bool, **factory: Any) -> None:
        super().__init__()
        self.gate_up = nn.Linear(h, 2 * inter, bias=bias, **factory)
        self.down = nn.Linear(inter, h, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class _MoE(nn.Module):
    def __init__(self, hp: HParams, **factory: Any) -> None:
        super().__init__()
        h, n, inter = hp.hidden_size, hp.num_experts, hp.moe_intermediate_size
        self.top_k, self.norm_topk = _top_k(hp), hp.norm_topk_prob
        self.router = nn.Linear(h, n, bias=False, **factory)
        self.gate_up = nn.Parameter(torch.empty(n, 2 * inter, h, **factory).normal_(0, 0.02))
        self.down = nn.Parameter(torch.empty(n, h, inter, **factory).normal_(0, 0.02))
        shared = hp.shared_expert_intermediate_size
        self.shared = _MLP(h, shared, False, **factory) if shared else None
        self.shared_gate = nn.Linear(h, 1, bias=False, **factory) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        probs = self.router(flat).softmax(-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        # A loop over the experts some token picked: only those are read, as in fused kernels,
        # though each costs its own launches (an upper bound on a fused kernel's time).
        for e in experts.unique().tolist():
            tok, slot = (experts == e).nonzero(as_tuple=True)
            gate, up = (flat[tok] @ self.gate_up[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.down[e].T
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(flat)) * self.shared(flat)
        return out.view_as(x)


class _Layer(nn.Module):
    def __init__(self, hp: HParams, layer: int, **factory: Any) -> None:
        super().__init__()
        self.norm1 = _RMSNorm(hp.hidden_size, hp.rms_norm_eps, **factory)
        self.attn = _Attention(hp, layer, **factory)
        self.norm2 = _RMSNorm(hp.hidden_size, hp.rms_norm_eps, **factory)
        if layer in hp.moe_layers:
            self.mlp: nn.Module = _MoE(hp, **factory)
        else:
            self.mlp = _MLP(hp.hidden_size, hp.intermediate_size, hp.mlp_bias, **factory)

    def forward(self, x: torch.Tensor, rope: tuple, cache: tuple | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))


class _Head(nn.Module):
    def __init__(self, hp: HParams, **factory: Any) -> None:
        super().__init__()
        self.norm = _RMSNorm(hp.hidden_size, hp.rms_norm_eps, **factory)
        self.lm_head = nn.Linear(hp.hidden_size, hp.vocab_size, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x)[:, -1])  # logits at each sequence's last position only


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
    """Time one module of each distinct item kind at the real shapes with random weights, and
    return the costs.json content. dtype defaults to bfloat16 on CUDA, float32 on CPU."""
    _tokens(batch, seq, mode)
    if warmup < 0 or iters < 1:
        raise InputError(f"warmup={warmup}, iters={iters}: need warmup >= 0 and iters >= 1.")
    dev = _torch_device(device)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in DTYPE_BYTES:
        raise InputError(f"dtype={dtype!r}: use one of {', '.join(DTYPE_BYTES)}.")
    factory = {"device": dev, "dtype": getattr(torch, dtype)}
    weights = dict(zip(item_kinds(hp), _weight_bytes(hp), strict=True))
    kinds = {}
    by_kind = _layers_by_kind(hp)
    with progress_bar(len(by_kind), desc="profile", unit="kind", enabled=progress) as bar:
        for kind, layers in by_kind.items():
            run = _build_run(hp, kind, layers, batch, seq, mode, factory)
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
    hp: HParams, kind: str, layers: list[int], batch: int, seq: int, mode: str, factory: dict
) -> Callable[[], torch.Tensor]:
    """A no-argument call running one forward of the item kind on ready inputs."""
    new = seq if mode == "prefill" else 1  # tokens per sequence this step
    if kind == "embed":
        module = nn.Embedding(hp.vocab_size, hp.hidden_size, **factory)
        ids = torch.randint(hp.vocab_size, (batch, new), device=factory["device"])
        return _inference(lambda: module(ids))
    x = torch.randn(batch, new, hp.hidden_size, **factory)  # x: [B, S, H]
    if kind == "head":
        head = _Head(hp, **factory)
        return _inference(lambda: head(x))
    layer = _Layer(hp, layers[0], **factory)
    rope = _rope(hp, seq - new, seq, factory)
    cache = None
    if mode == "decode":  # a KV cache of `seq` positions, the last one for the new token
        shape = (batch, hp.num_kv_heads, seq, hp.head_dim)
        cache = (torch.randn(shape, **factory), torch.randn(shape, **factory))
    return _inference(lambda: layer(x, rope, cache))


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


def _rope(hp: HParams, start: int, end: int, factory: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # cos/sin for positions [start, end): [S, hd]. Computed once, like the model-level rotary.
    hd, dev = hp.head_dim, factory["device"]
    inv = 1.0 / hp.rope_theta ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(start, end, device=dev, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(factory["dtype"]), angles.sin().to(factory["dtype"])


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
