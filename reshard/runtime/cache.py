"""KV cache of one pipeline stage and the per-step attention masks and RoPE positions.

Prompts of different lengths are left-padded into one batch. `valid` marks real tokens;
positions count real tokens only, so a padded row sees the same positions (and the same
sliding window) as the prompt run alone. A padding query attends only to itself, which keeps
softmax finite; real queries never see padding keys. No eviction: the cache is preallocated
for prompt + new tokens and a sliding window is applied by the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Step:
    """What every layer needs for one forward step of S new tokens."""

    start: int  # cache index of the first new token
    positions: torch.Tensor  # [B, S] RoPE positions
    mask: torch.Tensor  # [B, 1, S, T] bool, True = may attend (T = start + S)
    sliding_mask: torch.Tensor | None  # same, restricted to the sliding window
    token_valid: torch.Tensor  # [B, S] bool, False for padding


class KVCache:
    """Preallocated keys/values per layer: [B, kv_heads_local, max_len, head_dim] (v may be
    narrower than k: MLA's v_head_dim)."""

    def __init__(self, batch: int, max_len: int, device: torch.device | str) -> None:
        self.batch, self.max_len = batch, max_len
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Linear-attention layers: a fixed state per sequence instead of keys and values,
        # (conv inputs [B, C, K-1], recurrent state [B, heads, k, v]) (runtime/deltanet.py).
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_step(self, token_valid: torch.Tensor, window: int | None) -> Step:
        """Reserve S slots for the new tokens (token_valid: [B, S]) and build masks/positions."""
        start, end = self.length, self.length + token_valid.shape[1]
        assert end <= self.max_len, f"KV cache of {self.max_len} slots overflows at {end}"
        self.valid[:, start:end] = token_valid
        self.length = end
        positions = (self.valid[:, :end].long().cumsum(dim=1) - 1).clamp(min=0)[:, start:end]
        mask = _attention_mask(self.valid[:, :end], start, None)
        sliding = _attention_mask(self.valid[:, :end], start, window) if window else None
        return Step(start, positions, mask, sliding, token_valid)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kvh, S, hd] at `start`; return all keys/values so far [B, kvh, T, hd]."""
        if layer not in self.layers:  # k and v widths differ under MLA
            shape = (self.batch, k.shape[1], self.max_len)
            self.layers[layer] = (k.new_zeros(*shape, k.shape[3]), v.new_zeros(*shape, v.shape[3]))
        k_all, v_all = self.layers[layer]
        end = start + k.shape[2]
        k_all[:, :, start:end] = k
        v_all[:, :, start:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]


def _attention_mask(valid: torch.Tensor, start: int, window: int | None) -> torch.Tensor:
    """valid: [B, T] -> [B, 1, S, T] for queries at cache indices start..T-1."""
    total = valid.shape[1]
    q_idx = torch.arange(start, total, device=valid.device)[:, None]  # [S, 1]
    k_idx = torch.arange(total, device=valid.device)[None, :]  # [1, T]
    allowed = (k_idx <= q_idx) & valid[:, None, :]  # [B, S, T]
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed | (k_idx == q_idx)  # padding queries see themselves only
    return allowed[:, None]


def pad_left(prompts: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Left-pad prompts: ids [B, S] (pad id 0) and valid [B, S] bool."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        valid[row, width - len(prompt) :] = True
    return ids.to(device), valid.to(device)
