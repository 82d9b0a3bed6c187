"""The zigzag layout: index maps, shard/unshard/gather of a packed batch, cu_seqlens helpers.

Zigzag layout over N ranks: every sequence b of a packed batch (global ``cu_seqlens``, length
L_b) is cut into 2N chunks of ``c_b`` tokens; rank r holds chunks r and 2N-1-r of every
sequence, in that order, sequence after sequence::

    local rows of rank r = [seq 0: chunk r, chunk 2N-1-r][seq 1: chunk r, chunk 2N-1-r] ...

A length that is a multiple of 2N has chunks of ``c_b = L_b / 2N`` tokens. Any other length is
padded at the END of its sequence to ``P_b = ceil(L_b / 2N) 2N`` (``c_b = P_b / 2N``): the
padding rows are the last global positions, so they are the last rows of the chunks that hold
them (the real rows of every rank's piece are a prefix of it, ``padding``). The rank's LOCAL
``cu_seqlens`` is the padded global one divided by N (sequence b has ``2 c_b`` local rows;
``zigzag_local_cu_seqlens``). Causal work is balanced: chunk r ("early") sees the (r+1) c_b first
keys of its sequence, chunk 2N-1-r ("late") the (2N-r) c_b first keys. The padding costs the
padded rows: at most 2N - 1 per sequence, masked through lengths (they never act as keys).

The index maps are built with tensor ops on the device of ``cu_seqlens`` from sizes the host
already knows (tensor shapes, world size, rank): no ``.item()``, no device-to-host copy, so the
maps can be built inside the attention's hot path and inside a CUDA graph. The shard, unshard
and gather helpers read the lengths once on the host (the shard's size depends on them: a setup
step). Metadata VALUES are checked on the host only where that is free (CPU tensors, Python
lists) or when ``RING_FLASH_ATTN_CHECK_METADATA=1`` asks for it; the maps clamp every index into
range, so malformed metadata gives wrong rows, never an out-of-bounds access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .index_maps import sequence_of
from .padding import checked_cu, local_cu_seqlens, shard, unshard, unshard_index, with_shard_args_doc
from .validation import CuSeqlens, as_cu_tensor, check_world, metadata_checks_enabled

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "zigzag_check_cu_seqlens",
    "zigzag_gathered_to_global_index",
    "zigzag_local_cu_seqlens",
    "zigzag_local_to_global_index",
    "zigzag_shard",
    "zigzag_unshard",
    "zigzag_gather",
    "zigzag_llama3_prepare_cu_seqlens",
]


# ---- metadata checks -------------------------------------------------------------------------


def zigzag_check_cu_seqlens(
    cu_seqlens: CuSeqlens,
    world_size: int,
    name: str = "cu_seqlens",
    total: Optional[int] = None,
    total_what: str = "",
) -> List[int]:
    """Check GLOBAL cu_seqlens values for the zigzag layout and return them as a list.

    Reads the values on the host (a device-to-host copy for a CUDA tensor: call it at setup, not
    in the hot path). Raises ValueError naming ``name``: first entry not 0, a decreasing entry, or
    (with ``total``) a last entry that is not ``total``. Any length is accepted (a length that is
    not a multiple of 2 * world_size is padded, see the module docstring).
    """
    check_world(world_size)
    values = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else [int(x) for x in cu_seqlens]
    if len(values) < 2:
        raise ValueError(f"{name}: expected batch_size + 1 >= 2 entries, got {len(values)}")
    if values[0] != 0:
        raise ValueError(f"{name}: expected the first entry to be 0, got {values[0]}")
    for b in range(len(values) - 1):
        length = values[b + 1] - values[b]
        if length < 0:
            raise ValueError(f"{name}: expected non-decreasing entries, got {values[b]} then {values[b + 1]} "
                             f"at index {b}")
    if total is not None and values[-1] != total:
        raise ValueError(f"{name}: expected the last entry to be {total}{total_what}, got {values[-1]}")
    return values


# ---- cu_seqlens of the local shard -------------------------------------------------------------


def zigzag_local_cu_seqlens(cu_seqlens: CuSeqlens, world_size: int) -> Tensor:
    """The LOCAL cu_seqlens of every rank (the same on all ranks) for the GLOBAL ``cu_seqlens``.

    Sequence b has ``2 c_b`` local rows (chunks r and 2N-1-r of ``c_b = ceil(L_b / 2N)`` rows
    each, padding included): ``cu_seqlens // world_size`` when every length is a multiple of 2N.
    A device op on a tensor input (no host sync); a list input gives a CPU tensor.
    """
    check_world(world_size)
    cu = as_cu_tensor(cu_seqlens, "cu_seqlens")
    if cu.device.type == "cpu" or not isinstance(cu_seqlens, Tensor):
        zigzag_check_cu_seqlens(cu, world_size)
    return local_cu_seqlens("zigzag", cu, world_size)


# ---- index maps ------------------------------------------------------------------------------


def zigzag_local_to_global_index(
    cu_seqlens: Tensor, rank: int, world_size: int, total_local: int
) -> Tensor:
    """int64 ``[total_local]``: the global row (natural order) of each local row of ``rank``.

    ``cu_seqlens`` is the GLOBAL int32 tensor of the PADDED batch (every length a multiple of
    2 * world_size); the map is built on its device without a host sync
    (indices are clamped into ``[0, world_size * total_local)``).
    """
    check_world(world_size, rank)
    cu = cu_seqlens.to(torch.int64)
    two_n = 2 * world_size
    rows = torch.arange(total_local, device=cu.device, dtype=torch.int64)
    cu_local = torch.div(cu, world_size, rounding_mode="floor")
    b = sequence_of(rows, cu_local)
    chunk = torch.div(cu[1:] - cu[:-1], two_n, rounding_mode="floor")[b]
    pos = rows - cu_local[b]  # position among the sequence's 2 c_b local rows
    second = pos >= chunk  # in chunk 2N-1-r
    chunk_index = torch.where(second, two_n - 1 - rank, rank)
    glob = cu[b] + chunk_index * chunk + pos - second.to(torch.int64) * chunk
    total_global = max(world_size * total_local, 1)
    return glob.clamp_(0, total_global - 1)


def zigzag_gathered_to_global_index(cu_seqlens: Tensor, world_size: int, total_local: int) -> Tensor:
    """int64 ``[world_size * total_local]``: for each global row (natural order), its row in the
    rank-major concatenation of every rank's local shard (what ``all_gather_into_tensor`` gives).

    ``gathered.index_select(0, idx)`` puts gathered rows back in natural order. Built on the device
    of ``cu_seqlens`` (GLOBAL, int32, of the PADDED batch: every length a multiple of
    2 * world_size) without a host sync; indices are clamped into range.
    """
    check_world(world_size)
    cu = cu_seqlens.to(torch.int64)
    N, two_n = world_size, 2 * world_size
    total_global = world_size * total_local
    rows = torch.arange(total_global, device=cu.device, dtype=torch.int64)
    b = sequence_of(rows, cu)
    chunk_all = torch.div(cu[1:] - cu[:-1], two_n, rounding_mode="floor")
    chunk = chunk_all[b]
    pos = rows - cu[b]
    j = torch.div(pos, chunk.clamp(min=1), rounding_mode="floor").clamp_(0, two_n - 1)  # chunk index
    offset = pos - j * chunk
    second = j >= N
    owner = torch.where(second, two_n - 1 - j, j)
    local = 2 * torch.div(cu[b], two_n, rounding_mode="floor") + second.to(torch.int64) * chunk + offset
    return (owner * total_local + local).clamp_(0, max(total_global, 1) - 1)


# ---- shard and gather ----------------------------------------------------------------------------


@with_shard_args_doc
def zigzag_shard(x: Tensor, cu_seqlens: Optional[CuSeqlens], rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s zigzag shard of a packed global batch (or of a batch of equal-length sequences).

    {shard_args}

    Returns a new tensor (not a view) on x's device: ``[total_local, ...]`` (packed; its local
    cu_seqlens is ``zigzag_local_cu_seqlens(cu_seqlens, world_size)``) or ``[B, P / N, ...]``
    (batched). A sequence whose length L is not a multiple of 2N is padded at its end to
    ``P = ceil(L / 2N) 2N`` with zero rows (the attention functions mask them given the real
    lengths: ``seqlens`` of the ring functions, ``cu_seqlens_k`` of zigzag llama3); undo with
    ``zigzag_unshard`` / ``zigzag_gather``. Reads the lengths on the host (one device-to-host copy
    for a CUDA tensor: a setup step).
    """
    return shard("zigzag", x, cu_seqlens, rank, world_size)


