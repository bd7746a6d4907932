"""Human and JSON reports for convert and verify. Formatting only: no decisions, no I/O."""

from __future__ import annotations

from typing import Any

from ..io.manifest_value import Manifest
from ..layout.experts.moe import SGLANG_FILE, TRTLLM_FILE
from ..models.rules import is_mtp_name
from ..units import format_bytes


def format_convert_summary(result) -> str:
    plan = result.plan
    lay = plan.layout
    rate = result.bytes_read / result.seconds if result.seconds else 0.0
    what = f"{len(plan.files)} files for {lay.world_size} ranks"
    if result.ranks_written is not None:
        mine = [f for f in plan.files if f.rank in set(result.ranks_written)]
        what = f"{len(mine)} files for ranks {_ranks(result.ranks_written)} of {lay.world_size}"
    lines = [
        f"wrote {what} (tp {lay.tp} x pp {lay.pp} x dp {lay.dp}, ep {lay.ep}) to {result.out_dir}",
        f"read {format_bytes(result.bytes_read)}, wrote {format_bytes(result.bytes_written)} in "
        f"{result.seconds:.2f} s ({format_bytes(rate)}/s)",
    ]
    if lay.vocab_padded != lay.vocab_size:
        unit = "multiple of 64, as vLLM pads" if lay.format == "vllm" else "multiple of tp"
        lines.append(f"vocab {lay.vocab_size} zero-padded to {lay.vocab_padded} ({unit})")
    if lay.pp > 1:
        spans = ", ".join(f"{s.first_layer}-{s.last_layer}" for s in lay.stages)
        lines.append(f"stages (layers): {spans}")
    mtp = [n for n in plan.dropped if is_mtp_name(plan.hparams, n)]
    if len(plan.dropped) > len(mtp):
        derived = len(plan.dropped) - len(mtp)
        lines.append(f"not written (derived from config.json): {derived} tensors")
    kept = plan.layout.keep_mtp and plan.hparams.num_mtp_layers
    if kept:
        lines.append(
            f"multi-token-prediction layer {plan.hparams.num_layers} written whole on the last "
            "stage's tp_rank 0 (--keep-mtp); verify's generate tier does not run it"
        )
    if mtp:
        lines.append(
            f"notice: skipped the multi-token-prediction layer ({len(mtp)} tensors of layer "
            f"{plan.hparams.num_layers}); generation does not use it"
        )
    if plan.placements:  # the expert maps, as each engine reads them
        lines.append(f"engine files: {SGLANG_FILE} (SGLang --init-expert-location), {TRTLLM_FILE}")
    lines.append(_manifest_line(result))
    if lay.format == "vllm" and result.missing in (None, ()):
        lines.append(_serve_line(result))
    return "\n".join(lines)


def _serve_line(result) -> str:
    from ..layout.formats.vllm_serve import SERVE_SCRIPT, partition_env, serve_command

    env = partition_env(result.plan)
    command = serve_command(result.plan).replace('"$HERE"', str(result.out_dir))
    prefix = f"VLLM_PP_LAYER_PARTITION={env} " if env else ""
    return f"serve with vLLM: bash {result.out_dir / SERVE_SCRIPT}   # {prefix}{command}"


def _manifest_line(result) -> str:
    if result.ranks_written is not None and result.missing is None:
        return "manifest: written by global rank 0 of the torchrun world"
    if result.missing:
        return f"manifest: not yet: ranks {_ranks(result.missing)} are still to be written"
    return f"manifest: {result.out_dir / 'manifest.json'}"


def _ranks(ranks) -> str:
    return ",".join(map(str, ranks)) if ranks else "none"


def format_export_summary(result) -> str:
    rate = result.bytes_written / result.seconds if result.seconds else 0.0
    lines = [
        f"wrote {result.tensors} tensors in {len(result.files)} files to {result.hf_dir}",
        f"{format_bytes(result.bytes_written)} in {result.seconds:.2f} s ({format_bytes(rate)}/s)",
    ]
    if result.cast:
        lines.append(
            f"{len(result.cast)} tensors keep the dtype convert cast them to (e.g. "
            f"'{result.cast[0]}'); the original bytes are not in the output"
        )
    return "\n".join(lines)


def verify_report(manifest: Manifest, results) -> dict[str, Any]:
    ran = [r for r in results if r.passed is not None]
    # Nothing ran and nothing was delegated to another rank: nothing was proven.
    proven = bool(ran) or any(r.elsewhere for r in results)
    report: dict[str, Any] = {
        "passed": proven and all(r.passed for r in ran),
        "world_size": manifest.layout.world_size,
        "backend": None,
        "levels": {r.level: r.to_dict() for r in results},
    }
    for r in results:
        report.update(r.data)  # generation adds "backend" and "generation"
    return report


def _tokens_verdict(p: dict[str, Any]) -> str:
    if p["first_mismatch"] is None:
        return "same"
    what = "near tie, exempted" if p["near_tie"] else "DIFFERENT"
    return f"{what} from token {p['first_mismatch']} (reference margin {p['margin']:.3g})"


def format_verify(report: dict[str, Any], results) -> str:
    lines = []
    for r in results:
        status = (
            "ELSEWHERE" if r.elsewhere else {True: "PASS", False: "FAIL", None: "SKIP"}[r.passed]
        )
        lines.append(f"{r.level:<9} {status}  {r.detail}")
        lines += [f"          - {f}" for f in r.failures[:20]]
        if len(r.failures) > 20:
            lines.append(f"          ... and {len(r.failures) - 20} more")
    gen = report.get("generation")
    if gen:
        lines.append(
            "prompt  len  max|logit|  max|dlogit|  KL         new tokens (reference == sharded)"
        )
        for i, p in enumerate(gen["prompts"]):
            lines.append(
                f"{i:>6}  {len(p['prompt_ids']):>3}  {p['max_abs_logit']:>10.3g}  "
                f"{p['max_abs_logit_diff']:.3e}    {p['kl']:.3e}  {len(p['reference_ids'])} "
                f"{_tokens_verdict(p)}"
            )
    lines.append("verify: " + ("PASSED" if report["passed"] else "FAILED"))
    return "\n".join(lines)
