"""HuggingFace transformers adapter: llama3 context parallelism inside a transformers model.

Two ways in, sharing one state (the process group, ``heads_k_stride`` and the current batch's
metadata):

1. **Our attention implementations** (recommended), registered in transformers'
   ``AttentionInterface`` by ``register_hf_attention(process_group, heads_k_stride)``: one per
   scheme of ``ring_flash_attn.cp.registry`` with an ``hf`` binding, today

   * ``"ring_attn_llama3"`` (``HF_ATTN_LLAMA3``): the CONTIGUOUS layout of
     ``llama3_flash_attn_varlen_func``: of a packed row (``T`` tokens, ``T % N == 0``, any
     sequence lengths) rank r holds tokens ``[r T/N, (r+1) T/N)``;
   * ``"ring_attn_zigzag_llama3"`` (``HF_ATTN_ZIGZAG_LLAMA3``): the ZIGZAG layout of
     ``zigzag_llama3_flash_attn_varlen_func`` (``zigzag_shard``; every sequence length a multiple
     of 2N; causal work balanced across ranks);
   * ``"ring_attn_ulysses"`` (``HF_ATTN_ULYSSES``) and ``"ring_attn_hybrid"``
     (``HF_ATTN_HYBRID``, on the active hybrid mesh): the all-to-all schemes (docs/all-to-all.md).

   Build the model with ``attn_implementation=HF_ATTN_LLAMA3`` (or switch an existing one with
   ``model.set_attn_implementation(...)``). Neither name contains "flash": transformers treats
   any implementation whose name contains "flash" as a FlashAttention kernel to import, and
   would refuse ours without the flash_attn package. They need no flash_attn package. The same
   call registers, for each name, the function transformers' mask creation calls
   (``AttentionMaskInterface``): it hands the model's 2-D padding mask to the attention
   function unchanged (without it transformers drops a 2-D mask for implementations it does
   not know).

2. **Upstream ring-flash-attention's drop-in** ``substitute_hf_flash_attn(process_group,
   heads_k_stride)``: a model built with ``attn_implementation="flash_attention_2"`` runs the
   contiguous llama3 scheme. It registers the contiguous function under ``"flash_attention_2"``
   and replaces ``transformers.modeling_flash_attention_utils._flash_attention_forward`` (for
   code that calls that private function directly); ``restore_hf_flash_attn()`` undoes both and
   ``use_ring_attn(False)`` routes ``"flash_attention_2"`` back to transformers' own functions
   without undoing. transformers still checks at model construction that the flash_attn package
   is installed for ``"flash_attention_2"``; where it is not (e.g. CPU), use way 1.

Either way, before the forward of every batch, every rank describes the GLOBAL batch with
``update_ring_flash_attn_params`` (on the host, once per batch; the attention calls in the
layers then read nothing from the device), in one of two forms:

* **a packed row** (``update_ring_flash_attn_params(cu_seqlens, group)``): the cumulative
  sequence lengths of the sequences packed into one row (int tensor ``[S + 1]``,
  ``cu_seqlens[-1] == T``). The model's input is the rank's shard of the row, batch size 1:
  ``input_ids`` ``[1, T/N]`` and the matching ``position_ids`` (restarting at 0 with every
  sequence, so RoPE sees the right positions); no attention_mask, or one without padding.
* **a batch of padded rows** (``update_ring_flash_attn_params(attention_mask=mask, process_group=
  group)``): ``mask`` ``[B, L]`` (1 = token, 0 = padding; left, right or both-sided padding: each
  row's tokens are one run). A row's sequences are its run of tokens and its padding, cut into
  pieces of at most 128 tokens (zigzag: a multiple of 2N): the tokens attend to each other only,
  each padding piece among itself (about 64 key visits per padding token), and the attention
  outputs at padding are zeros. The model's input is the rank's shard of every row, ``[B, L/N]``:
  ``shard_padded_batch(x, mask, attn_implementation, rank, N)`` cuts it (contiguous layout:
  columns ``[r L/N, (r+1) L/N)`` of every row, one call of the scheme per row; zigzag: the zigzag
  shard of each of the row's sequences, one call for all rows); ``unshard_padded_batch`` puts the
  ranks' outputs back. Pass
  the rank's shard of the mask as the model's ``attention_mask`` (or none): it is checked
  against the mask given here.

The attention features of today's models reach the scheme: a layer's ``sliding_window`` W
(Mistral, Qwen2's sliding layers, Gemma 2/3, gpt-oss, ModernBERT's local layers) is transformers'
flash-attention convention, a window of ``(W - 1, 0)`` with causal attention (the key and the W - 1
before it) and ``(W - 1, W - 1)`` without; ``softcap`` (Gemma 2's attention logit soft-capping)
and the sink logits ``s_aux`` (gpt-oss; a ``[num_heads]`` parameter whose gradient flows back) are
passed on; ``is_causal=False`` (encoders) runs non-causal attention. Windows and positions count
within each sequence of the batch, over the GLOBAL sequence (not the rank's shard). The sinks'
gradient of a rank is its tokens' share: sum the parameter gradients over the context-parallel
ranks as for every other parameter (e.g. the data-parallel all-reduce spanning them).

Keep the metadata until the backward is done (gradient checkpointing recomputes the forward with
it). A 4-D ``attention_mask`` (an arbitrary mask) and a decoding step over a KV cache raise a
named error. ``use_cache=True`` in a training forward (the default of most causal-LM configs)
runs: transformers keeps each layer's local K/V in a cache that nothing reads; pass
``use_cache=False`` to save that memory.

transformers is imported lazily: ``import ring_flash_attn`` works without it; the functions that
need it raise ImportError naming ``pip install transformers``.
"""

from __future__ import annotations

import numbers
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .cp.llama3 import HF_ATTN_LLAMA3
from .cp.process_group import resolve_group
from .cp.rank_agreement import Fingerprint, RankAgreement, device_of
from .cp.registry import hf_scheme, hf_schemes
from .cp.scheme import BatchMetadata, BatchNotSupported, ContextParallelScheme
from .cp.validation import INT32_MAX, check_cumulative_values, check_int32_values, check_world, host_ints, short_list

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
from .cp.zigzag_llama3 import HF_ATTN_ZIGZAG_LLAMA3

