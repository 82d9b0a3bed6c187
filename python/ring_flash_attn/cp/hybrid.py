"""2-D hybrid context parallelism: Ulysses all-to-all inside a group of ``ulysses_degree`` ranks,
a K/V-passing scheme across ``kv_degree`` ranks: zigzag llama3 (the default), contiguous llama3
or zigzag ring attention.

Layout (``HybridLayout``, ``mesh``): N = U K ranks, rank ``p = a U + u`` (KV coordinate a,
Ulysses coordinate u). The global packed batch is first cut over the K KV groups by the KV
scheme's layout (zigzag llama3 and zigzag ring: of every sequence, chunks a and 2K-1-a; llama3:
the contiguous piece a),
and that part (T_g / K tokens) is cut into U contiguous pieces, piece u on rank (a, u):
``hybrid_shard`` does both. The all-to-all inside the Ulysses group (``all_to_all``) gives
each rank its KV group's whole part for Hq/U query heads (and their KV heads, replicated when
Hk < U); the KV scheme then runs over the KV group on those heads, with the metadata of its
layout for coordinate a (``hybrid_prepare_cu_seqlens``), and the all-to-all takes the outputs
back. The backward differentiates the KV scheme's own autograd per chunk (its dK/dV
reduce-scatter included) between the two all-to-alls of the gradients.

Communication: the all-to-all moves each rank's Q, K, V, O shares once inside the Ulysses group
(NVLink when that group is inside a node); the KV scheme moves K/V of Hk/U heads (at least one)
across the K ranks: the all-gather schemes slice by slice (``heads_k_stride``), the next slice's
all-gather overlapping the current slice's compute (with one KV head per rank there is one slice,
not overlapped); zigzag ring attention block by block around the ring, each step's transfer
overlapping that step's compute. ``ulysses_heads_k_stride`` cuts the
all-to-all into chunks that overlap each other's compute too (default: one chunk).

The K/V-packed and Q/K/V-packed forms of the public functions are in ``packed.py`` (generated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import check_flash_attn_defaults, check_window_size
from ..grouped import _resolve_scale
from .all_to_all import HeadShards, check_head_split, head_sharded_attention
from .features import check_softcap, feature_kwargs
from .sinks import check_sinks
from . import llama3 as llama3_module
from . import zigzag_llama3 as zigzag_llama3_module
from .llama3 import llama3_flash_attn_varlen_func
from .llama3_layout import _padded_total, llama3_flash_attn_prepare_cu_seqlens
from .mesh import HybridLayout, HybridMesh, active_hybrid_mesh
from .padding import layout_unit, padded_lengths
from .rank_agreement import Fingerprint, RankAgreement, device_of, effective_scale
from .scheme import BatchMetadata, BatchNotSupported
from .ulysses import check_chunk_stride
from .validation import (CuSeqlens, as_cu_tensor, check_collective_device, check_cu_seqlens_pair,
                         check_cumulative_values, check_heads, check_local_tokens, check_qkv, metadata_checks_enabled,
                         short_list)
from .zigzag_layout import zigzag_check_cu_seqlens, zigzag_shard, zigzag_unshard
from .zigzag_llama3 import zigzag_llama3_flash_attn_varlen_func, zigzag_llama3_prepare_cu_seqlens
from .ring_engine import _resolve_seqlens as _resolve_ring_seqlens
from .ring_engine import _validate_varlen as _validate_ring_varlen
from .zigzag_ring import ZIGZAG_LAYOUT, zigzag_ring_flash_attn_varlen_func

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["HF_ATTN_HYBRID", "hf_batch_metadata", "hybrid_flash_attn_varlen_func", "hybrid_prepare_cu_seqlens",
           "hybrid_shard", "hybrid_unshard"]

# The name of the scheme in transformers' AttentionInterface (ring_flash_attn.hf_adapter).
HF_ATTN_HYBRID = "ring_attn_hybrid"



def _zigzag_ring_with_llama3_signature(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                       max_seqlen_q: int, max_seqlen_k: int, heads_k_stride: int,
                                       local_k_slice: Optional[slice], **kwargs):
    """``zigzag_ring_flash_attn_varlen_func`` called with zigzag llama3's metadata: its LOCAL
    ``cu_seqlens_q`` and ``max_seqlen_q`` are what the ring takes, and the GLOBAL ``cu_seqlens_k``
    (the real lengths) gives the ring's ``seqlens``, so the rows the zigzag layout pads a sequence
    with are masked (``heads_k_stride`` is not used: the ring passes every KV head's block at each
    step)."""
    seqlens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens_q, max_seqlen_q, seqlens=seqlens, **kwargs)


# kv_scheme -> (the function called with llama3's signature, the public function whose parameters
# say which features it takes)
_KV_FUNCTIONS = {
    "zigzag_llama3": (zigzag_llama3_flash_attn_varlen_func, zigzag_llama3_flash_attn_varlen_func),
    "llama3": (llama3_flash_attn_varlen_func, llama3_flash_attn_varlen_func),
    "zigzag_ring": (_zigzag_ring_with_llama3_signature, zigzag_ring_flash_attn_varlen_func),
}


def _is_zigzag(kv_scheme: str) -> bool:
    return kv_scheme in ("zigzag_llama3", "zigzag_ring")


def _layout_of(mesh: Union[HybridLayout, HybridMesh]) -> HybridLayout:
    if isinstance(mesh, HybridMesh):
        return mesh.layout
    if isinstance(mesh, HybridLayout):
        return mesh
    raise ValueError(f"mesh: expected a HybridMesh or a HybridLayout, got {type(mesh).__name__}")


# ---- layout helpers ------------------------------------------------------------------------------


def _padded_values(values: List[int], layout: HybridLayout) -> List[int]:
    """The GLOBAL cumulative lengths the hybrid layout runs on: ``values`` (checked), plus a padding
    sequence of its own after the last one when the KV groups' parts would not cut into U equal
    pieces. Contiguous across (llama3): the total padded to a multiple of N (as ``llama3_shard``
    over N ranks). Zigzag across: the zigzag layout pads each sequence to a multiple of 2K, so
    each KV part has ``P = sum(padded lengths) / K`` rows, an even number; a padding sequence of
    ``2 K m`` rows adds 2m rows to each part, and the smallest m in [0, U) with ``(P + 2m) % U ==
    0`` exists (U odd: 2 is invertible mod U; U even: P and the shortfall are even)."""
    check_cumulative_values(values, "cu_seqlens")
    U, K, N = layout.ulysses_degree, layout.kv_degree, layout.world_size
    total = values[-1]
    if not _is_zigzag(layout.kv_scheme):
        padded = _padded_total(total, N)
        return values if padded == total else values + [padded]
    unit = layout_unit("zigzag", K)
    part = int(padded_lengths(torch.tensor(values[1:]) - torch.tensor(values[:-1]), unit).sum()) // K
    m = next(m for m in range(U) if (part + 2 * m) % U == 0)
    return values if m == 0 else values + [total + unit * m]


def hybrid_shard(x: Tensor, cu_seqlens: CuSeqlens, rank: int, mesh: Union[HybridLayout, HybridMesh]) -> Tensor:
    """Rank ``rank``'s part of a packed global batch x ``[T_g, ...]`` (natural order) in the
    hybrid layout: the KV scheme's shard for KV coordinate a (``zigzag_shard`` for zigzag llama3
    and zigzag ring, the contiguous piece for llama3), then its contiguous piece u of U.
    ``cu_seqlens``: the GLOBAL cumulative lengths (last entry T_g); any total and sequence
    lengths: where the layout cannot cut them evenly, zero rows pad the sequences (zigzag) and a
    padding sequence of its own follows the last one (``hybrid_prepare_cu_seqlens`` describes
    both). Returns a new tensor ``[T, ...]``, the same T on every rank; undo with
    ``hybrid_unshard``. Reads the lengths on the host (a setup step)."""
    layout = _layout_of(mesh)
    a, u = layout.coordinates(rank)
    U, K = layout.ulysses_degree, layout.kv_degree
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x: expected a tensor with a token dim 0, got {getattr(x, 'shape', type(x).__name__)}")
    values = as_cu_tensor(cu_seqlens, "cu_seqlens").tolist()
    padded = _padded_values(values, layout)  # checks the values
    if values[-1] != x.shape[0]:
        raise ValueError(f"cu_seqlens: expected the last entry to be {x.shape[0]} (the rows of x), got {values[-1]}")
    if len(padded) != len(values):
        x = torch.cat([x, x.new_zeros((padded[-1] - values[-1],) + tuple(x.shape[1:]))])
    if _is_zigzag(layout.kv_scheme):
        part = zigzag_shard(x, padded, a, K)
    else:
        per_kv = x.shape[0] // K
        part = x[a * per_kv:(a + 1) * per_kv]
    T = part.shape[0] // U
    return part[u * T:(u + 1) * T].clone()


def hybrid_unshard(shards: Sequence[Tensor], cu_seqlens: CuSeqlens, mesh: Union[HybridLayout, HybridMesh]) -> Tensor:
    """The inverse of ``hybrid_shard``: the N ranks' parts (rank order) -> the global batch in
    natural order without the padding. Pure tensor ops (no communication) but for reading the
    lengths on the host."""
    layout = _layout_of(mesh)
    shards = list(shards)
    if len(shards) != layout.world_size:
        raise ValueError(f"shards: expected {layout.world_size} tensors (one per rank of the mesh), got {len(shards)}")
    values = as_cu_tensor(cu_seqlens, "cu_seqlens").tolist()
    padded = _padded_values(values, layout)
    U, K = layout.ulysses_degree, layout.kv_degree
    parts = [torch.cat(shards[a * U:(a + 1) * U]) for a in range(K)]
    if _is_zigzag(layout.kv_scheme):
        return zigzag_unshard(parts, padded)[:values[-1]]
    return torch.cat(parts)[:values[-1]]


def hybrid_prepare_cu_seqlens(
    cu_seqlens: CuSeqlens, causal: bool, rank: int, mesh: Union[HybridLayout, HybridMesh],
    max_seqlen: Optional[int] = None,
) -> Tuple[Tensor, Tensor, int, int, slice]:
    """What ``hybrid_flash_attn_varlen_func`` takes on parent rank ``rank``, from the GLOBAL
    cu_seqlens (any total and sequence lengths): the KV scheme's metadata for the rank's KV
    coordinate a over the ``kv_degree`` ranks, ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, local_k_slice)`` (``zigzag_llama3_prepare_cu_seqlens(cu, causal, a, K,
    max_seqlen)`` for both zigzag schemes, or ``llama3_flash_attn_prepare_cu_seqlens(cu, causal,
    a, K)``) of the layout's cumulative lengths ``cu``: the given ones, plus the padding sequence
    of ``hybrid_shard`` where the layout needs one. Reads the values on the host (one
    device-to-host copy for a CUDA tensor: a setup step)."""
    layout = _layout_of(mesh)
    a, _ = layout.coordinates(rank)
    cu = as_cu_tensor(cu_seqlens, "cu_seqlens")
    values = cu.tolist()
    padded = _padded_values(values, layout)
    if len(padded) != len(values):
        cu = torch.tensor(padded, dtype=torch.int32, device=cu.device)
        if max_seqlen is not None:
            max_seqlen = max(int(max_seqlen), padded[-1] - padded[-2])
    if _is_zigzag(layout.kv_scheme):
        return zigzag_llama3_prepare_cu_seqlens(cu, causal, a, layout.kv_degree, max_seqlen)
    return llama3_flash_attn_prepare_cu_seqlens(cu, causal, a, layout.kv_degree)


def hf_batch_metadata(cu_seqlens: List[int], rank: int, world_size: int) -> Dict[bool, BatchMetadata]:
    """The HF adapter's per-batch metadata of the ACTIVE mesh (``set_active_hybrid_mesh``; the
    last one built): ``hybrid_prepare_cu_seqlens`` for both causal flags (CPU tensors). Raises
    ``BatchNotSupported`` without an active mesh of ``world_size`` ranks, or for a batch the
    layout cannot take."""
    mesh = active_hybrid_mesh()
    if mesh is None or mesh.world_size != world_size:
        got = "none" if mesh is None else f"one of {mesh.world_size} ranks"
        raise BatchNotSupported(f"the hybrid scheme needs an active mesh of {world_size} ranks (hybrid_mesh(...) "
                                f"on every rank), got {got}")
    layout = mesh.layout
    try:
        if _is_zigzag(layout.kv_scheme):
            zigzag_check_cu_seqlens(cu_seqlens, layout.kv_degree)
        values = list(cu_seqlens)
        if len(_padded_values(values, layout)) != len(values):
            # the model's inputs are the ranks' equal cuts of the batch: no room for hybrid_shard's padding
            raise ValueError(f"cu_seqlens: expected a batch the hybrid layout (ulysses_degree {layout.ulysses_degree} "
                             f"x kv_degree {layout.kv_degree}, {layout.kv_scheme} across) cuts into equal parts "
                             f"without a padding sequence, got the lengths {short_list(values)}")
        return {c: hybrid_prepare_cu_seqlens(cu_seqlens, c, rank, layout) for c in (True, False)}
    except ValueError as e:
        raise BatchNotSupported(str(e)) from None


# ---- the attention across the KV group ----------------------------------------------------------------


class KVSchemeAttention:
    """One chunk's head shards through the KV scheme over the KV group (its own autograd)."""

    def __init__(self, fn, metadata: Tuple[Tensor, Tensor, int, int, Optional[slice]], heads_k_stride: int,
                 softmax_scale: Optional[float], causal: bool, window_size: Tuple[int, int], deterministic: bool,
                 kv_group, features: Dict[str, object]):
        self.fn, self.metadata, self.heads_k_stride = fn, metadata, heads_k_stride
        self.softmax_scale, self.causal, self.window_size = softmax_scale, causal, window_size
        self.deterministic, self.kv_group, self.features = deterministic, kv_group, features

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        kwargs = dict(self.features)
        if "sinks" in kwargs:
            kwargs["sinks"] = sinks
        cu_q, cu_k, max_q, max_k, k_slice = self.metadata
        out, lse, _ = self.fn(q, k, v, cu_q, cu_k, max_q, max_k, self.heads_k_stride, k_slice,
                              softmax_scale=self.softmax_scale, causal=self.causal, window_size=self.window_size,
                              deterministic=self.deterministic, return_attn_probs=True, group=self.kv_group, **kwargs)
        return out, lse


