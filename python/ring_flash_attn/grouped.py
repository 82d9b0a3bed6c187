"""Public single-device API: grouped varlen attention and the flash-attn compatible G = 1 case.

Notation: G query groups, B sequences, Hq query heads, Hk KV heads (Hq % Hk == 0), D head dim.
All groups share one K/V stream; group g sees, of sequence b, the first ``seqused_k_list[g][b]``
keys (all of them by default). Masks are bottom-right aligned per (group, sequence): query i of Lq
has the diagonal key i + Lk - Lq; causal attends keys j < Lk up to it, a window
``(left, right)`` those with i + Lk - Lq - left <= j <= i + Lk - Lq + right (-1 = unbounded;
flash-attn's ``window_size``). A row that sees no key gets out = 0 and lse = -inf (with sinks:
lse = the head's sink logit).
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _lib, ops
from ._checks import NO_WINDOW, check_flash_attn_defaults, check_softcap, check_window_size

_grouped_fwd = ops.grouped_fwd

__all__ = ["grouped_flash_attn_varlen_func", "flash_attn_varlen_func"]


def _resolve_scale(softmax_scale: Optional[float]) -> float:
    """The ``softmax_scale`` argument of the ops: 0.0 for None (the library's 1/sqrt(head_dim)),
    else the user's scale, which must be a positive float whose float32 value is finite and normal
    (ValueError naming softmax_scale otherwise, e.g. for 1e-50, which float32 rounds to 0)."""
    if softmax_scale is None:
        return 0.0
    if type(softmax_scale) is float and 2e-38 <= softmax_scale <= 3e38:
        return softmax_scale  # float32 rounds it to a finite normal number: what float32_scale accepts
    return _lib.float32_scale(softmax_scale)


def _feature_kwargs(window_size, softcap, sinks, causal) -> dict:
    """The ops' keyword arguments for a window, a softcap and sinks; {} when all are off (the
    defaults cost two compares)."""
    kwargs = {}
    if not (type(window_size) is tuple and window_size == NO_WINDOW):
        window = check_window_size(window_size, bool(causal))
        if window != NO_WINDOW:
            kwargs["window_size"] = list(window)
    if softcap != 0.0:
        kwargs["softcap"] = check_softcap(softcap)
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise ValueError(f"sinks: expected None or a float32 Tensor [num_heads_q], got {type(sinks).__name__}")
        kwargs["sinks"] = sinks
    return kwargs


def _seqlen_hint(value, name: str, what: str):
    """A max_seqlen hint: an int in [0, 2**31 - 1] (ValueError naming `name` otherwise; a bool or a
    float is not taken for an int). A SymInt (torch.compile with dynamic shapes) is checked when
    the op runs."""
    if type(value) is int and 0 <= value <= _lib.INT32_MAX:
        return value
    if isinstance(value, torch.SymInt):
        return value
    return _lib.int32_value(value, name, what)


# flash_attn_varlen_func(q, ...) is the grouped op with G = 1: its errors name the caller's
# arguments, not the op's lists.
_GROUP0_ARGUMENT = re.compile(r"\b(q|cu_seqlens_q|max_seqlen_q|out|lse|dout|dq)_list\[0\]")
_GROUP0_NAMES = {"lse": "softmax_lse"}


def _single_group_names(message: str) -> str:
    return _GROUP0_ARGUMENT.sub(lambda m: _GROUP0_NAMES.get(m.group(1), m.group(1)), message)


def _rename_arguments(error: Exception, rename: Callable[[str], str]) -> None:
    """Rewrites the message of a ValueError / NotImplementedError with `rename` (same exception
    object, so the caller re-raises it with its traceback)."""
    if error.args and isinstance(error.args[0], str):
        error.args = (rename(error.args[0]),) + error.args[1:]


def grouped_flash_attn_varlen_func(
    q_list: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    cu_seqlens_q_list: Sequence[Tensor],
    cu_seqlens_k: Tensor,
    max_seqlen_q_list: Sequence[int],
    max_seqlen_k: int,
    seqused_k_list: Optional[Sequence[Optional[Tensor]]] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    return_lse: bool = False,
    deterministic: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Union[List[Tensor], Tuple[List[Tensor], List[Tensor]]]:
    """Grouped varlen attention: G query groups over one shared K/V stream, in one library call.

    Args:
        q_list: G tensors ``[total_q_g, Hq, D]`` (float16, bfloat16; float32 and float64 on CPU).
        k, v: ``[total_k, Hk, D]``, same dtype and device as the queries.
        cu_seqlens_q_list: G int32 tensors ``[B + 1]``, cumulative query lengths of each group.
        cu_seqlens_k: int32 ``[B + 1]``, cumulative key lengths (shared by all groups).
        max_seqlen_q_list: G ints, the longest query sequence of each group (a hint; Python ints
            so that no host sync is needed).
        max_seqlen_k: int, the longest key sequence (a hint).
        seqused_k_list: None, or G entries, each None or an int32 ``[B]`` tensor: how many keys
            of each sequence (from its start) the group sees.
        softmax_scale: scale of QK^T; default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask per (group, sequence).
        return_lse: also return the log-sum-exp of each group.
        deterministic: bit-identical backward run to run.
        window_size: ``(left, right)`` local (sliding-window) attention, flash-attn's convention:
            query i of a (group, sequence) sees key j iff
            ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``, -1 = unbounded on that side
            (each group follows its own Lq and Lk, so its own bottom-right alignment). With
            ``causal=True`` the right side is the diagonal: pass right = -1 or 0. Default
            ``(-1, -1)``: no window.
        softcap: > 0 turns each score ``s = softmax_scale * q.k`` into
            ``softcap * tanh(s / softcap)`` before the mask and the softmax (Gemma 2). Default 0
            (off).
        sinks: None, or float32 ``[Hq]`` learnable sink logits (gpt-oss): sink h adds
            ``exp(sinks[h])`` to the softmax denominator of every row of head h, so to its LSE,
            and nothing to the output; a row without keys then gets out = 0 and lse = sinks[h].
            With ``sinks.requires_grad`` autograd fills ``sinks.grad``
            (``-sum_i exp(sinks[h] - lse_i) * rowsum(dout_i * out_i)`` over the rows of head h of
            every group, plus the LSE's share when the loss uses it).

    Tokens and heads may be strided (e.g. slices of a larger tensor); the head dim must be
    contiguous.

    Returns:
        ``out_list`` (G tensors ``[total_q_g, Hq, D]``, dtype of q), or
        ``(out_list, lse_list)`` with ``return_lse=True`` (lse: float32 ``[Hq, total_q_g]``,
        natural log, sinks included; differentiable: a loss that uses it gets its gradient
        through it, at the cost of one more backward kernel call in the backward pass).

    Raises:
        ValueError: a bad argument; the message names it with the expected and actual value.
            The VALUES of cu_seqlens / seqused_k are checked on CPU tensors always, on CUDA only
            with ``RING_FLASH_ATTN_CHECK_METADATA=1`` (a host copy and a sync per call); without it
            a malformed value gives wrong outputs for its sequences (never an access outside the
            tensors) and is recorded for ``ring_flash_attn.check_errors()``, which raises naming it.
        NotImplementedError: valid, but not supported by this build or device.
    """
    features = _feature_kwargs(window_size, softcap, sinks, causal)
    q_list = list(q_list)
    G = len(q_list)
    seqused = [None] * G if seqused_k_list is None else list(seqused_k_list)
    max_seqlen_q_list = [_seqlen_hint(m, f"max_seqlen_q_list[{g}]", "a hint: the longest query sequence of the group")
                         for g, m in enumerate(max_seqlen_q_list)]
    max_seqlen_k = _seqlen_hint(max_seqlen_k, "max_seqlen_k", "a hint: the longest key sequence")
    cu_seqlens_q_list = list(cu_seqlens_q_list)
    scale = _resolve_scale(softmax_scale)
    # Eager calls skip the dispatcher (same kernel, autograd and errors; see ops.eager_call_ok);
    # torch.compile, tracing, modes and tensor subclasses see the op.
    if not torch.compiler.is_compiling() and ops.eager_call_ok(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k,
                                                                 seqused, sinks):
        out_list, lse_list = ops.grouped_fwd_eager(
            q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused, max_seqlen_q_list, max_seqlen_k, scale,
            bool(causal), bool(deterministic), tuple(features.get("window_size", NO_WINDOW)),
            features.get("softcap", 0.0), sinks)
    else:
        out_list, lse_list = _grouped_fwd(
            q_list,
            k,
            v,
            cu_seqlens_q_list,
            cu_seqlens_k,
            seqused,
            max_seqlen_q_list,
            max_seqlen_k,
            scale,
            bool(causal),
            bool(deterministic),
            **features,
        )
    if return_lse:
        return out_list, lse_list
    return out_list


def single_group_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, seqused_k: Optional[Tensor],
                           softmax_scale: Optional[float], causal: bool, deterministic: bool,
                           window_size: Tuple[int, int], softcap: float,
                           sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``grouped_flash_attn_varlen_func`` with one query group (G = 1): ``(out [total_q, Hq, D],
    lse [Hq, total_q] float32)``, the arguments as there with the group's entries unwrapped
    (seqused_k: None or int32 ``[B]``). Errors name the grouped function's arguments
    (``q_list[0]``, ...)."""
    out_list, lse_list = grouped_flash_attn_varlen_func(
        [q], k, v, [cu_seqlens_q], cu_seqlens_k, [max_seqlen_q], max_seqlen_k,
        seqused_k_list=None if seqused_k is None else [seqused_k], softmax_scale=softmax_scale, causal=causal,
        return_lse=True, deterministic=deterministic, window_size=window_size, softcap=softcap, sinks=sinks)
    return out_list[0], lse_list[0]


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """flash-attn's ``flash_attn_varlen_func``: the G = 1 case of the grouped op.

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hk, D]`` with Hq % Hk == 0.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``.
        max_seqlen_q, max_seqlen_k: ints (hints).
        softmax_scale: default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask (flash-attn >= 2.1 convention).
        window_size: ``(left, right)`` local attention, -1 = unbounded (flash-attn's; with
            ``causal=True`` the right side must be -1 or 0).
        softcap: > 0: scores become ``softcap * tanh(score / softcap)``; 0 = off.
        deterministic: bit-identical backward run to run.
        return_attn_probs: return ``(out, softmax_lse, None)`` like flash-attn (the attention
            probabilities themselves are not materialised).
        sinks: None or float32 ``[Hq]`` sink logits (not a flash-attn argument; see
            ``grouped_flash_attn_varlen_func``).
        dropout_p, alibi_slopes, block_table: only their defaults are supported; anything else
            raises NotImplementedError naming the argument.

    Returns:
        ``out`` ``[total_q, Hq, D]``, or ``(out, softmax_lse [Hq, total_q] float32, None)``.
    """
    if not (dropout_p == 0.0 and alibi_slopes is None and type(window_size) is tuple and window_size == NO_WINDOW
            and type(softcap) is float and softcap == 0.0):  # the defaults need no check
        window_size, softcap = check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap, causal)
    if block_table is not None:
        raise NotImplementedError("block_table: paged KV cache is not supported; pass None")
    try:
        out, lse = single_group_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None,
                                          softmax_scale, causal, deterministic, window_size, softcap, sinks)
    except (ValueError, NotImplementedError) as e:
        _rename_arguments(e, _single_group_names)
        raise
    if return_attn_probs:
        return out, lse, None
    return out