__all__ = [
    "HF_ATTN_LLAMA3",
    "HF_ATTN_ZIGZAG_LLAMA3",
    "llama3_attention_forward",
    "register_hf_attention",
    "restore_hf_flash_attn",
    "shard_padded_batch",
    "substitute_hf_flash_attn",
    "unshard_padded_batch",
    "update_ring_flash_attn_params",
    "use_ring_attn",
    "zigzag_llama3_attention_forward",
]

# What "flash_attention_2" runs after substitute_hf_flash_attn (upstream's adapter: contiguous llama3).
_SUBSTITUTED_SCHEME = HF_ATTN_LLAMA3


def _transformers():
    """The transformers module, or an ImportError that says how to get it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "ring_flash_attn.hf_adapter needs HuggingFace transformers, which is not installed: "
            "pip install transformers") from e
    return transformers


# ---- state ---------------------------------------------------------------------------------------

# Layouts that cut every sequence of a packed batch on its own and lay a rank's parts out sequence
# after sequence (zigzag: chunks r and 2N-1-r of each sequence). The rows of a padded batch,
# flattened row after row, are then one packed batch of that layout, and one call of the scheme
# covers all rows. Other layouts run one call per row (contiguous: a rank's columns of a row are a
# contiguous piece of that row, not of the flattened batch).
_SEQUENCE_WISE_LAYOUTS = frozenset({"zigzag"})

# One call of a scheme's varlen function over rows [first, end) of the batch: (first, end, metadata).
_Call = Tuple[int, int, BatchMetadata]


@dataclass
class _SchemeBatch:
    """How one scheme runs the current batch on this rank (host values, CPU tensors; moved to
    the activations' device once per device)."""

    # one entry per call of the scheme's varlen function: (first row, end row, {causal: metadata})
    calls: List[Tuple[int, int, Dict[bool, BatchMetadata]]]
    # bool [B, S]: which of the rank's S columns of each row hold tokens (False: padding);
    # None for a packed row (every column holds a token)
    local_tokens: Optional[Tensor]
    _on_device: Dict[Tuple[bool, str], Tuple[List[_Call], Optional[Tensor]]] = field(default_factory=dict)
    # the model's attention_mask last found to match local_tokens (weak reference, version):
    # transformers passes one mask object to every layer, so it is compared once per forward
    _checked_mask: Optional[weakref.ref] = None
    _checked_version: int = -1
    has_padding: bool = field(init=False)  # some of the rank's columns are padding

    def __post_init__(self) -> None:
        self.has_padding = self.local_tokens is not None and not bool(self.local_tokens.all())

    def on_device(self, causal: bool, device: torch.device) -> Tuple[List[_Call], Optional[Tensor]]:
        """The calls' metadata for ``causal`` and the token mask, on ``device`` (copied once, no sync)."""
        key = (causal, str(device))
        if key not in self._on_device:
            calls = [(first, end, tuple(x.to(device, non_blocking=True) if isinstance(x, Tensor) else x
                                        for x in metadata[causal]))
                     for first, end, metadata in self.calls]
            tokens = None if self.local_tokens is None else self.local_tokens.to(device, non_blocking=True)
            self._on_device[key] = (calls, tokens)
        return self._on_device[key]


@dataclass
class _BatchParams:
    """What update_ring_flash_attn_params computed for one batch (host values + metadata)."""

    world_size: int
    rank: int
    rows: int  # B: the batch size the model sees (1 for a packed row)
    row_length: int  # tokens of each row on all ranks (L; T for a packed row)
    padded: bool  # described by an attention_mask (a batch of padded rows), else by cu_seqlens
    # per scheme name: how the scheme runs the batch, or why its layout cannot take it
    prepared: Dict[str, Union[_SchemeBatch, BatchNotSupported]]

    @property
    def total(self) -> int:
        """The tokens of the batch on all ranks (padding included): B * L (T for a packed row)."""
        return self.rows * self.row_length

    @property
    def local_length(self) -> int:
        """S: the tokens of each row that one rank holds."""
        return self.row_length // self.world_size

    def scheme_batch(self, attn_implementation: str) -> _SchemeBatch:
        scheme = hf_scheme(attn_implementation)
        if scheme.name not in self.prepared:
            raise RuntimeError(f"ring_flash_attn.hf_adapter: no metadata of the scheme {scheme.name!r} (registered "
                               f"after update_ring_flash_attn_params): call update_ring_flash_attn_params again")
        prepared = self.prepared[scheme.name]
        if isinstance(prepared, BatchNotSupported):
            what = "attention_mask" if self.padded else "cu_seqlens"
            raise ValueError(f"{what}: the {scheme.layout} layout cannot take this batch: {prepared}")
        return prepared


@dataclass
class _AdapterState:
    group: Any = None  # None: the default process group (or a single process without one)
    heads_k_stride: int = 1
    batch: Optional[_BatchParams] = None
    enabled: bool = True  # use_ring_attn: only affects the substituted "flash_attention_2"
    substituted: bool = False
    original_attention: Optional[Callable] = None  # transformers' "flash_attention_2" function
    original_flash_forward: Optional[Callable] = None  # modeling_flash_attention_utils._flash_attention_forward


_STATE = _AdapterState()
_LOCK = threading.Lock()


def _check_stride(heads_k_stride) -> int:
    if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, int) or heads_k_stride < 1:
        raise ValueError(f"heads_k_stride: expected an int >= 1 (KV heads per all-gather slice), got "
                         f"{heads_k_stride!r}")
    return heads_k_stride


def _scheme_of(attn_implementation: str) -> ContextParallelScheme:
    """The scheme an attention implementation runs (``"flash_attention_2"``: the substituted one)."""
    return hf_scheme(_SUBSTITUTED_SCHEME if attn_implementation == "flash_attention_2" else attn_implementation)


# ---- per-batch metadata: a packed row --------------------------------------------------------------