def _resolve_mesh(group) -> HybridMesh:
    """The mesh a call runs on: ``group`` itself when it is a HybridMesh, else the active mesh
    whose parent group is ``group`` (None: the default group)."""
    if isinstance(group, HybridMesh):
        return group
    mesh = active_hybrid_mesh()
    if mesh is None:
        raise ValueError("group: expected a HybridMesh (hybrid_mesh(...) or hybrid_mesh_from_device_mesh(...)), or "
                         "the parent group of the active mesh; no mesh is active")
    import torch.distributed as dist

    same = (mesh.has_parent and ((group is None or group is dist.group.WORLD) and mesh.parent_group is None
                                 or group is mesh.parent_group))
    if not same:
        raise ValueError("group: expected a HybridMesh, or the parent group of the active mesh (the group given to "
                         f"hybrid_mesh); got {group!r}, which is not")
    return mesh


def _check_kv_scheme_arguments(layout: HybridLayout, kv_rank: int, q: Tensor, shards: HeadShards, cu_seqlens_q,
                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride, local_k_slice,
                               window: Tuple[int, int], softcap: float, causal: bool) -> None:
    """The K/V scheme's own checks of its metadata arguments (cu_seqlens_q / _k, the max_seqlen
    hints, local_k_slice; their values where metadata_checks_enabled), run before the all-to-all
    on stand-ins of the head shards that scheme gets after it (``[U T, heads of a chunk, D]``,
    expanded: no memory). The scheme checks them again when it runs; an error there would come
    after the all-to-all, leaving the ranks in the middle of a collective."""
    U, K = layout.ulysses_degree, layout.kv_degree
    rows, D = shards.total_heads_sharded, q.shape[-1]

    def stand_in(heads: int) -> Tensor:
        return q.new_empty((1, 1, 1)).expand(rows, heads, D)

    q_s, k_s = stand_in(shards.heads_q_per_chunk), stand_in(shards.heads_k_stride)
    values = metadata_checks_enabled(q.device)
    if layout.kv_scheme == "llama3":
        k_slice, _, _ = llama3_module._validate(q_s, k_s, k_s, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                heads_k_stride, local_k_slice, 0.0, window, None, K, softcap, causal)
        if values:
            llama3_module._check_values(cu_seqlens_q, cu_seqlens_k, rows, k_slice, kv_rank, causal)
    elif layout.kv_scheme == "zigzag_llama3":
        zigzag_llama3_module._validate(q_s, k_s, k_s, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       heads_k_stride, local_k_slice, 0.0, window, None, None, K,
                                       zigzag_llama3_module.IMPL_BASELINE, softcap, causal)
        if values:
            zigzag_llama3_module._check_values(cu_seqlens_q, cu_seqlens_k, K, rows)
    else:  # zigzag ring: its LOCAL cu_seqlens and max_seqlen are cu_seqlens_q and max_seqlen_q, its
        # seqlens the lengths of cu_seqlens_k (_zigzag_ring_with_llama3_signature)
        check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k, q.device)
        _validate_ring_varlen(q_s, k_s, k_s, cu_seqlens_q, max_seqlen_q, 0.0, window, None, ZIGZAG_LAYOUT, softcap,
                              causal)
        if values:
            local = cu_seqlens_q.to(torch.int64)
            _resolve_ring_seqlens(cu_seqlens_k[1:] - cu_seqlens_k[:-1], local[1:] - local[:-1], K, q.device, None)


