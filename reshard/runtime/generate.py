"""Batched greedy generation over one pipeline stage, identical on every rank of a replica.

The prompts are left-padded into one batch (see cache.py). Each step: the first stage embeds
ids, middle stages receive hidden states from the previous stage and send theirs on, the last
stage computes logits and (pp > 1) broadcasts the next ids to every rank of the replica.
Decoding always runs `max_new_tokens` steps; there is no EOS stop, so outputs compare 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError, UnsupportedModelError
from ..models.hparams import HParams
from .cache import KVCache, pad_left
from .model import CausalLM
from .rope import rope_position_limit


@dataclass
class PromptResult:
    """One prompt's greedy continuation. logits[k] chose tokens[k]: row 0 is the prompt's
    last position, row k the position of generated token k-1. float32, [max_new_tokens, V]."""

    index: int  # position of the prompt in the caller's list
    prompt: list[int]
    tokens: list[int]
    logits: torch.Tensor


def check_prompts(prompts: list[list[int]], vocab_size: int, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}; generate at least 1 token.")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise InputError(f"prompt {i} is empty; every prompt needs at least one token id.")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise InputError(
                f"prompt {i} has token ids outside [0, {vocab_size}) (vocab_size of the model)."
            )


def check_new_tokens(max_new_tokens: int, max_positions: int, *, where: str) -> None:
    """At least 1 new token, and room for it and a prompt token in the model's positions
    (config.json max_position_embeddings): refused before any model is loaded."""
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token.")
    if max_new_tokens >= max_positions:
        digits = len(str(max_new_tokens))
        shown = max_new_tokens if digits < 20 else f"(a number of {digits} digits)"
        raise InputError(
            f"--max-new-tokens {shown}: {where} holds {max_positions} positions "
            f"(max_position_embeddings), and a prompt token comes first; give at most "
            f"{max_positions - 1}."
        )


def check_rope_positions(hp: HParams, prompts: list[list[int]], max_new_tokens: int) -> None:
    """The last step feeds position len + new - 2, so transformers' rope sees len + new - 1."""
    limit = rope_position_limit(hp)
    longest = max(len(p) for p in prompts) + max_new_tokens - 1
    if limit is not None and longest > limit:
        i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
        raise UnsupportedModelError(
            f"{hp.architecture}: rope type 'longrope' runs only up to "
            f"original_max_position_embeddings={limit} positions here (its short_factor; "
            f"past it transformers switches every position to long_factor); prompt {i} of "
            f"{len(prompts[i])} tokens + {max_new_tokens} new tokens needs {longest}. Use "
            "shorter prompts or fewer --max-new-tokens."
        )


@torch.inference_mode()
def generate_greedy(
    stage: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    indices: list[int] | None = None,
    bar=None,
) -> list[PromptResult]:
    """Greedy decode on this rank. Returns results on the last stage, [] on the others.
    `bar` (a tqdm or None) advances by one token per prompt per step."""
    check_prompts(prompts, stage.hp.vocab_size, max_new_tokens)
    check_rope_positions(stage.hp, prompts, max_new_tokens)
    device = stage.device
    ids, valid = pad_left(prompts, device)  # [B, S] each
    cache = KVCache(len(prompts), ids.shape[1] + max_new_tokens, device)
    tokens, rows = [], []
    for _ in range(max_new_tokens):
        logits = run_step(stage, ids, valid, cache)  # [B, V] on the last stage, else None
        next_ids = logits.argmax(dim=-1) if logits is not None else None
        next_ids = stage.comm.broadcast_tokens(next_ids, len(prompts), device)  # [B]
        tokens.append(next_ids)
        rows.append(logits)
        if bar is not None:
            bar.update(len(prompts))
        ids, valid = next_ids[:, None], torch.ones_like(next_ids[:, None], dtype=torch.bool)
    if not stage.has_head:
        return []
    return _collect(prompts, indices or list(range(len(prompts))), tokens, rows)


def run_step(
    stage: CausalLM, ids: torch.Tensor, valid: torch.Tensor, cache: KVCache
) -> torch.Tensor | None:
    """One forward step of this stage; last-position logits [B, V] on the last stage."""
    step = cache.begin_step(valid, stage.hp.sliding_window)
    x = ids
    if not stage.has_embed:
        expected = (ids.shape[0], ids.shape[1], stage.hp.hidden_size)
        x = stage.comm.recv_hidden(expected, stage.dtype, stage.device)  # [B, S, H]
    out = stage(x, step, cache, last_only=True)
    if not stage.has_head:
        stage.comm.send_hidden(out)
        return None
    return out[:, -1]


def _collect(
    prompts: list[list[int]], indices: list[int], tokens: list, rows: list
) -> list[PromptResult]:
    tokens_t = torch.stack(tokens, dim=1).cpu()  # [B, N]
    logits_t = torch.stack(rows, dim=1).float().cpu()  # [B, N, V]
    return [
        PromptResult(indices[b], list(prompts[b]), tokens_t[b].tolist(), logits_t[b])
        for b in range(len(prompts))
    ]


@torch.inference_mode()
def forward_logits(stage: CausalLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All-position logits of each prompt, [len_i, V] float32 (single-stage models only)."""
    check_prompts(prompts, stage.hp.vocab_size, 1)
    check_rope_positions(stage.hp, prompts, 1)
    if not (stage.has_embed and stage.has_head):
        raise InputError("forward_logits needs the whole model on one stage (pp = 1).")
    ids, valid = pad_left(prompts, stage.device)
    cache = KVCache(len(prompts), ids.shape[1], stage.device)
    logits = stage(ids, cache.begin_step(valid, stage.hp.sliding_window), cache, last_only=False)
    return [logits[b, valid[b]].float().cpu() for b in range(len(prompts))]