def _checked_values(cu_seqlens, world_size: int) -> List[int]:
    """The values of update_ring_flash_attn_params's cu_seqlens (one host read), checked."""
    if isinstance(cu_seqlens, Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens: expected an integer tensor, got dtype {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens: expected a 1-D tensor of batch_size + 1 >= 2 entries, got shape "
                             f"{tuple(cu_seqlens.shape)}")
        values = cu_seqlens.tolist()  # in its own dtype: checked before anything is narrowed to int32
    else:
        values = host_ints(cu_seqlens, "cu_seqlens", "an integer tensor or a list of ints")
    check_cumulative_values(values, "cu_seqlens")
    check_int32_values(values, "cu_seqlens")
    if values[-1] % world_size:
        raise ValueError(f"cu_seqlens: expected a total length divisible by the world size {world_size} of the "
                         f"process group (each rank holds total / world_size tokens), got {values[-1]}")
    return values


# ---- per-batch metadata: a batch of padded rows ------------------------------------------------------


# A row's padding is cut into pieces of at most this many tokens, each a sequence of its own:
# attention among the padding then costs about _PADDING_PIECE / 2 key visits per padding token
# (one key tile), not half the length of the padding run, and the outputs are discarded anyway.
_PADDING_PIECE = 128

# (first token, number of tokens) of a row of a padded batch: its tokens are one run.
_Span = Tuple[int, int]


def _mask_rows(attention_mask: Tensor, world_size: int) -> Tuple[Tensor, List[_Span]]:
    """The GLOBAL padding mask on the host (bool ``[B, L]``, one device-to-host copy) and the
    span of each row's tokens, checked: one run of tokens per row, ``L % world_size == 0``."""
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask: expected a tensor [batch, seq] (1 = token, 0 = padding), got "
                         f"{type(attention_mask).__name__}")
    if attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask: expected a bool, integer or real tensor of 0 (padding) and 1 (token), got "
                         f"dtype {attention_mask.dtype}")
    if attention_mask.dim() != 2 or 0 in attention_mask.shape:
        raise ValueError(f"attention_mask: expected a 2-D [batch, seq] padding mask with at least one row and one "
                         f"column, got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.detach().to("cpu")
    if mask.dtype != torch.bool:
        bad = ((mask != 0) & (mask != 1)).nonzero()
        if bad.shape[0]:
            b, j = bad[0].tolist()
            raise ValueError(f"attention_mask: expected entries 0 (padding) or 1 (token), got {mask[b, j].item()} at "
                             f"[{b}, {j}]")
        mask = mask != 0
    rows, length = mask.shape
    if length % world_size:
        raise ValueError(f"attention_mask: expected a row length divisible by the world size {world_size} of the "
                         f"process group (each rank holds length / world_size tokens of every row), got {length}")
    if rows * length > INT32_MAX:
        raise ValueError(f"attention_mask: expected at most {INT32_MAX} entries (the flattened rows are indexed with "
                         f"int32), got {rows * length}")
    m = mask.to(torch.int8)
    token_runs = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]
    split = (token_runs > 1).nonzero()
    if split.shape[0]:
        b = split[0, 0].item()
        raise ValueError(f"attention_mask: expected padding only before and/or after the tokens of each row (left or "
                         f"right padding: one run of tokens per row), got {token_runs[b].item()} runs of tokens in "
                         f"row {b}: {short_list(m[b].tolist(), 32)}")
    spans = [(first if count else 0, count) for first, count in zip(m.argmax(1).tolist(), m.sum(1).tolist())]
    return mask, spans