def zigzag_unshard(shards: Sequence[Tensor], cu_seqlens: Optional[CuSeqlens], seqlen: Optional[int] = None) -> Tensor:
    """The inverse of ``zigzag_shard``: N local shards (rank order) -> the global batch in natural
    order without the padding. ``cu_seqlens`` is the GLOBAL one of the packed batch; for batched
    shards ``[B, L, ...]`` pass None and the real global length ``seqlen`` (default N L). Pure
    tensor ops (no communication)."""
    return unshard("zigzag", shards, cu_seqlens, seqlen)


def zigzag_gather(x_local: Tensor, cu_seqlens: CuSeqlens, group: Optional[ProcessGroup] = None) -> Tensor:
    """All-gather every rank's zigzag shard and return the global batch in natural order without
    the padding (on all ranks). ``cu_seqlens`` is the GLOBAL one. Not differentiable. Collective:
    every rank of ``group`` must call it (with ``RING_FLASH_ATTN_CHECK_METADATA=1``, ranks passing
    different shard shapes, dtypes or cu_seqlens get a RuntimeError instead of an abort in the
    collective)."""
    import torch.distributed as dist

    from .rank_agreement import Fingerprint, RankAgreement, device_of

    world_size = dist.get_world_size(group)
    agreement = RankAgreement("zigzag_gather", group, world_size, device_of(x_local), values_checked=True)
    with agreement.validating():
        if not isinstance(x_local, Tensor) or x_local.dim() < 1:
            raise ValueError(f"x_local: expected a tensor with a token dim 0, got "
                             f"{getattr(x_local, 'shape', type(x_local).__name__)}")
        cu = checked_cu(cu_seqlens, x_local.device)
        local_total = int(zigzag_local_cu_seqlens(cu, world_size)[-1])
        if x_local.shape[0] != local_total:
            raise ValueError(f"x_local: expected {local_total} rows (the zigzag shard of cu_seqlens over "
                             f"{world_size} ranks), got {x_local.shape[0]}")
    agreement.check(lambda: Fingerprint().shape("the shape of x_local", x_local.shape)
                    .dtype("the dtype of x_local", x_local.dtype).tensor_values("cu_seqlens", cu))
    x_local = x_local.contiguous()
    gathered = torch.empty((world_size * x_local.shape[0],) + tuple(x_local.shape[1:]),
                           dtype=x_local.dtype, device=x_local.device)
    dist.all_gather_into_tensor(gathered, x_local, group=group)
    return gathered.index_select(0, unshard_index("zigzag", cu, world_size, x_local.shape[0], "x_local"))


