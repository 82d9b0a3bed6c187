"""What the registry knows of a context-parallel scheme (``ContextParallelScheme``), and the
contract between a scheme and the HuggingFace adapter (``HFBinding``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor

__all__ = ["BatchMetadata", "BatchNotSupported", "ContextParallelScheme", "HFBinding"]

# What a scheme's varlen function takes after q, k, v (llama3's signature):
# (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice).
BatchMetadata = Tuple[Tensor, Tensor, int, int, slice]


class BatchNotSupported(ValueError):
    """A scheme's layout cannot take a packed batch (e.g. a sequence length it cannot split
    evenly); the message says why. The HF adapter reports it when the scheme is used on that
    batch, not when the batch is set, so that the other schemes still take it."""


@dataclass(frozen=True)
class HFBinding:
    """How transformers models run a scheme through ``ring_flash_attn.hf_adapter``.

    attn_implementation: the name registered in transformers' ``AttentionInterface`` (it must
        not contain "flash": transformers would look for the flash_attn package).
    prepare_batch: ``(cu_seqlens, rank, world_size) -> {causal: BatchMetadata}`` for both causal
        flags, from the GLOBAL cumulative lengths of the packed batch (a list of ints, already
        checked to start at 0, not decrease and have a total divisible by world_size); host
        values, CPU tensors (the adapter moves them to the activations' device). Raises
        ``BatchNotSupported`` for a batch the layout cannot take.

    The adapter calls the scheme's ``varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice, dropout_p=..., softmax_scale=...,
    causal=..., deterministic=..., group=...)`` with q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` (the
    rank's T tokens in the scheme's layout), plus ``window_size=``, ``softcap=`` and ``sinks=``
    when the model's layer uses them, and expects out ``[T, Hq, D]``.
    """

    attn_implementation: str
    prepare_batch: Callable[[List[int], int, int], Dict[bool, BatchMetadata]]


@dataclass(frozen=True)
class ContextParallelScheme:
    """One context-parallel scheme.

    name: the registry key (e.g. ``"zigzag_llama3"``).
    layout: how the tokens are spread over the ranks (``"contiguous"``, ``"zigzag"``,
        ``"stripe"``), as the errors and docs name it.
    summary: one line for listings.
    func: the batched ``[B, L, H, D]`` form, if the scheme has one.
    varlen_func: the packed ``[T, H, D]`` form, if the scheme has one.
    shard: the layout helper that cuts a global packed batch into the rank's part
        (``(x, cu_seqlens, rank, world_size) -> x_local``, padding a length that does not
        divide; ring, zigzag and stripe also take a batched ``x [B, S, ...]`` with
        ``cu_seqlens=None``), if the package has one.
    unshard: its inverse (``(shards, cu_seqlens) -> x`` without the padding, shards in rank
        order), if the package has one.
    prepare_cu_seqlens: the helper that derives the varlen form's metadata from the GLOBAL
        cu_seqlens, if the package has one (see its docstring for what it returns).
    hf: how the HF adapter runs the scheme; None: not offered to transformers models.
    """

    name: str
    layout: str
    summary: str
    func: Optional[Callable] = None
    varlen_func: Optional[Callable] = None
    shard: Optional[Callable] = None
    unshard: Optional[Callable] = None
    prepare_cu_seqlens: Optional[Callable] = None
    hf: Optional[HFBinding] = None