def _padding_piece(scheme: ContextParallelScheme, world_size: int) -> int:
    """The longest piece of padding that is a sequence of its own: ``_PADDING_PIECE``, rounded
    down to a multiple of 2N for the zigzag layout (which cuts every sequence into 2N chunks)."""
    if scheme.layout in _SEQUENCE_WISE_LAYOUTS:
        two_n = 2 * world_size
        return max(two_n, _PADDING_PIECE // two_n * two_n)
    return _PADDING_PIECE


def _row_sequences(span: _Span, length: int, piece: int) -> List[int]:
    """The cumulative lengths of a row's sequences: its run of tokens, and each run of padding
    cut into pieces of ``piece`` tokens (the last piece of a run takes the rest)."""
    first, count = span
    cu = [0]
    for start, end, padding in ((0, first, True), (first, first + count, False), (first + count, length, True)):
        while padding and end - start > piece:
            start += piece
            cu.append(start)
        if end > start:
            cu.append(end)
    return cu


def _runs_text(spans: List[_Span], length: int, limit: int = 4) -> str:
    """The rows' runs, for error messages: "row 0: padding 4 + tokens 12, row 1: tokens 16, ..."."""
    parts = []
    for b, (first, count) in enumerate(spans[:limit]):
        runs = [("padding", first), ("tokens", count), ("padding", length - first - count)]
        parts.append(f"row {b}: " + " + ".join(f"{what} {n}" for what, n in runs if n))
    more = ", ..." if len(spans) > limit else ""
    return (f"a padded row's sequences are its tokens and its padding in pieces of at most "
            f"{_PADDING_PIECE} tokens; " + ", ".join(parts) + more)


def _row_columns(scheme: ContextParallelScheme, row_cu: List[int], row_length: int, rank: int,
                 world_size: int) -> Tensor:
    """int64 ``[row_length / N]``: the columns of a row (its sequences: ``row_cu``) that ``rank``
    holds in the scheme's layout (contiguous: one piece of the row; else the scheme's shard)."""
    per_rank = row_length // world_size
    if scheme.layout == "contiguous":
        return torch.arange(rank * per_rank, (rank + 1) * per_rank)
    if scheme.shard is None:
        raise BatchNotSupported(f"the {scheme.layout} layout has no shard helper to cut the rows of a padded batch")
    if scheme.layout in _SEQUENCE_WISE_LAYOUTS:
        # The layout's shard helper pads a sequence that is not a multiple of 2N (any-length CP), which
        # would make the rank's part of the row longer than L / N: the model takes [B, L / N] per rank,
        # so a padded row is only cut when each of its runs of tokens and of padding divides evenly.
        two_n = 2 * world_size
        lengths = [end - start for start, end in zip(row_cu, row_cu[1:])]
        bad = [n for n in lengths if n % two_n]
        if bad:
            raise BatchNotSupported(f"a row has a sequence of {bad[0]} tokens (its run of tokens or a piece of its "
                                    f"padding), expected every run of tokens and of padding of a padded row to be a "
                                    f"multiple of 2 * world_size = {two_n}; use the contiguous layout "
                                    f"({HF_ATTN_LLAMA3!r}) for such batches")
    try:
        columns = scheme.shard(torch.arange(row_length), torch.tensor(row_cu, dtype=torch.int32), rank, world_size)
    except ValueError as e:
        raise BatchNotSupported(str(e)) from None
    if columns.shape != (per_rank,):  # the rank's part of a row is L / N columns in every layout
        raise BatchNotSupported(f"the {scheme.layout} layout gives rank {rank} {tuple(columns.shape)} columns of a "
                                f"row of {row_length}, expected ({per_rank},)")
    return columns


def _columns(scheme: ContextParallelScheme, row_cus: List[List[int]], row_length: int, rank: int,
             world_size: int) -> Tensor:
    """int64 ``[B, row_length / N]``: the columns of every row that ``rank`` holds."""
    by_cu: Dict[Tuple[int, ...], Tensor] = {}
    for cu in row_cus:
        if tuple(cu) not in by_cu:
            by_cu[tuple(cu)] = _row_columns(scheme, cu, row_length, rank, world_size)
    return torch.stack([by_cu[tuple(cu)] for cu in row_cus])


def _scheme_row_sequences(scheme: ContextParallelScheme, spans: List[_Span], length: int,
                          world_size: int) -> List[List[int]]:
    """The cumulative lengths of every row's sequences for ``scheme``."""
    piece = _padding_piece(scheme, world_size)
    return [_row_sequences(span, length, piece) for span in spans]


def _padded_batch(scheme: ContextParallelScheme, mask: Tensor, spans: List[_Span], rank: int,
                  world_size: int) -> _SchemeBatch:
    """How ``scheme`` runs a batch of padded rows (``mask`` bool ``[B, L]`` on the host)."""
    rows, length = mask.shape
    row_cus = _scheme_row_sequences(scheme, spans, length, world_size)
    # the columns first: a row the layout cannot cut is refused by its runs (see _row_columns)
    local_tokens = mask.gather(1, _columns(scheme, row_cus, length, rank, world_size))
    if scheme.layout in _SEQUENCE_WISE_LAYOUTS:
        flat = [0]
        for b, cu in enumerate(row_cus):
            flat.extend(b * length + bound for bound in cu[1:])
        calls = [(0, rows, scheme.hf.prepare_batch(flat, rank, world_size))]
    else:
        by_cu: Dict[Tuple[int, ...], Dict[bool, BatchMetadata]] = {}
        calls = []
        for b, cu in enumerate(row_cus):
            if tuple(cu) not in by_cu:
                by_cu[tuple(cu)] = scheme.hf.prepare_batch(cu, rank, world_size)
            calls.append((b, b + 1, by_cu[tuple(cu)]))
    return _SchemeBatch(calls=calls, local_tokens=local_tokens)


def update_ring_flash_attn_params(cu_seqlens: Optional[Union[Tensor, Sequence[int]]] = None,
                                  process_group: Optional[ProcessGroup] = None, *,
                                  attention_mask: Optional[Tensor] = None) -> None:
    """Set the batch the next forward (and its backward) runs on: a packed row (``cu_seqlens``,
    upstream's semantics) or a batch of padded rows (``attention_mask``). Give exactly one.

    Args:
        cu_seqlens: a packed row: the GLOBAL cumulative sequence lengths, a 1-D integer tensor
            (or list of ints) ``[S + 1]``, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T`` (the
            tokens of all ranks, ``T % N == 0``). The model then takes batch size 1 and
            ``T / N`` tokens per rank.
        process_group: the context-parallel group (None: the default group, or a single process
            when ``torch.distributed`` is not initialised). Must be the group the attention runs
            on (the one given to ``register_hf_attention`` / ``substitute_hf_flash_attn``).
        attention_mask: a batch of padded rows: the GLOBAL padding mask ``[B, L]`` (any real or
            bool dtype; 1 = token, 0 = padding; ``L % N == 0``), the tokens of each row one run (left,
            right or both-sided padding). A row's sequences are its tokens and its padding in
            pieces of at most 128 tokens (zigzag: a multiple of 2N); the model then takes
            ``[B, L / N]`` per rank, each row cut in the scheme's layout (``shard_padded_batch``),
            and the attention outputs at padding are zeros.

    Either on any device: the values are read once here (one device-to-host copy for a CUDA
    tensor), and the metadata built from them is moved to the device of the attention inputs on
    first use: a setup step, once per batch, so that the attention calls of the layers
    never read the device. Computes, for this rank, the metadata of every scheme the adapter
    offers (its ``hf.prepare_batch`` in ``ring_flash_attn.cp.registry``); a scheme whose layout
    cannot take the batch (zigzag: a sequence, or a run of a padded row, whose length is not a
    multiple of 2N) raises ValueError when it runs on that batch.

    Raises:
        ValueError: neither or both of cu_seqlens and attention_mask; cu_seqlens not 1-D with
            >= 2 entries, not integer, not starting at 0, decreasing, with an entry outside int32,
            or a total not divisible by the group's world size; attention_mask not a 2-D tensor
            of 0/1 entries, a row length not divisible by the world size, or a row whose tokens
            are not one run.
        RuntimeError: with ``RING_FLASH_ATTN_CHECK_METADATA=1``, the ranks passed different
            batches (compared with one small all-gather; every rank raises). Without it, ranks
            given different batches compute wrong gradients.
    """
    group, world_size, rank = resolve_group(process_group)
    given = cu_seqlens if cu_seqlens is not None else attention_mask
    device = given.device if isinstance(given, Tensor) else torch.device("cpu")
    agreement = RankAgreement("update_ring_flash_attn_params", group, world_size, device, values_checked=True)
    with agreement.validating():
        if (cu_seqlens is None) == (attention_mask is None):
            raise ValueError(f"cu_seqlens, attention_mask: expected exactly one (cu_seqlens: a packed row; "
                             f"attention_mask: a batch of padded rows), got "
                             f"{'neither' if cu_seqlens is None else 'both'}")
        if attention_mask is None:
            values = _checked_values(cu_seqlens, world_size)
        else:
            mask, spans = _mask_rows(attention_mask, world_size)
    # the GLOBAL batch: the same on every rank (opt-in check; the host values are hashed on the CPU)
    if attention_mask is None:
        agreement.check(lambda: Fingerprint().tensor_values("cu_seqlens", torch.tensor(values, dtype=torch.int64)))
        rows, row_length = 1, values[-1]

        def prepare(scheme: ContextParallelScheme) -> _SchemeBatch:
            return _SchemeBatch(calls=[(0, 1, scheme.hf.prepare_batch(values, rank, world_size))], local_tokens=None)
    else:
        agreement.check(lambda: Fingerprint().shape("the shape of attention_mask", mask.shape)
                        .tensor_values("attention_mask", mask.to(torch.int64).flatten()))
        rows, row_length = mask.shape

        def prepare(scheme: ContextParallelScheme) -> _SchemeBatch:
            try:
                return _padded_batch(scheme, mask, spans, rank, world_size)
            except BatchNotSupported as e:
                raise BatchNotSupported(f"{e} ({_runs_text(spans, mask.shape[1])})") from None
    prepared: Dict[str, Union[_SchemeBatch, BatchNotSupported]] = {}
    for scheme in hf_schemes():
        try:
            prepared[scheme.name] = prepare(scheme)
        except BatchNotSupported as e:  # reported when the scheme is used on this batch
            prepared[scheme.name] = e
    params = _BatchParams(world_size=world_size, rank=rank, rows=rows, row_length=row_length,
                          padded=attention_mask is not None, prepared=prepared)
    with _LOCK:
        _STATE.batch = params


def shard_padded_batch(x: Tensor, attention_mask: Tensor, attn_implementation: str, rank: int,
                       world_size: int) -> Tensor:
    """Rank ``rank``'s part of every row of a batch of padded rows, in the layout of
    ``attn_implementation``: what that rank's model takes (``input_ids``, ``position_ids``,
    ``attention_mask``, labels, ...).

    Args:
        x: ``[B, L, ...]`` (any trailing dims), the rows of the GLOBAL batch.
        attention_mask: the GLOBAL padding mask ``[B, L]`` given to
            ``update_ring_flash_attn_params`` (1 = token, 0 = padding).
        attn_implementation: ``"ring_attn_llama3"`` or ``"flash_attention_2"`` (substituted):
            columns ``[r L/N, (r+1) L/N)`` of every row; ``"ring_attn_zigzag_llama3"``: of each
            of a row's sequences (its run of tokens, and its padding in pieces of at most 128
            tokens), chunks r and 2N-1-r (every run of tokens and of padding a multiple of 2N
            long).
        rank, world_size: which part, of how many.

    Returns ``[B, L / N, ...]``, a new tensor on x's device; ``unshard_padded_batch`` undoes it.
    Raises ValueError for a bad mask (see ``update_ring_flash_attn_params``), a shape of x
    that does not start with the mask's, or a batch the layout cannot cut.
    """
    columns = _local_columns(attention_mask, attn_implementation, rank, world_size)
    if not isinstance(x, Tensor) or x.dim() < 2 or tuple(x.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"x: expected a tensor [batch, seq, ...] starting with the attention_mask's shape "
                         f"{tuple(attention_mask.shape)}, got {getattr(x, 'shape', type(x).__name__)}")
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, columns.to(x.device)]


