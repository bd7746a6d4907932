"""The one table of GPUs reshard plans for: memory (as sold, and as CUDA reports it, which is
what an engine budgets from), dense fp16/bf16 FLOP/s and memory bandwidth. `plan --gpu` reads
its memory from here and the stage roofline (stages/costs.py) its FLOP/s and bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import GB, GIB  # memory as sold: decimal GB; as CUDA and vLLM's logs report it


@dataclass(frozen=True)
class GpuSpec:
    memory_gb: int  # datasheet, decimal GB (REFERENCES.md, "GPU memory")
    flops: float  # dense fp16/bf16 tensor FLOP/s: half the with-sparsity figure
    bandwidth: float  # memory bytes/s
    # What torch.cuda.mem_get_info() reports as total, which vLLM multiplies by
    # gpu_memory_utilization. Only where a published log shows it; else the datasheet figure
    # is used, which is lower (an 80 GB H100 reports 79.22 GiB = 85.06 GB).
    cuda_total_gib: float | None = None

    @property
    def total_bytes(self) -> int:
        if self.cuda_total_gib is None:
            return self.memory_gb * GB
        return round(self.cuda_total_gib * GIB)


# Datasheet figures (SXM parts where there are several).
GPUS = {
    "B200": GpuSpec(192, 2250e12, 8.0e12),
    "B100": GpuSpec(192, 1750e12, 8.0e12),
    # total_gpu_memory=139.72GiB: https://github.com/vllm-project/vllm/issues/10702
    "H200": GpuSpec(141, 989e12, 4.8e12, 139.72),
    # total_gpu_memory 79.22GiB: https://github.com/vllm-project/vllm/pull/10511
    "H100": GpuSpec(80, 989e12, 3.35e12, 79.22),
    "L4": GpuSpec(24, 121e12, 0.3e12),
    "L40S": GpuSpec(48, 366e12, 0.864e12),
    "L40": GpuSpec(48, 181e12, 0.864e12),
    "A100": GpuSpec(80, 312e12, 2.039e12),
}


def find_gpu(name: str) -> str | None:
    """The table's spelling of `name` (case-insensitive), or None."""
    known = {k.lower(): k for k in GPUS}
    return known.get(name.strip().lower())
