"""Argument checks shared by the context-parallel entry points (ring.py, zigzag_llama3.py, llama3.py).

Each raises ValueError naming the argument with the expected and the actual value
(check_flash_attn_defaults: NotImplementedError for a feature this library does not have)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap=0.0) -> None:
    """flash-attn arguments supported only at their defaults: NotImplementedError naming the first
    one that is not (in this order: dropout_p, window_size, softcap, alibi_slopes)."""
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: dropout is not supported (got {dropout_p}); pass 0.0")
    window = check_window_size(window_size)
    if window != (-1, -1):
        raise NotImplementedError(f"window_size: sliding-window attention is not supported yet "
                                  f"(got {window}); pass (-1, -1)")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap: logit soft-capping is not supported yet (got {softcap}); pass 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported; pass None")


def check_window_size(window_size) -> tuple:
    """window_size as flash-attn takes it: a (left, right) pair of ints, -1 meaning unbounded.
    Returns it as a tuple; ValueError naming window_size for anything else (an int, a string,
    a triple, floats)."""
    try:
        pair = tuple(window_size)
    except TypeError:
        pair = None
    if (pair is None or isinstance(window_size, (str, bytes)) or len(pair) != 2
            or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in pair)):
        raise ValueError(f"window_size: expected a (left, right) pair of ints (-1 for unbounded), "
                         f"got {window_size!r}")
    return tuple(int(x) for x in pair)


def check_qkv(q, k, v, ndim: int, layout: str) -> None:
    """q, k, v are tensors of `ndim` dims (described by `layout`, e.g. "[local_tokens, heads,
    head_dim]"); k and v on q's device, in q's dtype, and v shaped like k."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")
    if layout.startswith("[batch") and q.shape[0] == 0:
        raise ValueError(f"q: expected a batch of at least one sequence {layout}, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got {t.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")


def unpack(packed, name: str, count: int, layout: str):
    """Splits a packed ``kv`` (count 2) or ``qkv`` (count 3) tensor along its packing dim, the
    third from last in every layout (e.g. "[local_tokens, 2, heads_k, head_dim]"): views, no copy."""
    ndim = layout.count(",") + 1
    if not isinstance(packed, Tensor) or packed.dim() != ndim or packed.shape[-3] != count:
        got = tuple(packed.shape) if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got {got}")
    return packed.unbind(-3)


def check_heads_k_stride(heads_k_stride, num_heads_k: int) -> None:
    """heads_k_stride is an int >= 1 dividing the KV heads."""
    if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, numbers.Integral) or heads_k_stride < 1:
        raise ValueError(f"heads_k_stride: expected an int >= 1, got {heads_k_stride!r}")
    if num_heads_k % heads_k_stride:
        raise ValueError(f"heads_k_stride: expected a divisor of the KV heads of k ({num_heads_k}), got {heads_k_stride}")


def check_cu_seqlens(cu, name: str, device) -> None:
    """`cu` is a 1-D int32 tensor of batch_size + 1 >= 2 entries on `device` (q's)."""
    if not isinstance(cu, Tensor):
        raise ValueError(f"{name}: expected an int32 Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D tensor of batch_size + 1 >= 2 entries, got shape "
                         f"{tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q), got {cu.device}")


def check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k, device) -> None:
    """cu_seqlens_q and cu_seqlens_k are 1-D int32 tensors on `device` (q's) with the same
    batch_size + 1 >= 2 entries."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_cu_seqlens(cu, name, device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q: expected {cu_seqlens_k.shape[0]} entries (batch_size + 1, as "
                         f"cu_seqlens_k), got {cu_seqlens_q.shape[0]}")