def unshard_padded_batch(shards: Sequence[Tensor], attention_mask: Tensor, attn_implementation: str) -> Tensor:
    """The inverse of ``shard_padded_batch``: every rank's part ``[B, L / N, ...]`` (rank order)
    -> the GLOBAL rows ``[B, L, ...]`` (differentiable; no communication)."""
    shards = list(shards)
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("shards: expected one tensor per rank, got an empty list")
    for i, s in enumerate(shards):
        if not isinstance(s, Tensor) or s.shape != shards[0].shape:
            raise ValueError(f"shards[{i}]: expected the shape of shards[0] {tuple(shards[0].shape)}, got "
                             f"{getattr(s, 'shape', type(s).__name__)}")
    columns = torch.cat([_local_columns(attention_mask, attn_implementation, r, world_size)
                         for r in range(world_size)], dim=1)
    if tuple(shards[0].shape[:2]) != (attention_mask.shape[0], attention_mask.shape[1] // world_size):
        raise ValueError(f"shards: expected [batch, seq / world_size, ...] = [{attention_mask.shape[0]}, "
                         f"{attention_mask.shape[1] // world_size}, ...] each, got {tuple(shards[0].shape)}")
    gathered = torch.cat(shards, dim=1)
    rows = torch.arange(gathered.shape[0], device=gathered.device)[:, None]
    return gathered[rows, torch.argsort(columns, dim=1).to(gathered.device)]


def _local_columns(attention_mask: Tensor, attn_implementation: str, rank: int, world_size: int) -> Tensor:
    """int64 ``[B, L / N]``: the columns of every row of the GLOBAL padded batch that ``rank`` holds."""
    check_world(world_size, rank)
    scheme = _scheme_of(attn_implementation)
    mask, spans = _mask_rows(attention_mask, world_size)
    length = mask.shape[1]
    try:
        return _columns(scheme, _scheme_row_sequences(scheme, spans, length, world_size), length, rank, world_size)
    except BatchNotSupported as e:
        raise ValueError(f"attention_mask: the {scheme.layout} layout cannot cut this batch: {e} "
                         f"({_runs_text(spans, length)})") from None


# ---- the attention itself ------------------------------------------------------------------------


def _validating(x: object):
    """The adapter's own argument checks of an attention call: with the cross-rank check on
    (``RING_FLASH_ATTN_CHECK_METADATA=1``), a rank whose checks raise tells the other ranks, which
    raise in the scheme's own check instead of waiting for it (``cp.rank_agreement``)."""
    group, world_size, _ = resolve_group(_STATE.group)
    return RankAgreement("the HF adapter's attention", group, world_size, device_of(x),
                         values_checked=True).validating()


def _check_model_mask(attention_mask: Optional[Tensor], prepared: _SchemeBatch, batch: _BatchParams) -> None:
    """The 2-D mask the model was given must be this rank's part of the batch described to
    ``update_ring_flash_attn_params`` (a packed row: no padding). One host read (a device-to-host
    copy on CUDA) per mask object, i.e. per forward: transformers gives every layer the same one."""
    if attention_mask is None:
        return
    expected_shape = (batch.rows, batch.local_length)
    if tuple(attention_mask.shape) != expected_shape:
        raise ValueError(f"attention_mask: expected the rank's padding mask [batch, local tokens] = "
                         f"{list(expected_shape)}, got shape {tuple(attention_mask.shape)}")
    checked = prepared._checked_mask
    if checked is not None and checked() is attention_mask and attention_mask._version == prepared._checked_version:
        return
    given = attention_mask.detach().to("cpu") != 0
    if prepared.local_tokens is None:
        if not bool(given.all()):
            raise ValueError("attention_mask: the model was given a mask that hides tokens, but "
                             "update_ring_flash_attn_params was given cu_seqlens (a packed row without padding): for "
                             "a batch of padded rows give update_ring_flash_attn_params the GLOBAL mask "
                             "(attention_mask=...) instead")
    elif not torch.equal(given, prepared.local_tokens):
        b, j = (given != prepared.local_tokens).nonzero()[0].tolist()
        raise ValueError(f"attention_mask: the model's mask differs from this rank's part of the attention_mask given "
                         f"to update_ring_flash_attn_params (row {b}, local column {j}: got {int(given[b, j])}, "
                         f"expected {int(prepared.local_tokens[b, j])}): cut the model's inputs with "
                         f"shard_padded_batch and call update_ring_flash_attn_params before every batch")
    prepared._checked_mask, prepared._checked_version = weakref.ref(attention_mask), attention_mask._version


def _ring_attention(attn_implementation: str, q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor],
                    causal: bool, softmax_scale: Optional[float], dropout: float,
                    deterministic: Optional[bool], features: Optional[Dict[str, Any]] = None) -> Tensor:
    """The scheme registered as ``attn_implementation`` on q ``[B, S, Hq, D]``, k/v ``[B, S, Hk, D]``
    (the rank's S tokens of each of the B rows; any strides) -> out ``[B, S, Hq, D]``, zeros at
    padding. ``attention_mask``: None or the rank's 2-D ``[B, S]`` padding mask (checked).
    ``features``: the scheme's window_size / softcap / sinks keywords (``_attention_features``)."""
    group = _STATE.group
    with _validating(q):
        batch = _STATE.batch
        if batch is None:
            raise RuntimeError("ring_flash_attn.hf_adapter: no batch metadata: call "
                               "update_ring_flash_attn_params(cu_seqlens, process_group) (a packed row) or "
                               "update_ring_flash_attn_params(attention_mask=..., process_group=...) (padded rows) "
                               "on every rank before the model's forward")
        _, world_size, rank = resolve_group(group)
        if (world_size, rank) != (batch.world_size, batch.rank):
            raise RuntimeError(f"update_ring_flash_attn_params was called for rank {batch.rank} of "
                               f"{batch.world_size}, but the attention runs on rank {rank} of {world_size} (the "
                               f"process group given to register_hf_attention / substitute_hf_flash_attn): pass the "
                               f"same group to both")
        if q.shape[0] != batch.rows:
            if batch.padded:
                raise ValueError(f"query: expected batch size {batch.rows} (the rows of the attention_mask given to "
                                 f"update_ring_flash_attn_params), got {q.shape[0]}")
            raise ValueError(f"query: expected batch size 1 (update_ring_flash_attn_params was given cu_seqlens: one "
                             f"packed row; for a batch of padded rows give it the GLOBAL attention_mask instead), "
                             f"got {q.shape[0]}")
        if q.shape[1] != batch.local_length:
            what = "each row of the attention_mask" if batch.padded else "the cu_seqlens"
            raise ValueError(f"query: expected {batch.local_length} local tokens (the {batch.row_length} tokens of "
                             f"{what} given to update_ring_flash_attn_params / world size {batch.world_size}), got "
                             f"{q.shape[1]}")
        prepared = batch.scheme_batch(attn_implementation)
        _check_model_mask(attention_mask, prepared, batch)
        if deterministic is None:
            deterministic = os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
        calls, local_tokens = prepared.on_device(bool(causal), q.device)
    fn = hf_scheme(attn_implementation).varlen_func
    outs = []
    for first, end, (cu_q, cu_k, max_q, max_k, k_slice) in calls:
        # one row: a [S, H, D] view (token and head strides are free); several: flattened (a copy
        # unless the rows are contiguous)
        q_c, k_c, v_c = (t[first] if end - first == 1 else t[first:end].reshape(-1, *t.shape[2:]) for t in (q, k, v))
        out = fn(q_c, k_c, v_c, cu_q, cu_k, max_q, max_k, _STATE.heads_k_stride, k_slice, dropout_p=dropout,
                 softmax_scale=softmax_scale, causal=bool(causal), deterministic=bool(deterministic), group=group,
                 **(features or {}))
        outs.append(out.reshape(end - first, q.shape[1], *out.shape[1:]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if prepared.has_padding:
        out = out.masked_fill(~local_tokens[:, :, None, None], 0.0)
    return out


def _check_unsupported(q_len: int, k_len: int, attention_mask) -> None:
    if k_len != q_len:
        raise NotImplementedError(f"key: expected as many tokens as the query ({q_len}), got {k_len}: attention over "
                                  f"a KV cache (a decoding step after a forward with use_cache=True) is not supported "
                                  f"by context-parallel attention; generate with another attn_implementation (e.g. "
                                  f"use_ring_attn(False) for the substituted \"flash_attention_2\"), and pass "
                                  f"use_cache=False where no cache is needed")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        shape = tuple(getattr(attention_mask, "shape", ()))
        raise NotImplementedError(
            f"attention_mask: expected None or a 2-D [batch, seq] padding mask, got a {len(shape)}-D "
            f"{type(attention_mask).__name__} of shape {shape}: arbitrary attention masks are not supported by "
            f"context-parallel attention (describe padding with a 2-D mask and update_ring_flash_attn_params("
            f"attention_mask=...), packed sequences with update_ring_flash_attn_params(cu_seqlens))")


def _attention_features(sliding_window, softcap, s_aux, causal: bool, num_heads_q: int) -> Dict[str, Any]:
    """The scheme's keyword arguments for a layer's ``sliding_window`` (an int W >= 1: transformers'
    flash-attention convention, window ``(W - 1, 0)`` causal and ``(W - 1, W - 1)`` not, the same
    keys as its eager masks), ``softcap`` (None or 0: off) and sink logits ``s_aux`` (a ``[Hq]``
    tensor, handed on as float32: its gradient flows back into the model's parameter)."""
    features: Dict[str, Any] = {}
    if sliding_window is not None:
        if (isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral)
                or sliding_window < 1):
            raise ValueError(f"sliding_window: expected None or an int >= 1 (the keys a token sees on each side, itself "
                             f"included), got {sliding_window!r}")
        left = int(sliding_window) - 1
        features["window_size"] = (left, 0 if causal else left)
    if softcap is not None and softcap != 0.0:
        features["softcap"] = softcap
    if s_aux is not None:
        if not isinstance(s_aux, Tensor) or tuple(s_aux.shape) != (num_heads_q,):
            raise ValueError(f"s_aux: expected a tensor [{num_heads_q}] (one sink logit per query head), got "
                             f"{tuple(s_aux.shape) if isinstance(s_aux, Tensor) else type(s_aux).__name__}")
        features["sinks"] = s_aux if s_aux.dtype == torch.float32 else s_aux.float()
    return features


def _hf_attention(attn_implementation: str, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Optional[Tensor], dropout: float, scaling: Optional[float],
                  sliding_window: Optional[int], softcap: Optional[float], is_causal: Optional[bool],
                  kwargs: Dict[str, Any]) -> Tuple[Tensor, None]:
    with _validating(query):
        if query.dim() != 4:
            raise ValueError(f"query: expected a 4-D tensor [batch, heads, seq, head_dim], got shape "
                             f"{tuple(query.shape)}")
        _check_unsupported(query.shape[2], key.shape[2], attention_mask)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        features = _attention_features(sliding_window, softcap, kwargs.get("s_aux"), bool(causal), query.shape[1])
    # [B, H, S, D] -> [B, S, H, D] views
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = _ring_attention(attn_implementation, q, k, v, attention_mask, causal, scaling, dropout,
                          kwargs.get("deterministic"), features)
    return out, None


def _transformers_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                       mask_function: Optional[Callable] = None, attention_mask: Optional[Tensor] = None,
                       **kwargs: Any) -> Optional[Tensor]:
    """What transformers' mask creation (``create_causal_mask`` and its kin) returns for our
    implementations, registered in its ``AttentionMaskInterface``: the model's 2-D padding mask
    ``[B, L]`` (bool) unchanged, or None. Causality and packing are the adapter's own
    (``is_causal``, ``update_ring_flash_attn_params``). A pattern a model adds on top of the
    causal mask (``or_mask_function`` / ``and_mask_function``, e.g. bidirectional attention
    among image tokens, or a block-wise overlay) raises NotImplementedError instead of being
    dropped."""
    if kwargs.get("use_vmap") or getattr(mask_function, "__qualname__", "").startswith("or_masks."):
        raise NotImplementedError("attention_mask: the model adds its own pattern to the causal mask (transformers' "
                                  "or_mask_function / and_mask_function, e.g. bidirectional attention among image "
                                  "tokens), which context-parallel attention does not support")
    return attention_mask


