"""A plain PyTorch reference of grouped varlen attention, for tests.

Computed per group and per sequence in the dtype of its inputs (call it on float64 / float32
copies for the high-precision reference, on the test dtype for the "same math in low precision"
baseline of the pass rule). GQA by ``repeat_interleave`` of the KV heads, bottom-right causal mask,
``seqused_k``, ``softmax_scale``, LSE; a row that sees no key gets out = 0 and lse = -inf.
Optionally (flash-attn's conventions, as in ringattn.h): a window ``(left, right)`` around each
row's diagonal key d = i + Lk - Lq + shift (shift: the sequence's diagonal shift), -1 unbounded,
causal meaning right = 0; a logit softcap (scores s become softcap * tanh(s / softcap)); sink
logits [Hq] added to each row's softmax denominator (a row without keys: out = 0, lse = sink).
Differentiable: the backward reference is autograd through this function (sinks included).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def attention_one_sequence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    causal: bool,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
    shift: int = 0,
) -> Tuple[Tensor, Tensor]:
    """q [Lq, Hq, D], k/v [Lk, Hk, D], sinks None or [Hq] -> (out [Lq, Hq, D], lse [Hq, Lq] float32)."""
    Lq, Hq, D = q.shape
    Lk, Hk = k.shape[0], k.shape[1]
    if sinks is not None:
        return _attention_with_sinks(q, k, v, softmax_scale, _visible(Lq, Lk, causal, window, shift, q.device),
                                     softcap, sinks)
    if Lk == 0 or Lq == 0:
        out = q.new_zeros((Lq, Hq, D)) + 0.0 * q  # keeps the autograd graph (zero gradient)
        lse = torch.full((Hq, Lq), -math.inf, dtype=torch.float32, device=q.device)
        return out, lse
    rep = Hq // Hk
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale  # [Hq, Lq, Lk]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _visible(Lq, Lk, causal, window, shift, q.device)
    row_has_key = allowed.any(dim=-1)  # [Lq]
    # Masked entries are -inf; a row with no key is set to 0 everywhere (so softmax stays finite
    # and its gradient is 0 after the final masking), then its output is forced to 0.
    scores = scores.masked_fill(~allowed, -math.inf)
    scores = scores.masked_fill(~row_has_key[:, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    probs = probs * row_has_key[:, None].to(probs.dtype)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    lse = torch.logsumexp(scores, dim=-1).float()
    lse = lse.masked_fill(~row_has_key[None, :], -math.inf)
    return out, lse


def _visible(Lq: int, Lk: int, causal: bool, window: Tuple[int, int], shift: int, device) -> Tensor:
    """[Lq, Lk] bool: row i sees key j iff d - left <= j <= d + right, d = i + Lk - Lq + shift
    (-1 unbounded; causal: right = 0)."""
    left, right = window
    if causal:
        right = 0
    diagonal = torch.arange(Lq, device=device)[:, None] + (Lk - Lq + shift)
    j = torch.arange(Lk, device=device)[None, :]
    allowed = torch.ones((Lq, Lk), dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= diagonal - left
    if right >= 0:
        allowed &= j <= diagonal + right
    return allowed


def _attention_with_sinks(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, allowed: Tensor, softcap: float,
                          sinks: Tensor) -> Tuple[Tensor, Tensor]:
    """One sequence with sink logits: sink h is one more logit of every row of head h, whose value
    is 0. lse = logsumexp over the visible logits and the sink; out = sum_j exp(s_j - lse) v_j."""
    Lq, Hq, D = q.shape
    Hk = k.shape[1]
    k = k.repeat_interleave(Hq // Hk, dim=1)
    v = v.repeat_interleave(Hq // Hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * softmax_scale  # [Hq, Lq, Lk]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, -math.inf)
    sink_column = sinks.to(scores.dtype)[:, None, None].expand(Hq, Lq, 1)
    lse = torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)  # [Hq, Lq]
    probs = torch.exp(scores - lse[..., None])  # invisible entries: exp(-inf) = 0
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse.float()


def grouped_attention_reference(
    q_list: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    cu_seqlens_q_list: Sequence[Tensor],
    cu_seqlens_k: Tensor,
    seqused_k_list: Optional[Sequence[Optional[Tensor]]] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
    diagonal_shift_list: Optional[Sequence[Optional[Tensor]]] = None,
) -> Tuple[List[Tensor], List[Tensor]]:
    """Reference grouped varlen attention.

    q_list[g]: [total_q_g, Hq, D]; k, v: [total_k, Hk, D]; cu_seqlens: int32 [B + 1];
    seqused_k_list: None or G entries (None or int32 [B]); window (left, right), -1 unbounded;
    softcap (0 = off); sinks None or [Hq]; diagonal_shift_list None or G entries (None or int32 [B]).
    Returns (out_list [total_q_g, Hq, D] in the dtype of q, lse_list [Hq, total_q_g] float32).
    Rows of q past cu_seqlens_q[-1] are left 0 (out) and -inf (lse).
    """
    D = k.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cu_k = cu_seqlens_k.tolist()
    B = len(cu_k) - 1
    outs, lses = [], []
    for g, q in enumerate(q_list):
        cu_q = cu_seqlens_q_list[g].tolist()
        used = None
        if seqused_k_list is not None and seqused_k_list[g] is not None:
            used = seqused_k_list[g].tolist()
        shifts = [0] * B
        if diagonal_shift_list is not None and diagonal_shift_list[g] is not None:
            shifts = diagonal_shift_list[g].tolist()
        Hq = q.shape[1]
        out_parts, lse_parts = [], []
        for b in range(B):
            lk = cu_k[b + 1] - cu_k[b]
            if used is not None:
                lk = used[b]
            o, l = attention_one_sequence(
                q[cu_q[b] : cu_q[b + 1]],
                k[cu_k[b] : cu_k[b] + lk],
                v[cu_k[b] : cu_k[b] + lk],
                scale,
                causal,
                window,
                softcap,
                sinks,
                shifts[b],
            )
            out_parts.append(o)
            lse_parts.append(l)
        tail = q.shape[0] - cu_q[B]
        if tail > 0:
            out_parts.append(q.new_zeros((tail, Hq, D)))
            lse_parts.append(torch.full((Hq, tail), -math.inf, dtype=torch.float32, device=q.device))
        outs.append(torch.cat(out_parts, dim=0))
        lses.append(torch.cat(lse_parts, dim=1))
    return outs, lses
