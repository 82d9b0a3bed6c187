"""A plain PyTorch reference of varlen attention with the score features (softcap, window,
sinks), for the tests of the schemes that hand them on. Per sequence, in the dtype of its inputs
(call it on float64 copies); differentiable in q, k, v and sinks (autograd gives the reference
gradients). The semantics are flash-attn's: the scaled score s becomes ``softcap * tanh(s /
softcap)``; with a window (left, right), row i of a sequence with Lq queries and Lk keys sees key
j iff ``j >= i + Lk - Lq - left`` (left != -1) and ``j <= i + Lk - Lq + right`` (right != -1),
causal meaning right = 0; ``exp(sinks[h])`` joins each row's softmax denominator (so its LSE)
but not the output; a row with no key has out = 0 and LSE = sinks[h] (-inf without sinks)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def attention_with_features(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, softmax_scale: Optional[float],
                            causal: bool, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            sinks: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` (self-attention over the packed sequences of
    ``cu_seqlens``) -> (out ``[T, Hq, D]``, lse ``[Hq, T]`` in q's dtype)."""
    T, Hq, D = q.shape
    rep = Hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    left, right = window_size
    if causal:
        right = 0 if right == -1 else min(right, 0)
    cu = cu_seqlens.tolist()
    outs, lses = [], []
    for b in range(len(cu) - 1):
        rows = slice(cu[b], cu[b + 1])
        L = cu[b + 1] - cu[b]
        if L == 0:
            continue
        qs, ks, vs = q[rows], k[rows].repeat_interleave(rep, 1), v[rows].repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(L)[:, None]
        j = torch.arange(L)[None, :]
        allowed = torch.ones((L, L), dtype=torch.bool)
        if left != -1:
            allowed &= j >= i - left
        if right != -1:
            allowed &= j <= i + right
        s = s.masked_fill(~allowed, -math.inf)
        if sinks is not None:
            sink_col = sinks.to(s.dtype)[:, None, None].expand(Hq, L, 1)
            s = torch.cat([s, sink_col], dim=-1)
        lse = torch.logsumexp(s, dim=-1)  # [Hq, L]; -inf for an empty row without sinks
        finite = torch.isfinite(lse)
        p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
        p = torch.where(finite[..., None], p, torch.zeros_like(p))
        if sinks is not None:
            p = p[..., :L]
        outs.append(torch.einsum("hqk,khd->qhd", p, vs))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)