def llama3_attention_forward(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
    dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
    softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs: Any,
) -> Tuple[Tensor, None]:
    """transformers attention function (``AttentionInterface``) for the CONTIGUOUS llama3 layout.

    Args:
        module: the attention module (``module.is_causal`` is used unless ``is_causal`` is given).
        query: ``[B, Hq, S, D]``, key, value: ``[B, Hk, S, D]`` after RoPE: the rank's S tokens
            of each row (a packed row, B = 1: the contiguous piece ``[r S, (r+1) S)`` of it; a
            batch of padded rows: columns ``[r S, (r+1) S)`` of every row), as described to
            ``update_ring_flash_attn_params``.
        attention_mask: None or the rank's 2-D ``[B, S]`` padding mask (1 = token), which must
            match the batch given to ``update_ring_flash_attn_params`` (ValueError otherwise); a
            4-D mask raises NotImplementedError.
        dropout: must be 0.0. scaling: softmax scale (default ``1 / sqrt(D)``).
        sliding_window: None or the layer's window W (int >= 1): with causal attention a token
            sees itself and the W - 1 tokens before it, without it the W - 1 tokens on each side
            (transformers' flash-attention convention), counted within its sequence.
        softcap: None / 0, or the attention logit soft-cap (Gemma 2).
        is_causal: overrides ``module.is_causal`` (False: encoders, non-causal attention).
        kwargs: the model's other keyword arguments (position_ids, use_cache, ...), ignored
            except ``deterministic`` (default: ``FLASH_ATTENTION_DETERMINISTIC=1`` in the
            environment) and ``s_aux`` (gpt-oss's sink logits, ``[Hq]``; their gradient is this
            rank's tokens' share).

    Returns ``(attn_output [B, S, Hq, D], None)`` (no attention weights), zeros at padding. Key
    and query must have the same length (a decoding step over a KV cache raises
    NotImplementedError). Collective over the group of ``register_hf_attention``.
    """
    return _hf_attention(HF_ATTN_LLAMA3, module, query, key, value, attention_mask, dropout, scaling,
                         sliding_window, softcap, is_causal, kwargs)