# ---- cu_seqlens preparation (upstream-style helpers) ---------------------------------------------


def zigzag_llama3_prepare_cu_seqlens(
    cu_seqlens: CuSeqlens,
    causal: bool = True,
    rank: Optional[int] = None,
    world_size: int = 1,
    max_seqlen: Optional[int] = None,
) -> Tuple[Tensor, Tensor, int, int, slice]:
    """What ``zigzag_llama3_flash_attn_varlen_func`` takes, from the GLOBAL cu_seqlens of a batch.

    Returns ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)`` in the
    order of upstream's ``llama3_flash_attn_prepare_cu_seqlens``:

    * ``cu_seqlens_q``: the rank's LOCAL cumulative lengths (``zigzag_local_cu_seqlens``:
      ``2 ceil(L_b / 2N)`` rows per sequence, global // world_size when every length is a
      multiple of 2N; the same on every rank, so ``rank`` is accepted for signature
      compatibility only);
    * ``cu_seqlens_k``: the GLOBAL cumulative lengths (the input, as an int32 tensor: the real
      lengths, from which the attention function knows which local rows are padding);
    * ``max_seqlen_q``: the longest local sequence (``2 ceil(max L_b / 2N)``); ``max_seqlen_k``:
      max L_b;
    * ``local_k_slice``: ``slice(None)``: in the zigzag layout every rank needs the whole gathered
      K/V (its late chunk sees up to the end of every sequence but one chunk).

    A setup step: the maxima are read on the host (one device-to-host copy for a CUDA tensor)
    unless ``max_seqlen`` (the longest GLOBAL sequence, a Python int) is given, in which case
    nothing is read and values are checked only where that is free (CPU tensors, lists) or with
    ``RING_FLASH_ATTN_CHECK_METADATA=1``. ``causal`` is accepted for upstream compatibility (both
    cases use the same metadata).

    Under ``torch.compile`` nothing is read on the host and the function traces without a graph
    break: the value checks become one device-side assert (a RuntimeError on CPU, a device assert
    on CUDA) instead of the ValueErrors, and without ``max_seqlen`` the longest sequence is a
    data-dependent int (``torch._dynamo.config.capture_scalar_outputs = True`` keeps it in the
    graph; otherwise that read is a graph break).

    Any lengths: a sequence whose length is not a multiple of 2N is padded at its end (the
    module docstring); shard the tensors with ``zigzag_shard``, which pads them the same way.
    """
    check_world(world_size, rank)
    cu = as_cu_tensor(cu_seqlens, "cu_seqlens")
    if torch.compiler.is_compiling():
        return _zigzag_llama3_prepare_traced(cu, world_size, max_seqlen)
    if max_seqlen is None or not isinstance(cu_seqlens, Tensor) or metadata_checks_enabled(cu.device):
        values = zigzag_check_cu_seqlens(cu, world_size)
        longest = max(values[b + 1] - values[b] for b in range(len(values) - 1))
        if max_seqlen is not None and int(max_seqlen) < longest:
            raise ValueError(f"max_seqlen: expected >= the longest sequence ({longest}), got {max_seqlen}")
        if max_seqlen is None:
            max_seqlen = longest
    max_seqlen = int(max_seqlen)
    return local_cu_seqlens("zigzag", cu, world_size), cu, _local_max(max_seqlen, world_size), max_seqlen, slice(None)


