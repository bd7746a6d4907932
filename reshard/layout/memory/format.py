"""Text and JSON views of `reshard plan`: the per-rank memory table and verdict, the stage report
with a cost/memory bar per stage, the expert placement report, and the `--suggest` result.
Formatting only: no decisions, no I/O. Sizes are decimal GB, as GPUs are sold.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ...units import GB, format_gb
from ..experts.report import format_placement_report
from ..gpus import GPUS
from .activation import EngineLimits, engine_defaults
from .model import DEFAULT_UTILIZATION, Gpu, KvBudget, MemoryReport, RankMemory, kv_bytes_per_token
from .shapes import PlanMemory
from .suggest import Candidate, Rejection, Suggestion, why_not

BAR = 20  # characters per bar


def gb(n: float) -> str:
    return format_gb(n, tiny=True)


def format_plan(pm: PlanMemory) -> str:
    mem, lay = pm.memory, pm.memory.plan.layout
    lines = [
        f"model     {pm.shapes.model}: {pm.shapes.hparams.architecture}, from {pm.shapes.origin}",
        f"layout    tp {lay.tp} x pp {lay.pp} x dp {lay.dp} = {lay.world_size} GPUs (ep {lay.ep})"
        f", weights written as {_written_dtype(mem)}",
        f"weights   {gb(mem.weight_bytes_total)} written in all (one replica's files)",
        f"KV cache  {_kv_line(mem.budget, pm.context_origin)}, "
        f"{_kv_per_token(mem):,} B a token over all ranks",
        f"GPU       {_gpu_line(mem.gpu)}",
        f"engine    {_engine_line(mem.limits)}",
        "",
        *_rank_table(mem),
        _verdict(mem),
        *(f"note: {n}" for n in pm.notes),
    ]
    if lay.pp > 1:
        lines += ["", f"stages    cost: {pm.stages.cost_source}", pm.stages.report.render()]
        lines += ["", *_balance_bars(pm)]
    if pm.placement is not None:
        lines += ["", format_placement_report(pm.placement)]
    return "\n".join(lines)


def _written_dtype(mem: MemoryReport) -> str:
    return ", ".join(sorted({t.dtype for f in mem.plan.files for t in f.tensors}))


def _kv_line(budget: KvBudget, origin: str) -> str:
    seqs = "sequence" if budget.batch == 1 else "sequences"
    return (
        f"{budget.batch} {seqs} x {budget.context} tokens (context from {origin}), "
        f"{budget.dtype_bytes} bytes an element"
    )


def _kv_per_token(mem: MemoryReport) -> int:
    """KV bytes one cached token costs summed over one replica's ranks (no window cap)."""
    hp, tp = mem.plan.hparams, mem.plan.layout.tp
    return tp * kv_bytes_per_token(hp, range(hp.num_layers), tp, mem.budget.dtype_bytes)


def _gpu_line(gpu: Gpu | None) -> str:
    if gpu is None:
        return "none given (pass --gpu NAME or --gpu-memory GB for the KV cache and a verdict)"
    name = gpu.name
    if gpu.name in GPUS:
        name = f"{gpu.name}, {gpu.memory_bytes / GB:g} GB"
        if gpu.total_bytes != gpu.memory_bytes:
            name += f" ({gb(gpu.total_bytes)} as CUDA reports it)"
    return (
        f"{name}; budget {gb(gpu.budget_bytes)} = --gpu-memory-utilization "
        f"{gpu.utilization:g} x {gb(gpu.total_bytes)}, for weights, non-torch memory, the "
        "activation peak and the KV cache"
    )


def _engine_line(limits: EngineLimits) -> str:
    return (
        f"vLLM's profile run: a forward pass of --max-num-batched-tokens "
        f"{limits.max_num_batched_tokens}, then sampling {limits.sampled_rows} rows "
        f"(--max-num-seqs {limits.max_num_seqs}); non-torch memory {gb(limits.non_torch_bytes)} "
        f"a GPU; KV cache in blocks of {limits.block_size} tokens"
    )