def zigzag_llama3_attention_forward(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
    dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
    softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs: Any,
) -> Tuple[Tensor, None]:
    """transformers attention function for the ZIGZAG llama3 layout: as ``llama3_attention_forward``
    but the rank's S tokens of a row are its ``zigzag_shard`` of the row's sequences (a packed
    row: of every sequence, chunk r then chunk 2N-1-r; a batch of padded rows: the same for each
    row's tokens and padding pieces, see ``shard_padded_batch``; every length a multiple of
    2N). Returns ``(attn_output [B, S, Hq, D], None)`` in the rank's local (zigzag) order."""
    return _hf_attention(HF_ATTN_ZIGZAG_LLAMA3, module, query, key, value, attention_mask, dropout, scaling,
                         sliding_window, softcap, is_causal, kwargs)


_ATTENTION_FUNCTIONS: Dict[str, Callable[..., Tuple[Tensor, None]]] = {}


def _attention_function(attn_implementation: str) -> Callable[..., Tuple[Tensor, None]]:
    """The function registered in transformers as ``attn_implementation`` (made once per name):
    ``llama3_attention_forward``'s contract, running the registry's scheme of that name."""
    if attn_implementation not in _ATTENTION_FUNCTIONS:
        def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                              sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                              is_causal: Optional[bool] = None, **kwargs: Any) -> Tuple[Tensor, None]:
            return _hf_attention(attn_implementation, module, query, key, value, attention_mask, dropout, scaling,
                                 sliding_window, softcap, is_causal, kwargs)

        attention_forward.__qualname__ = attention_forward.__name__ = f"{attn_implementation}_attention_forward"
        _ATTENTION_FUNCTIONS[attn_implementation] = attention_forward
    return _ATTENTION_FUNCTIONS[attn_implementation]


