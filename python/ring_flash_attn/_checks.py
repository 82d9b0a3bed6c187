"""Argument checks shared by the context-parallel entry points (ring.py, zigzag_llama3.py).

Each raises ValueError naming the argument with the expected and the actual value."""

from __future__ import annotations

from torch import Tensor


def check_qkv(q, k, v, ndim: int, layout: str) -> None:
    """q, k, v are tensors of `ndim` dims (described by `layout`, e.g. "[local_tokens, heads,
    head_dim]"); k and v on q's device, in q's dtype, and v shaped like k."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")
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
