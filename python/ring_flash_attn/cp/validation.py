"""Argument checks shared by the context-parallel schemes.

Each raises ValueError naming the argument with the expected and the actual value. The checks
of flash-attn arguments that are supported only at their defaults (dropout, window, ALiBi) are
``ring_flash_attn._checks.check_flash_attn_defaults``, shared with the single-device API.

Metadata VALUES (lengths, totals) are read on the host only where that is free (CPU tensors) or
when ``RING_FLASH_ATTN_CHECK_METADATA=1`` asks for it (``metadata_checks_enabled``): on CUDA every
such read is a device-to-host synchronisation.
"""

from __future__ import annotations

import numbers
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _lib
from ..ops import dtype_code

__all__ = [
    "ENV_CHECK_METADATA",
    "INT32_MAX",
    "CuSeqlens",
    "as_cu_tensor",
    "check_collective_device",
    "check_cumulative_values",
    "check_cu_seqlens",
    "check_cu_seqlens_pair",
    "check_heads",
    "check_heads_k_stride",
    "check_int32_count",
    "check_int32_values",
    "check_kernel_support",
    "check_local_tokens",
    "check_python_int",
    "check_qkv",
    "check_world",
    "metadata_checks_enabled",
    "short_list",
    "unpack",
    "unpack_batched_kv",
    "unpack_batched_qkv",
    "unpack_varlen_kv",
    "unpack_varlen_qkv",
    "with_contiguous_head_dim",
]

ENV_CHECK_METADATA = "RING_FLASH_ATTN_CHECK_METADATA"

CuSeqlens = Union[Tensor, Sequence[int]]

# The largest value an int32 (the dtype of every cu_seqlens / seqused tensor and of the C ABI's
# lengths) holds.
INT32_MAX = 2**31 - 1


def metadata_checks_enabled(device: torch.device) -> bool:
    """Whether metadata values are checked on the host: always on CPU (free), on other devices
    only when RING_FLASH_ATTN_CHECK_METADATA=1 (it synchronises)."""
    return device.type == "cpu" or os.environ.get(ENV_CHECK_METADATA, "0") == "1"


def short_list(values: List[int], limit: int = 12) -> str:
    """``values`` as text, cut after ``limit`` entries (for error messages)."""
    return str(values) if len(values) <= limit else str(values[:limit])[:-1] + ", ...]"


# ---- world, cu_seqlens and Python ints ---------------------------------------------------------


def check_world(world_size: int, rank: Optional[int] = None) -> None:
    """world_size is an int >= 1 and (when given) rank an int in [0, world_size)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size):
        raise ValueError(f"rank: expected an int in [0, {world_size}) (world_size {world_size}), got {rank!r}")


def check_int32_values(values: Sequence[int], name: str) -> None:
    """Every entry of ``values`` (host ints, e.g. cumulative lengths about to be stored as int32)
    is in ``[0, INT32_MAX]``: checked BEFORE the narrowing, which would wrap silently."""
    for i, x in enumerate(values):
        if not 0 <= x <= INT32_MAX:
            raise ValueError(f"{name}: expected entries in [0, {INT32_MAX}] (they are stored as int32), got {x} "
                             f"at index {i}")


def check_cumulative_values(values: Sequence[int], name: str) -> None:
    """``values`` (host ints) are cumulative lengths: at least two entries, the first 0, none
    smaller than the one before."""
    if len(values) < 2:
        raise ValueError(f"{name}: expected batch_size + 1 >= 2 entries, got {len(values)}")
    if values[0] != 0:
        raise ValueError(f"{name}: expected the first entry to be 0, got {values[0]}")
    for i in range(len(values) - 1):
        if values[i + 1] < values[i]:
            raise ValueError(f"{name}: expected non-decreasing entries, got {values[i]} then {values[i + 1]} at "
                             f"index {i} ({short_list(list(values))})")


def check_int32_count(count: int, name: str, what: str) -> None:
    """A host-known count (``what`` says what it is, e.g. "the local tokens B * L of q") that an
    int32 index or cumulative length must hold is at most ``INT32_MAX``."""
    if count > INT32_MAX:
        raise ValueError(f"{name}: expected at most {INT32_MAX} {what} (int32 cumulative lengths), got {count}")


def host_ints(values: Sequence, name: str, expected: str) -> List[int]:
    """The entries of a host sequence as ints; ValueError "<name>: expected <expected>, got <type>"
    when ``values`` is not iterable."""
    try:
        return [int(x) for x in values]
    except TypeError:
        raise ValueError(f"{name}: expected {expected}, got {type(values).__name__}") from None


def as_cu_tensor(cu_seqlens: CuSeqlens, name: str, device=None) -> Tensor:
    """cu_seqlens as a 1-D int32 tensor (a list is converted after its values are checked to fit
    int32; a tensor must already be int32)."""
    if isinstance(cu_seqlens, Tensor):
        t = cu_seqlens
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    else:
        values = host_ints(cu_seqlens, name, "an int32 tensor or a sequence of ints")
        check_int32_values(values, name)
        t = torch.tensor(values, dtype=torch.int32, device=device)
    if t.dim() != 1 or t.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D tensor of batch_size + 1 >= 2 entries, got shape {tuple(t.shape)}")
    return t


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


def check_python_int(value, name: str, what: str) -> int:
    """value is a Python int >= 0 (``what`` says what it is, e.g. "the longest local sequence, a
    hint"); returns it as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected a Python int ({what}; a tensor would need a host sync), "
                         f"got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected >= 0, got {value}")
    return int(value)


