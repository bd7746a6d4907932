"""Float comparisons that hold on any CPU.

Two runs of the same math that differ only in summation order (another CPU kernel, a TP
all-reduce, a fused vs split matmul) differ by a few units in the last place of the values'
own scale, never by a fixed absolute amount: logits of size 50 carry float32 rounding of
~6e-6 per operation. So every bound here is `ulps * eps(dtype) * max|expected|` (at least
`ulps * eps` for values below 1). The ulps budget covers the depth of the computation.
Checked under ATEN_CPU_CAPABILITY=default, avx2 and the machine's best (scripts/test.sh).
"""

from __future__ import annotations

import torch

# A few decoder layers of fp32: rounding compounds through norms, softmax and residuals.
MODEL_ULPS = 256


def scaled_bound(expected: torch.Tensor, ulps: int, dtype: torch.dtype | None = None) -> float:
    """ulps * eps(dtype) * max(1, max|expected|)."""
    eps = torch.finfo(dtype or expected.dtype).eps
    return ulps * eps * max(1.0, float(expected.abs().max()))


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, *, ulps: int = MODEL_ULPS, what: str = ""
) -> None:
    """max|actual - expected| <= scaled_bound(expected, ulps), with the numbers on failure."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    actual, expected = actual.detach(), expected.detach()
    diff = float((actual.double() - expected.double()).abs().max())
    bound = scaled_bound(expected, ulps)
    scale = float(expected.abs().max())
    assert diff <= bound, f"{what}: max |diff| {diff:.3e} > {bound:.3e} = {ulps} ulps x {scale:.3g}"
