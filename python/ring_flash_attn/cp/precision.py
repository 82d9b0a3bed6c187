"""In what precision the context-parallel schemes form and sum their per-step partial results.

A scheme splits one attention into several kernel calls (ring steps, K/V slices, query groups)
whose partial results are summed: the outputs through their LSE, dQ over the K/V blocks, dK/dV
over the ranks whose queries see a block. Every such sum runs in fp32 (fp64 for fp64 data) and
is rounded to the input dtype once, at the end; the dK/dV that travel between ranks travel in
that precision too.

What remains is the partial itself: a kernel call on bf16/fp16 data rounds its outputs to that
dtype when it stores them, so a sum of N partials carries N roundings instead of one, and the
error of dK/dV grows with the number of ranks. Where the backend can hand the partial over
unrounded at no extra cost, the schemes ask for it (``fp32_partials``):

* CPU: the backend computes in fp32 for fp32, fp16 and bf16 data alike (inputs widened on
  load, outputs rounded on store), so calling it on fp32 copies of the operands gives exactly
  the call's fp32 result before the store's rounding.
* CUDA: not yet (the kernels store in the input dtype); each partial is rounded once by its
  kernel, then summed in fp32. An fp32-output option of the kernels' epilogue would remove
  that rounding; ``fp32_partials`` is the one place to switch it on.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "fp32_partials", "widen"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results are summed in: fp64 for fp64 data, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp32_partials(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a kernel call on ``dtype`` data on ``device`` can return its outputs in fp32
    (unrounded) by running on fp32 copies of its operands at the cost of the ``dtype`` call."""
    return device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)


def widen(t: Tensor, wide: bool) -> Tensor:
    """``t`` as fp32 when ``wide`` (an operand of a call whose partials are wanted in fp32)."""
    return t.float() if wide else t