# ---- public API ------------------------------------------------------------------------------------------


def hybrid_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, heads_k_stride: int = 1, local_k_slice: Optional[slice] = None, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = True, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Union[HybridMesh, ProcessGroup, None] = None, softcap: float = 0.0, sinks: Optional[Tensor] = None,
    ulysses_heads_k_stride: Optional[int] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """Hybrid context-parallel attention: all-to-all over the mesh's Ulysses group, the KV scheme
    (zigzag llama3, llama3 or zigzag ring) over its KV group (llama3's signature).

    Args:
        q: ``[T, Hq, D]``, k, v: ``[T, Hk, D]``: the rank's ``hybrid_shard`` of the packed batch
            (the same T on every rank); Hq divisible by U; Hk a multiple or a divisor of U.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice: the KV scheme's
            metadata for the rank's KV coordinate, as ``hybrid_prepare_cu_seqlens`` returns it
            (it describes the KV group's part, U T tokens).
        heads_k_stride: the all-gather schemes' KV heads per all-gather slice (divides the KV heads
            of an all-to-all chunk); the next slice's all-gather overlaps this slice's compute. Not
            used by zigzag ring attention.
        ulysses_heads_k_stride: KV heads per all-to-all chunk (divides ``max(Hk, U) / U``); None:
            one chunk.
        dropout_p, alibi_slopes: only their defaults (NotImplementedError otherwise).
        softmax_scale, causal, window_size, softcap, deterministic: handed to the KV scheme,
            which refuses what it does not implement. sinks: None or float32 ``[Hq]``; each rank
            hands the KV scheme the sinks of its heads (the KV scheme must take ``sinks``).
        return_attn_probs: return ``(out, lse, None)`` (lse float32 ``[Hq, T]``, not differentiable).
        group: a ``HybridMesh``, or the parent group of the active mesh (None: the default
            group), e.g. from the HF adapter.

    Returns ``out`` ``[T, Hq, D]`` or ``(out, lse, None)``. Collective over the mesh: every rank
    calls it with the same shapes and flags and its metadata of the same global batch.
    """
    mesh = _resolve_mesh(group)
    layout = mesh.layout
    U = layout.ulysses_degree
    values_checked = metadata_checks_enabled(device_of(q))
    agreement = RankAgreement("hybrid_flash_attn_varlen_func", mesh.ulysses_group, U, device_of(q), values_checked)
    fn, public_fn = _KV_FUNCTIONS[layout.kv_scheme]
    with agreement.validating():
        check_flash_attn_defaults(dropout_p, (-1, -1), alibi_slopes)
        window = check_window_size(window_size, bool(causal))
        softcap = check_softcap(softcap)
        check_qkv(q, k, v, 3, "[local_tokens, heads, head_dim]")
        check_local_tokens(q, k, v, "the tokens of q: the hybrid layout shards q, k and v alike")
        check_heads(q, k)
        replicas = check_head_split(q.shape[1], k.shape[1], U, "the mesh's Ulysses group")
        check_sinks(sinks, q.shape[1], q.device)
        check_collective_device(q, layout.world_size)
        _resolve_scale(softmax_scale)
        heads_k_local = k.shape[1] * replicas // U
        chunk = check_chunk_stride(ulysses_heads_k_stride, heads_k_local, "ulysses_heads_k_stride")
        if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, int) or heads_k_stride < 1 \
                or chunk % heads_k_stride:
            raise ValueError(f"heads_k_stride: expected an int >= 1 dividing the {chunk} KV heads of an all-to-all "
                             f"chunk, got {heads_k_stride!r}")
        features = feature_kwargs(public_fn, public_fn.__name__, softcap, sinks)
        shards = HeadShards(group=mesh.ulysses_group, world_size=U, rank=mesh.ulysses_rank, total_local=q.shape[0],
                            batch=1, num_heads_q=q.shape[1], num_heads_k=k.shape[1], kv_replicas=replicas,
                            heads_k_stride=chunk)
        _check_kv_scheme_arguments(layout, mesh.kv_rank, q, shards, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, heads_k_stride, local_k_slice, window, softcap, bool(causal))
    agreement.check(lambda: Fingerprint()
                    .shape("the shape of q", q.shape).shape("the shape of k", k.shape)
                    .dtype("the dtype of q", q.dtype).integer("heads_k_stride", heads_k_stride)
                    .integer("ulysses_heads_k_stride", chunk)
                    .flag("causal", causal).real("softmax_scale", effective_scale(softmax_scale, q.shape[-1]))
                    .flag("deterministic", deterministic).integer("window_size[0]", window[0])
                    .integer("window_size[1]", window[1]).real("softcap", softcap).flag("sinks", sinks is not None)
                    .integer("max_seqlen_k", max_seqlen_k))
    inner = KVSchemeAttention(fn, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice),
                              heads_k_stride, softmax_scale, bool(causal), window, bool(deterministic), mesh.kv_group,
                              features)
    caller = tuple(t for t in (cu_seqlens_q, cu_seqlens_k) if isinstance(t, Tensor))
    out, lse = head_sharded_attention(q, k, v, sinks, shards, inner, bool(return_attn_probs), *caller)
    if return_attn_probs:
        return out, lse, None
    return out
