"""Attention sinks (learnable per-head logits, gpt-oss's ``s_aux``) under context parallelism.

A sink h adds ``exp(sinks[h])`` to the softmax denominator of every row of head h, so to its LSE,
and nothing to the output. Under context parallelism a row's keys are spread over several kernel
calls (the ring steps) whose partial results are merged through their LSE; the sink must count
once per row, not once per call. So the ring schemes run their steps WITHOUT sinks, merge as
usual, and fold the sink in once per row afterwards (``fold_sinks``):

    lse' = logaddexp(lse, sinks[h]),    out' = out * exp(lse - lse').

The backward then runs with out' and lse' (the probabilities ``exp(S - lse')`` are exactly the
sink-including ones), and the sinks' own gradient is ``sink_gradient``:

    dsinks[h] = -sum_i exp(sinks[h] - lse'_i) * rowsum(dO_i * O'_i)

over the rank's rows i of head h. Each rank returns the partial sum over ITS rows; the caller's
gradient all-reduce (data / context parallel gradient reduction, as for every parameter
replicated across the context-parallel ranks) adds the ranks' partials into the full gradient.

The all-gather schemes see all keys of a row in one kernel call, so they pass the sinks to that
call (the kernel adds them to the LSE) and use ``sink_gradient`` for the gradient only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["check_sinks", "contiguous_sinks", "fold_sinks", "sink_gradient"]


def check_sinks(sinks: Optional[Tensor], num_heads_q: int, device: torch.device) -> None:
    """sinks is None or a float32 ``[Hq]`` tensor on q's device (one sink logit per query head);
    ValueError naming ``sinks`` otherwise."""
    if sinks is None:
        return
    if not isinstance(sinks, Tensor):
        raise ValueError(f"sinks: expected None or a float32 Tensor [{num_heads_q}] (one logit per query head), "
                         f"got {type(sinks).__name__}")
    if sinks.dtype != torch.float32:
        raise ValueError(f"sinks: expected dtype torch.float32, got {sinks.dtype}")
    if tuple(sinks.shape) != (num_heads_q,):
        raise ValueError(f"sinks: expected shape ({num_heads_q},) (one logit per query head of q), got "
                         f"{tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks: expected a tensor on {device} (the device of q), got {sinks.device}")


def contiguous_sinks(sinks: Optional[Tensor]) -> Optional[Tensor]:
    """The sinks as the kernels take them (contiguous): sinks itself, or a copy of a strided view
    (differentiable: its gradient flows back to sinks). None stays None."""
    if sinks is None or sinks.is_contiguous():
        return sinks
    return sinks.contiguous()


def fold_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tuple[Tensor, Tensor]:
    """Folds the sink logits into merged attention results, once per row.

    out ``[T, Hq, D]`` and lse ``[Hq, T]`` (any float dtypes; computed in lse's dtype, at least
    fp32), sinks float32 ``[Hq]``. Returns ``(out', lse')`` in the dtypes of out and lse. A row
    without keys (lse = -inf) gets lse' = sinks[h] and out' = 0; a sink of -inf changes nothing.
    """
    work = torch.float64 if torch.float64 in (lse.dtype, out.dtype) else torch.float32
    lse_w = lse.to(work)
    sink = sinks.to(work)[:, None]  # [Hq, 1]
    new = torch.logaddexp(lse_w, sink)
    # exp(lse - lse') with lse = lse' = -inf (no key, sink -inf) taken as 0: out is 0 there anyway
    scale = torch.where(torch.isneginf(new), 0.0, torch.exp(lse_w - torch.where(torch.isneginf(new), 0.0, new)))
    out_new = (out.to(work) * scale.t()[:, :, None]).to(out.dtype)
    return out_new, new.to(lse.dtype)


def sink_gradient(sinks: Tensor, out: Tensor, dout: Tensor, lse: Tensor) -> Tensor:
    """The gradient of the sink logits from the rank's rows: float32 ``[Hq]``,
    ``-sum_i exp(sinks[h] - lse_i) * rowsum(dout_i * out_i)``.

    out, dout ``[T, Hq, D]`` and lse ``[Hq, T]`` are the FINAL (sink-including) output and LSE;
    rows with lse = -inf contribute nothing, and neither do elements where out is exactly 0: a
    row that sees no key (a padding row of the context-parallel layouts, whose dout may hold
    anything, NaN included) has out = 0, and its exact contribution is 0. Summed in fp32 (fp64
    for fp64 data)."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    lse_a = lse.to(acc)
    share = torch.where(torch.isneginf(lse_a), 0.0, torch.exp(sinks.to(acc)[:, None] - lse_a))  # [Hq, T]
    out_a = out.to(acc)
    rowsum = torch.where(out_a == 0, 0.0, dout.to(acc) * out_a).sum(-1).t()  # [Hq, T]
    return (-(share * rowsum).sum(1)).to(torch.float32)