def register_hf_attention(process_group: Optional[ProcessGroup] = None, heads_k_stride: int = 1) -> Tuple[str, ...]:
    """Register the attention implementations of the context-parallel schemes in transformers'
    ``AttentionInterface`` (every scheme of ``ring_flash_attn.cp.registry`` with an ``hf``
    binding: ``"ring_attn_llama3"``, ``"ring_attn_zigzag_llama3"``, ``"ring_attn_ulysses"`` and
    ``"ring_attn_hybrid"``) and set the group and ``heads_k_stride`` they use.

    Args:
        process_group: the context-parallel group (None: the default group).
        heads_k_stride: KV heads per all-gather slice (must divide the model's KV heads; 1 always
            does): bounds the gathered K/V memory and lets the next slice's all-gather overlap
            this slice's compute.

    Each name is also registered in transformers' ``AttentionMaskInterface`` (mask creation):
    the model's 2-D padding mask then reaches the attention function, which checks it against
    the batch given to ``update_ring_flash_attn_params`` (transformers drops a 2-D mask for an
    implementation without a mask function).

    Returns the registered names in registry order, ``(HF_ATTN_LLAMA3, HF_ATTN_ZIGZAG_LLAMA3,
    HF_ATTN_ULYSSES, HF_ATTN_HYBRID)``, the names to pass as ``attn_implementation``. Calling it again replaces the group and stride
    (shared with ``substitute_hf_flash_attn``). Raises ImportError without transformers.
    """
    transformers = _transformers()
    stride = _check_stride(heads_k_stride)
    with _LOCK:
        _STATE.group, _STATE.heads_k_stride = process_group, stride
    names = tuple(scheme.hf.attn_implementation for scheme in hf_schemes())
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers before the mask interface: models pass 4-D masks, which raise
        AttentionMaskInterface = None
    for name in names:
        transformers.AttentionInterface.register(name, _attention_function(name))
        if AttentionMaskInterface is not None:
            AttentionMaskInterface.register(name, _transformers_mask)
    return names


# ---- upstream's drop-in: "flash_attention_2" runs the contiguous llama3 scheme ----------------------


def _substituted_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                           sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                           is_causal: Optional[bool] = None, **kwargs) -> Tuple[Tensor, None]:
    """What ``"flash_attention_2"`` dispatches to after ``substitute_hf_flash_attn``."""
    if not _STATE.enabled:
        return _STATE.original_attention(module, query, key, value, attention_mask, dropout=dropout,
                                         scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                                         is_causal=is_causal, **kwargs)
    return _hf_attention(_SUBSTITUTED_SCHEME, module, query, key, value, attention_mask, dropout, scaling,
                         sliding_window, softcap, is_causal, kwargs)


def _substituted_flash_attention_forward(
    query_states: Tensor,
    key_states: Tensor,
    value_states: Tensor,
    attention_mask: Optional[Tensor],
    query_length: int,
    is_causal: bool,
    dropout: float = 0.0,
    position_ids: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    use_top_left_mask: bool = False,
    softcap: Optional[float] = None,
    deterministic: Optional[bool] = None,
    **kwargs,
) -> Tensor:
    """Replacement of ``transformers.modeling_flash_attention_utils._flash_attention_forward``:
    query_states ``[B, S, Hq, D]``, key/value_states ``[B, S, Hk, D]`` -> ``[B, S, Hq, D]``
    (``attention_mask``: None or the rank's 2-D ``[B, S]`` padding mask, as the attention
    function's)."""
    if not _STATE.enabled:
        return _STATE.original_flash_forward(
            query_states, key_states, value_states, attention_mask, query_length, is_causal, dropout=dropout,
            position_ids=position_ids, softmax_scale=softmax_scale, sliding_window=sliding_window,
            use_top_left_mask=use_top_left_mask, softcap=softcap, deterministic=deterministic, **kwargs)
    with _validating(query_states):
        if query_states.dim() != 4:
            raise ValueError(f"query_states: expected a 4-D tensor [batch, seq, heads, head_dim], got shape "
                             f"{tuple(query_states.shape)}")
        _check_unsupported(query_states.shape[1], key_states.shape[1], attention_mask)
        features = _attention_features(sliding_window, softcap, kwargs.get("s_aux"), bool(is_causal),
                                       query_states.shape[2])
    return _ring_attention(_SUBSTITUTED_SCHEME, query_states, key_states, value_states, attention_mask, is_causal,
                           softmax_scale, dropout, deterministic, features)


def substitute_hf_flash_attn(process_group: Optional[ProcessGroup], heads_k_stride: int) -> None:
    """Make transformers' ``"flash_attention_2"`` run llama3 context parallelism (contiguous
    layout) over ``process_group`` (upstream ring-flash-attention's adapter entry point).

    Registers the contiguous attention function under ``"flash_attention_2"`` in the
    ``AttentionInterface`` and replaces ``transformers.modeling_flash_attention_utils.
    _flash_attention_forward`` (``[B, S, H, D]`` in and out) for code that calls it directly.
    Idempotent; the group and stride are shared with ``register_hf_attention``. Call
    ``update_ring_flash_attn_params`` before every batch. ``use_ring_attn(False)`` routes
    ``"flash_attention_2"`` to transformers' originals; ``restore_hf_flash_attn()`` undoes.

    Raises ImportError without transformers, ValueError for a bad ``heads_k_stride``.
    """
    transformers = _transformers()
    import transformers.modeling_flash_attention_utils as fa_utils

    stride = _check_stride(heads_k_stride)
    with _LOCK:
        _STATE.group, _STATE.heads_k_stride = process_group, stride
        if _STATE.substituted:
            return
        _STATE.original_attention = transformers.AttentionInterface._global_mapping.get("flash_attention_2")
        _STATE.original_flash_forward = fa_utils._flash_attention_forward
        transformers.AttentionInterface.register("flash_attention_2", _substituted_attention)
        fa_utils._flash_attention_forward = _substituted_flash_attention_forward
        _STATE.substituted = True


def restore_hf_flash_attn() -> None:
    """Undo ``substitute_hf_flash_attn`` (transformers' ``"flash_attention_2"`` function and
    ``_flash_attention_forward`` back in place). A no-op when nothing was substituted."""
    if not _STATE.substituted:
        return
    transformers = _transformers()
    import transformers.modeling_flash_attention_utils as fa_utils

    with _LOCK:
        if _STATE.original_attention is not None:
            transformers.AttentionInterface.register("flash_attention_2", _STATE.original_attention)
        fa_utils._flash_attention_forward = _STATE.original_flash_forward
        _STATE.original_attention = _STATE.original_flash_forward = None
        _STATE.substituted = False


def use_ring_attn(flag: bool) -> None:
    """Switch the substituted ``"flash_attention_2"`` between ring attention (True, the default)
    and transformers' own FlashAttention functions (False), e.g. for generation with the same
    model. The ``"ring_attn_*"`` implementations are not affected."""
    with _LOCK:
        _STATE.enabled = bool(flag)