def _local_max(max_seqlen: int, world_size: int) -> int:
    """The longest local sequence of a global one of max_seqlen tokens: 2 ceil(max_seqlen / 2N)."""
    two_n = 2 * world_size
    return 2 * (-(-max_seqlen // two_n))


def _zigzag_llama3_prepare_traced(cu: Tensor, world_size: int,
                                  max_seqlen: Optional[int]) -> Tuple[Tensor, Tensor, int, int, slice]:
    """``zigzag_llama3_prepare_cu_seqlens`` under torch.compile: no host read, the value checks
    as one device-side assert."""
    cu64 = cu.to(torch.int64)
    lengths = cu64[1:] - cu64[:-1]
    valid = (cu64[0] == 0) & (lengths >= 0).all()
    what = "cumulative lengths from 0, non-decreasing"
    if max_seqlen is not None:
        max_seqlen = int(max_seqlen)
        valid = valid & (lengths.max() <= max_seqlen)
        what += f", none longer than max_seqlen = {max_seqlen}"
    torch._assert_async(valid, f"cu_seqlens: expected {what}")
    if max_seqlen is None:
        max_seqlen = lengths.max().item()
    cu_q = local_cu_seqlens("zigzag", cu, world_size)
    return cu_q, cu, 2 * ((max_seqlen + 2 * world_size - 1) // (2 * world_size)), max_seqlen, slice(None)
