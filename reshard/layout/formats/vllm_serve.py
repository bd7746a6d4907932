"""OUT/vllm-serve.sh: the exact `vllm serve` launch for a vLLM-format output, with
VLLM_PP_LAYER_PARTITION when reshard's stages differ from vLLM's own even split."""

from __future__ import annotations

SERVE_SCRIPT = "vllm-serve.sh"


def vllm_even_split(layers: int, pp: int) -> list[int]:
    """vLLM's default stage sizes (vllm.distributed.utils.get_pp_indices): the remainder goes
    one layer each to the stages before the last, last-but-one first."""
    sizes = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        sizes[-i] += 1
    return sizes


def stage_sizes(plan) -> list[int]:
    return [len(s.layers) for s in plan.layout.stages]


def serve_command(plan) -> str:
    lay = plan.layout
    args = ['vllm serve "$HERE" --load-format sharded_state', f"--tensor-parallel-size {lay.tp}"]
    if lay.pp > 1:
        args.append(f"--pipeline-parallel-size {lay.pp}")
    if lay.ep > 1:
        args.append("--enable-expert-parallel")
    if lay.dp > 1:
        args.append(f"--data-parallel-size {lay.dp}")
    return " ".join(args)


def partition_env(plan) -> str | None:
    sizes = stage_sizes(plan)
    if plan.layout.pp == 1 or sizes == vllm_even_split(plan.hparams.num_layers, plan.layout.pp):
        return None
    return ",".join(map(str, sizes))


def serve_script(plan) -> str:
    env = partition_env(plan)
    lines = [
        "#!/usr/bin/env bash",
        f"# Serve this reshard output with vLLM {plan.layout.format_version} (written by "
        "reshard convert --format vllm).",
        "# Each worker reads only its own model-*-part-*.safetensors: no resharding at start.",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
    ]
    if env:
        lines.append(
            f"# reshard's cost-balanced stages ({env} layers) differ from vLLM's even split."
        )
        lines.append(f"export VLLM_PP_LAYER_PARTITION={env}")
    lines.append(f'exec {serve_command(plan)} "$@"')
    return "\n".join(lines) + "\n"