def _rank_table(mem: MemoryReport) -> list[str]:
    lines = [
        f"{'rank':>4}  {'stage':>5}  {'tp_rank':>7}  {'layers':<7}  {'weights':>10}  "
        f"{'non-torch':>10}  {'activation':>10}  {'KV cache':>10}  {'KV tokens':>11}  "
        f"{'KV needed':>10}  {'headroom':>10}"
    ]
    for r in mem.ranks:
        if r.dp_index:
            continue
        room = "-" if r.headroom_bytes is None else gb(r.headroom_bytes)
        cache = "-" if r.kv_cache_bytes is None else gb(r.kv_cache_bytes)
        tokens = "-" if r.kv_tokens is None else f"{r.kv_tokens:,}"
        lines.append(
            f"{r.rank:>4}  {r.pp_stage:>5}  {r.tp_rank:>7}  {_span(r.layers):<7}  "
            f"{gb(r.weight_bytes):>10}  {gb(r.non_torch_bytes):>10}  "
            f"{gb(r.activation_bytes):>10}  {cache:>10}  {tokens:>11}  {gb(r.kv_bytes):>10}  "
            f"{room:>10}"
        )
    lay = mem.plan.layout
    if lay.dp > 1:
        per = lay.tp * lay.pp
        lines.append(
            f"dp {lay.dp}: ranks {per}-{lay.world_size - 1} repeat ranks 0-{per - 1} "
            "(same files, same memory)"
        )
    return lines


def _span(layers: tuple[int, int]) -> str:
    first, last = layers
    return f"{first}-{last}" if last >= first else "none"


def _where(r: RankMemory) -> str:
    return f"rank {r.rank} (stage {r.pp_stage}, tp_rank {r.tp_rank})"


def _verdict(mem: MemoryReport) -> str:
    w = mem.worst
    if mem.gpu is None:
        return (
            f"fullest: {_where(w)} needs {gb(w.total_bytes)} with its KV cache; no GPU given, "
            "so no verdict."
        )
    if mem.fits:
        return (
            f"deployable: {_capacity(mem.kv_tokens, mem.budget, mem.limits)}; the tightest is "
            f"{_where(w)}, {gb(w.headroom_bytes)} beyond the KV cache needed."
        )
    over = len({r.rank for r in mem.over if r.dp_index == 0})
    ranks = mem.plan.layout.tp * mem.plan.layout.pp
    return (
        f"not deployable ({over} of {ranks} ranks short): {why_not(w)}. Raise tp or pp, "
        "shorten --context or --batch, or let --suggest pick a layout."
    )


def _capacity(tokens: int, budget: KvBudget, limits: EngineLimits) -> str:
    """vLLM's "GPU KV cache size" and "Maximum concurrency" lines, from our numbers."""
    blocks = tokens // limits.block_size
    return (
        f"KV cache {tokens:,} tokens ({blocks:,} blocks of {limits.block_size}), maximum "
        f"concurrency {_concurrency(tokens, budget, limits):.2f}x at {budget.context:,} "
        "tokens a request"
    )