# ---- q, k, v ---------------------------------------------------------------------------------------


def check_qkv(q, k, v, ndim: int, layout: str) -> None:
    """q, k, v are tensors of `ndim` dims (described by `layout`, e.g. "[local_tokens, heads,
    head_dim]"); q in a dtype of the kernels, k and v on q's device, in q's dtype, and v shaped
    like k; the backend of q's device runs that dtype and head_dim (``check_kernel_support``).

    Every scheme calls this before its first communication: an argument that the kernels would
    refuse must be refused here, on every rank alike, since a kernel call that raises after a
    collective has started leaves the ranks in the middle of it (the next call on the group then
    hangs or times out)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(t.shape)}")
    if layout.startswith("[batch") and q.shape[0] == 0:
        raise ValueError(f"q: expected a batch of at least one sequence {layout}, got shape {tuple(q.shape)}")
    dtype_code(q.dtype, "q")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got {t.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    check_kernel_support(q)


def check_kernel_support(q: Tensor) -> None:
    """The backend of q's device runs attention in q's dtype at q's head_dim (the last dim): on
    CPU a multiple of 8 in [8, 256], on CUDA the head dims compiled in and float16 / bfloat16.
    ValueError (NotImplementedError for what this build or device lacks) with the library's
    message, naming head_dim or the device. Other devices (a meta tensor of a single-process
    call) are left to the kernels."""
    device = q.device
    if device.type == "cpu":
        _lib.check_support(_lib.DEVICE_CPU, 0, dtype_code(q.dtype, "q"), q.shape[-1])
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        _lib.check_support(_lib.DEVICE_CUDA, index, dtype_code(q.dtype, "q"), q.shape[-1])


def with_contiguous_head_dim(t: Tensor) -> Tensor:
    """t itself when its last dim (head_dim) is contiguous, as the kernels take it (any token and
    head strides), else a copy that is (differentiable: its gradient flows back to t)."""
    if t.shape[-1] <= 1 or t.numel() == 0 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def check_local_tokens(q: Tensor, k: Tensor, v: Tensor, why: str) -> None:
    """k and v have the local tokens (dim 0) of q; ``why`` ends the message, e.g. "the tokens of
    q: the zigzag layout shards q, k and v alike"."""
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name}: expected {q.shape[0]} local tokens ({why}), got {t.shape[0]}")


def check_heads(q: Tensor, k: Tensor) -> None:
    """q ``[..., Hq, D]`` and k ``[..., Hk, D]``: the same head_dim, and Hq a multiple of Hk."""
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"k: expected head_dim {D} (the head_dim of q), got {k.shape[-1]}")
    Hq, Hk = q.shape[-2], k.shape[-2]
    if Hq == 0:
        raise ValueError(f"q: expected at least one head, got shape {tuple(q.shape)}")
    if Hk == 0:
        raise ValueError(f"k: expected at least one KV head, got shape {tuple(k.shape)}")
    if Hq % Hk:
        raise ValueError(f"q: expected a number of heads divisible by the KV heads of k ({Hk}), got {Hq}")


def check_heads_k_stride(heads_k_stride, num_heads_k: int) -> None:
    """heads_k_stride is an int >= 1 dividing the KV heads."""
    if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, numbers.Integral) or heads_k_stride < 1:
        raise ValueError(f"heads_k_stride: expected an int >= 1, got {heads_k_stride!r}")
    if num_heads_k % heads_k_stride:
        raise ValueError(f"heads_k_stride: expected a divisor of the KV heads of k ({num_heads_k}), got {heads_k_stride}")


def check_collective_device(q: Tensor, world_size: int) -> None:
    """With more than one rank, q is on a device the collectives run on (CPU: gloo, CUDA: NCCL)."""
    if world_size > 1 and q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q: expected a CPU or CUDA tensor, got device {q.device}")


def unpack(packed, name: str, count: int, layout: str):
    """Splits a packed ``kv`` (count 2) or ``qkv`` (count 3) tensor along its packing dim, the
    third from last in every layout (e.g. "[local_tokens, 2, heads_k, head_dim]"): views, no copy."""
    ndim = layout.count(",") + 1
    if not isinstance(packed, Tensor) or packed.dim() != ndim or packed.shape[-3] != count:
        got = tuple(packed.shape) if isinstance(packed, Tensor) else type(packed).__name__
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got {got}")
    return packed.unbind(-3)


def unpack_batched_kv(kv: Tensor) -> Tuple[Tensor, Tensor]:
    """k, v views of a packed ``kv [B, L, 2, Hk, D]``."""
    return unpack(kv, "kv", 2, "[batch, local_seqlen, 2, heads_k, head_dim]")


def unpack_batched_qkv(qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v views of a packed ``qkv [B, L, 3, H, D]``."""
    return unpack(qkv, "qkv", 3, "[batch, local_seqlen, 3, heads, head_dim]")


def unpack_varlen_kv(kv: Tensor) -> Tuple[Tensor, Tensor]:
    """k, v views of a packed ``kv [T, 2, Hk, D]``."""
    return unpack(kv, "kv", 2, "[local_tokens, 2, heads_k, head_dim]")


def unpack_varlen_qkv(qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v views of a packed ``qkv [T, 3, H, D]``."""
    return unpack(qkv, "qkv", 3, "[local_tokens, 3, heads, head_dim]")