def _concurrency(tokens: int | None, budget: KvBudget, limits: EngineLimits) -> float | None:
    """Requests of --context tokens the KV cache holds at once: blocks / blocks a request."""
    if tokens is None:
        return None
    return (tokens // limits.block_size) / -(-budget.context // limits.block_size)


def _balance_bars(pm: PlanMemory) -> list[str]:
    """Both bars are shares of the largest stage, so the balance shows; the GPU share follows."""
    mem, report = pm.memory, pm.stages.report
    fullest = _stage_fullest(mem)
    top = max(fullest)
    lines = [
        "balance   cost = stage cost / slowest stage; mem = stage's fullest rank / fullest stage"
    ]
    for i, row in enumerate(report.stages):
        cost = row.cost / report.bottleneck if report.bottleneck else 1.0
        full = fullest[i] / top if top else 0.0
        share = f", {fullest[i] / mem.gpu.budget_bytes:.0%} of the budget" if mem.gpu else ""
        lines.append(
            f"stage {i:<3} layers {_span((row.layers.first_layer, row.layers.last_layer)):<8} "
            f"cost {_bar(cost)} {cost:.2f}  mem {_bar(full)} {full:.2f}  "
            f"({gb(fullest[i])}{share})"
        )
    return lines


def _bar(fraction: float) -> str:
    filled = min(BAR, max(0, round(fraction * BAR)))
    return "\u2588" * filled + "\u2591" * (BAR - filled)


def _stage_fullest(mem: MemoryReport) -> list[int]:
    fullest = [0] * mem.plan.layout.pp
    for r in mem.ranks:
        fullest[r.pp_stage] = max(fullest[r.pp_stage], r.total_bytes)
    return fullest


def plan_json(pm: PlanMemory) -> dict[str, Any]:
    mem, lay = pm.memory, pm.memory.plan.layout
    report = pm.stages.report
    stage_bytes = [0] * lay.pp
    for r in mem.ranks:
        if r.dp_index == 0:
            stage_bytes[r.pp_stage] += r.weight_bytes
    fullest = _stage_fullest(mem)
    stages = [
        {
            "stage": i,
            "layers": [row.layers.first_layer, row.layers.last_layer],
            "embed": row.layers.embed,
            "head": row.layers.head,
            "cost": row.cost / report.bottleneck if report.bottleneck else 1.0,
            "cost_ns": row.cost,
            "weight_bytes": stage_bytes[i],
            "max_rank_total_bytes": fullest[i],
        }
        for i, row in enumerate(report.stages)
    ]
    return {
        "model": pm.shapes.model,
        "architecture": pm.shapes.hparams.architecture,
        "shapes_from": pm.shapes.origin,
        "layout": {"tp": lay.tp, "pp": lay.pp, "ep": lay.ep, "dp": lay.dp, "dtype": lay.dtype},
        "weight_bytes_total": mem.weight_bytes_total,
        "gpu": _gpu_json(mem.gpu),
        "context": mem.budget.context,
        "batch": mem.budget.batch,
        "kv_dtype_bytes": mem.budget.dtype_bytes,
        "kv_bytes_per_token": _kv_per_token(mem),
        "engine": _engine_json(mem.limits),
        "kv_cache_tokens": mem.kv_tokens,
        "kv_cache_blocks": None
        if mem.kv_tokens is None
        else mem.kv_tokens // mem.limits.block_size,
        "max_concurrency": _concurrency(mem.kv_tokens, mem.budget, mem.limits),
        "fits": mem.fits,
        "worst_rank": mem.worst.rank,
        "stages": stages,
        "cost_source": pm.stages.cost_source,
        "stage_report": report.to_dict() if lay.pp > 1 else None,
        "ranks": [_rank_json(r) for r in mem.ranks],
        "expert_placement": asdict(pm.placement) if pm.placement else None,
        "notes": list(pm.notes),
    }


def _gpu_json(gpu: Gpu | None) -> dict[str, Any] | None:
    if gpu is None:
        return None
    return {
        "name": gpu.name,
        "memory_bytes": gpu.memory_bytes,
        "total_bytes": gpu.total_bytes,
        "gpu_memory_utilization": gpu.utilization,
        "budget_bytes": gpu.budget_bytes,
    }


def _engine_json(limits: EngineLimits) -> dict[str, Any]:
    return {
        "max_num_batched_tokens": limits.max_num_batched_tokens,
        "max_num_seqs": limits.max_num_seqs,
        "block_size": limits.block_size,
        "non_torch_bytes": limits.non_torch_bytes,
    }


def _rank_json(r: RankMemory) -> dict[str, Any]:
    return {
        "rank": r.rank,
        "dp_index": r.dp_index,
        "pp_stage": r.pp_stage,
        "tp_rank": r.tp_rank,
        "layers": list(r.layers),
        "weight_bytes": r.weight_bytes,
        "non_torch_bytes": r.non_torch_bytes,
        "activation_bytes": r.activation_bytes,
        "kv_bytes": r.kv_bytes,
        "kv_cache_bytes": r.kv_cache_bytes,
        "kv_cache_blocks": r.kv_blocks,
        "kv_cache_tokens": r.kv_tokens,
        "total_bytes": r.total_bytes,
        "headroom_bytes": r.headroom_bytes,
    }


def format_suggestion(sug: Suggestion, model: str, *, context_origin: str) -> str:
    lines = [
        f"suggest   {model} on {_gpu_line(sug.gpu)}",
        f"engine    {_engine_line(sug.limits)}",
        f"KV cache  {_kv_line(sug.budget, context_origin)}",
        f"rule      TP inside a node ({sug.gpus_per_node} GPUs), PP across nodes; fewest GPUs "
        "whose every rank holds the KV cache after weights, non-torch memory and activations",
        *_choice_lines(sug),
        "",
        "candidates (fewest stages that fit at each tp)",
        f"  {'tp':>3}  {'pp':>3}  {'GPUs':>4}  {'nodes':>5}  {'weights':>10}  "
        f"{'activation':>10}  {'KV cache':>10}  {'KV tokens':>11}  {'headroom':>10}",
        *(_candidate_row(c) for c in sug.candidates),
        "",
        "rejected",
        *(f"  {_rejected_label(r)}: {r.reason}" for r in sug.rejected),
    ]
    if sug.choice is not None:
        lines += ["", f"next      reshard plan {model} {_next_flags(sug)}"]
    return "\n".join(lines)


def _choice_lines(sug: Suggestion) -> list[str]:
    c = sug.choice
    if c is None:
        return ["choice    none: no layout up to a full node of TP x one layer per stage fits"]
    return [
        f"choice    tp {c.tp} x pp {c.pp} = {_gpus(c)}: "
        + _capacity(c.kv_tokens, sug.budget, sug.limits),
        f"          tightest rank {c.worst.rank}: weights {gb(c.worst.weight_bytes)} + non-torch "
        f"{gb(c.worst.non_torch_bytes)} + activation {gb(c.worst.activation_bytes)}, KV cache "
        f"{gb(c.worst.kv_cache_bytes)} for {gb(c.worst.kv_bytes)} needed",
    ]


def _candidate_row(c: Candidate) -> str:
    note = "" if c.pp_across_nodes else "  (pp before a full node of tp)"
    w = c.worst
    return (
        f"  {c.tp:>3}  {c.pp:>3}  {c.world:>4}  {c.nodes:>5}  {gb(w.weight_bytes):>10}  "
        f"{gb(w.activation_bytes):>10}  {gb(w.kv_cache_bytes):>10}  {c.kv_tokens:>11,}  "
        f"{gb(w.headroom_bytes):>10}{note}"
    )


def _next_flags(sug: Suggestion) -> str:
    c, budget, limits, gpu = sug.choice, sug.budget, sug.limits, sug.gpu
    flags = [f"--tp {c.tp}"] + ([f"--pp {c.pp}"] if c.pp > 1 else []) + [_gpu_flag(gpu)]
    flags += [f"--context {budget.context}", f"--batch {budget.batch}"]
    if gpu.utilization != DEFAULT_UTILIZATION:
        flags.append(f"--gpu-memory-utilization {gpu.utilization:g}")
    given = (limits.max_num_batched_tokens, limits.max_num_seqs)
    for name, value, default in zip(
        ("--max-num-batched-tokens", "--max-num-seqs"),
        given,
        engine_defaults(gpu.name, gpu.total_bytes),
    ):
        if value != default:
            flags.append(f"{name} {value}")
    return " ".join(flags)


def _gpus(c: Candidate) -> str:
    nodes = "1 node" if c.nodes == 1 else f"{c.nodes} nodes"
    return f"{c.world} GPU{'s' if c.world > 1 else ''} ({nodes})"


def _gpu_flag(gpu: Gpu) -> str:
    if gpu.name in GPUS:
        return f"--gpu {gpu.name}"
    return f"--gpu-memory {gpu.memory_bytes / GB:g}"


def _rejected_label(r: Rejection) -> str:
    tp = "tp " + ", ".join(map(str, r.tp))
    if r.pp is None:
        return tp
    first, last = r.pp
    return f"{tp} x pp {first}" if first == last else f"{tp} x pp {first}-{last}"


def suggestion_json(sug: Suggestion) -> dict[str, Any]:
    def cand(c: Candidate) -> dict[str, Any]:
        return {
            "tp": c.tp,
            "pp": c.pp,
            "world": c.world,
            "nodes": c.nodes,
            "pp_across_nodes": c.pp_across_nodes,
            "worst_rank": c.worst.rank,
            "kv_cache_tokens": c.kv_tokens,
            "worst": _rank_json(c.worst),
            "headroom_bytes": c.worst.headroom_bytes,
        }

    return {
        "gpu": _gpu_json(sug.gpu),
        "engine": _engine_json(sug.limits),
        "context": sug.budget.context,
        "batch": sug.budget.batch,
        "gpus_per_node": sug.gpus_per_node,
        "fits": sug.choice is not None,
        "choice": cand(sug.choice) if sug.choice else None,
        "candidates": [cand(c) for c in sug.candidates],
        "rejected": [
            {"tp": list(r.tp), "pp": list(r.pp) if r.pp else None, "reason": r.reason}
            for r in sug.rejected
        ],
    }
