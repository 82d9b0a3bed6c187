"""Grouped attention "through the Python wrapper": the package's second implementation.

The package has three ways to compute G query groups over one K/V stream: one library call per
group (the baseline), the fused grouped kernel (``grouped_flash_attn_varlen_func``, one launch
that streams the shared K/V once), and this one, which reaches a single launch WITHOUT a grouped
kernel: it rewrites the G groups as one plain (G = 1) varlen problem over a batch of G * B
sequences, calls the library once, and splits the result back per group.

It is a genuinely different code path from the fused kernel, which is what makes it useful as a
benchmark point and as a cross-check:

* Q of all groups is concatenated along tokens (one copy of Q).
* K and V are duplicated once per group (``G * total_k`` rows), so that every (group, sequence)
  owns its K/V rows; each group's view of sequence b is trimmed to ``seqused_k_list[g][b]`` keys
  through the G = 1 call's own ``seqused_k`` (the physical copy keeps the full rows: compacting it
  would need the seqused values on the host, i.e. a device-to-host sync).
* The combined ``cu_seqlens`` / ``seqused_k`` are built with tensor ops on the device from the
  shapes (Python ints) and the metadata tensors: no ``.item()``, no host sync, CUDA-graph safe.

Autograd flows through ``torch.cat`` / ``repeat`` / ``split`` and the library op's backward, so
dQ lands per group and dK/dV are summed over the group copies, as with the fused kernel.

Layout of the combined batch (G groups, B sequences each): sequence ``s = g * (B + 1) + b``.
For ``b < B`` it is (group g, sequence b); ``b = B`` is a "tail" sequence holding group g's query
rows after ``cu_seqlens_q_list[g][B]`` (rows that belong to no sequence) and the K/V copy's rows
after ``cu_seqlens_k[B]``, with ``seqused_k = 0``. Tail rows therefore come out as out = 0 and
lse = -inf, the library's rule for rows after the last sequence, and the cumulative arrays stay
contiguous without knowing their values on the host.

Windows, softcap and sinks pass through unchanged: each (group, sequence) of the combined batch
keeps its own query and key lengths, so its own bottom-right alignment. With sinks a tail row
(a sequence without keys here) would get lse = its sink; it is set back to -inf, on the device.
"""

# The docstrings of this module and of forward_as_one_call are also those of grouped_python.py,
# which scripts/dev/gen_grouped_python.py writes: _flash_attn_varlen_forward_grouped, with the
# signature of grouped_flash_attn_varlen_func (less return_lse and deterministic), calling
# forward_as_one_call with every argument.

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .grouped import single_group_attention

__all__ = ["combined_call", "forward_as_one_call"]


def _check_lists(q_list, cu_seqlens_q_list, max_seqlen_q_list, seqused_k_list, k, cu_seqlens_k) -> int:
    """Shape checks this rewrite depends on (the library validates everything else). Returns G."""
    G = len(q_list)
    if G == 0:
        raise ValueError("q_list: expected at least one query group, got an empty list")
    for name, lst in (("cu_seqlens_q_list", cu_seqlens_q_list), ("max_seqlen_q_list", max_seqlen_q_list)):
        if len(lst) != G:
            raise ValueError(f"{name}: expected {G} entries (one per group in q_list), got {len(lst)}")
    if seqused_k_list is not None and len(seqused_k_list) != G:
        raise ValueError(
            f"seqused_k_list: expected None or {G} entries (one per group in q_list), got {len(seqused_k_list)}"
        )
    if not isinstance(k, Tensor) or k.dim() != 3:
        raise ValueError(f"k: expected a 3-D tensor [total_k, Hk, D], got {getattr(k, 'shape', type(k).__name__)}")
    if not isinstance(cu_seqlens_k, Tensor) or cu_seqlens_k.dim() != 1 or cu_seqlens_k.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens_k: expected a 1-D int32 tensor of batch_size + 1 >= 2 entries, got "
            f"{getattr(cu_seqlens_k, 'shape', type(cu_seqlens_k).__name__)}"
        )
    nb = cu_seqlens_k.shape[0]
    for g in range(G):
        q = q_list[g]
        if not isinstance(q, Tensor) or q.dim() != 3:
            raise ValueError(
                f"q_list[{g}]: expected a 3-D tensor [total_q, Hq, D], got {getattr(q, 'shape', type(q).__name__)}"
            )
        if q.shape[1:] != q_list[0].shape[1:]:
            raise ValueError(
                f"q_list[{g}]: expected [*, {q_list[0].shape[1]}, {q_list[0].shape[2]}] (heads and head_dim "
                f"of q_list[0]), got {tuple(q.shape)}"
            )
        cu = cu_seqlens_q_list[g]
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.shape[0] != nb:
            raise ValueError(
                f"cu_seqlens_q_list[{g}]: expected a 1-D int32 tensor of {nb} entries (as cu_seqlens_k), "
                f"got {getattr(cu, 'shape', type(cu).__name__)}"
            )
        s = None if seqused_k_list is None else seqused_k_list[g]
        if s is not None and (not isinstance(s, Tensor) or s.dim() != 1 or s.shape[0] != nb - 1):
            raise ValueError(
                f"seqused_k_list[{g}]: expected None or a 1-D int32 tensor of {nb - 1} entries "
                f"(batch_size), got {getattr(s, 'shape', type(s).__name__)}"
            )
    # What the combined call cannot name: the groups' dtypes and devices (torch.cat would promote
    # or refuse them), the metadata's dtype and layout (the combined arrays are new int32 tensors)
    q0 = q_list[0]
    for g in range(1, G):
        if q_list[g].dtype != q0.dtype:
            raise ValueError(f"q_list[{g}]: expected dtype {q0.dtype} (the dtype of q_list[0]), got {q_list[g].dtype}")
        if q_list[g].device != q0.device:
            raise ValueError(f"q_list[{g}]: expected a tensor on {q0.device} (the device of q_list[0]), got "
                             f"{q_list[g].device}")
    metadata = [("cu_seqlens_k", cu_seqlens_k)] + [(f"cu_seqlens_q_list[{g}]", cu_seqlens_q_list[g]) for g in range(G)]
    if seqused_k_list is not None:
        metadata += [(f"seqused_k_list[{g}]", s) for g, s in enumerate(seqused_k_list) if s is not None]
    for name, t in metadata:
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: expected dtype torch.int32, got {t.dtype}")
        if t.shape[0] > 1 and t.stride(0) != 1:
            raise ValueError(f"{name}: expected a contiguous tensor, got stride {t.stride(0)}")
        if t.device != q0.device:
            raise ValueError(f"{name}: expected a tensor on {q0.device} (the device of q_list[0]), got {t.device}")
    return G


def _check_cumulative(values: List[int], name: str, tokens: int) -> None:
    """values (host ints) are the cumulative lengths `name` of a tensor of `tokens` rows: the
    first 0, none smaller than the one before, none past the rows (the library's checks and
    wording, for the caller's argument)."""
    if values[0] != 0:
        raise ValueError(f"{name}[0]: expected 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name}[{i}]: expected >= {name}[{i - 1}] ({values[i - 1]}) (cumulative lengths never "
                             f"decrease), got {values[i]}")
    if values[-1] > tokens:
        raise ValueError(f"{name}[{len(values) - 1}]: expected <= the number of tokens in the tensor ({tokens}), got "
                         f"{values[-1]}")


def _check_values(cu_seqlens_q_list, cu_seqlens_k: Tensor, seqused_k_list, total_q: List[int], total_k: int) -> None:
    """The metadata VALUES of every group, checked against its own tensors and named as the caller
    passed them: the library sees only the combined arrays, whose entries it would name instead,
    and in which a group's cu_seqlens_q_list[g] not starting at 0 is no error (its first rows
    would silently join the previous group's rows after its last sequence)."""
    k_values = cu_seqlens_k.tolist()
    _check_cumulative(k_values, "cu_seqlens_k", total_k)
    lengths = [b - a for a, b in zip(k_values, k_values[1:])]
    for g, cu in enumerate(cu_seqlens_q_list):
        _check_cumulative(cu.tolist(), f"cu_seqlens_q_list[{g}]", total_q[g])
        used = None if seqused_k_list is None else seqused_k_list[g]
        if used is not None:
            for b, (n, length) in enumerate(zip(used.tolist(), lengths)):
                if not 0 <= n <= length:
                    raise ValueError(f"seqused_k_list[{g}][{b}]: expected 0 to the key length of sequence {b} from "
                                     f"cu_seqlens_k ({length}), got {n}")


def _values_readable(device: torch.device) -> bool:
    """Whether metadata values are checked on the host: always on CPU (free), on CUDA only with
    RING_FLASH_ATTN_CHECK_METADATA=1 (a sync), as the library does."""
    return device.type == "cpu" or os.environ.get("RING_FLASH_ATTN_CHECK_METADATA", "0") == "1"


def forward_as_one_call(q_list: Sequence[Tensor], k: Tensor, v: Tensor, cu_seqlens_q_list: Sequence[Tensor],
                        cu_seqlens_k: Tensor, max_seqlen_q_list: Sequence[int], max_seqlen_k: int,
                        seqused_k_list: Optional[Sequence[Optional[Tensor]]], softmax_scale: Optional[float],
                        causal: bool, window_size: Tuple[int, int], softcap: float,
                        sinks: Optional[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """Grouped varlen attention as ONE plain (G = 1) library call over G * B sequences.

    Same arguments and results as ``grouped_flash_attn_varlen_func(..., return_lse=True)``;
    only the implementation differs (see the module docstring).

    Args:
        q_list: G tensors ``[total_q_g, Hq, D]`` (same dtype and device; any token/head strides).
        k, v: ``[total_k, Hk, D]``, shared by all groups, Hq % Hk == 0.
        cu_seqlens_q_list: G int32 tensors ``[B + 1]`` (each starting at 0).
        cu_seqlens_k: int32 ``[B + 1]`` (starting at 0).
        max_seqlen_q_list: G Python ints (hints; no host sync needed).
        max_seqlen_k: Python int (hint).
        seqused_k_list: None, or G entries, each None or an int32 ``[B]`` tensor: group g sees
            the first ``seqused_k_list[g][b]`` keys of sequence b (all of them when None).
        softmax_scale: scale of QK^T; default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask per (group, sequence).
        window_size, softcap, sinks: as in ``grouped_flash_attn_varlen_func`` (local attention,
            logit softcap, float32 ``[Hq]`` sink logits).

    Returns:
        ``(out_list, lse_list)``: out ``[total_q_g, Hq, D]`` in the dtype of q (views into one
        buffer of ``sum_g total_q_g`` rows), lse ``[Hq, total_q_g]`` float32, natural log,
        contiguous, not differentiable.

    Memory: builds ``cat(q_list)`` (``sum_g total_q_g`` rows) and G copies of K and V
    (``G * total_k`` rows each) for the duration of the call (and, under autograd, until the
    backward has run).
    """
    q_list = list(q_list)
    G = _check_lists(q_list, cu_seqlens_q_list, max_seqlen_q_list, seqused_k_list, k, cu_seqlens_k)
    if _values_readable(q_list[0].device):
        _check_values(cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, [int(q.shape[0]) for q in q_list],
                      int(k.shape[0]))
    return combined_call(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, max_seqlen_q_list, max_seqlen_k,
                         seqused_k_list, softmax_scale, causal, window_size, softcap, sinks)


def combined_call(q_list: List[Tensor], k: Tensor, v: Tensor, cu_seqlens_q_list: Sequence[Tensor],
                  cu_seqlens_k: Tensor, max_seqlen_q_list: Sequence[int], max_seqlen_k: int,
                  seqused_k_list: Optional[Sequence[Optional[Tensor]]], softmax_scale: Optional[float],
                  causal: bool, window_size: Tuple[int, int], softcap: float,
                  sinks: Optional[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """forward_as_one_call without its argument checks, for a caller whose metadata is its own
    and already checked (zigzag llama3's): no host read of a tensor value."""
    G = len(q_list)
    total_q = [int(q.shape[0]) for q in q_list]
    total_k = int(k.shape[0])

    # Q: one buffer, group after group.
    q_all = q_list[0] if G == 1 else torch.cat(q_list, dim=0)
    # K/V: one copy per group, so that every (group, sequence) owns its rows.
    if G == 1:
        k_all, v_all = k, v
    else:
        k_all = k.repeat(G, 1, 1)
        v_all = v.repeat(G, 1, 1)

    # Combined metadata, on the device. Each group contributes its B + 1 cumulative offsets
    # shifted by where its rows start; the entry at b = B opens that group's tail sequence,
    # which the next group's first offset (or the final total) closes.
    cu_q_parts, cu_k_parts, used_parts = [], [], []
    q_offset = 0
    lengths_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    zero = cu_seqlens_k.new_zeros((1,))
    for g in range(G):
        cu_q_parts.append(cu_seqlens_q_list[g] + q_offset)
        cu_k_parts.append(cu_seqlens_k + g * total_k)
        used = seqused_k_list[g] if seqused_k_list is not None else None
        used_parts.append(lengths_k if used is None else used)
        used_parts.append(zero)  # the tail sequence sees no key
        q_offset += total_q[g]
    cu_q_parts.append(cu_seqlens_k.new_full((1,), q_offset))
    cu_k_parts.append(cu_seqlens_k.new_full((1,), G * total_k))
    cu_q_all = torch.cat(cu_q_parts).to(torch.int32)
    cu_k_all = torch.cat(cu_k_parts).to(torch.int32)
    used_all = torch.cat(used_parts).to(torch.int32)

    # max_seqlen_* are hints to the library (it never sizes anything by them); the tail
    # sequences are not counted in them.
    out_all, lse_all = single_group_attention(q_all, k_all, v_all, cu_q_all, cu_k_all,
                                              max(int(m) for m in max_seqlen_q_list), max_seqlen_k, used_all,
                                              softmax_scale, causal, False, window_size, softcap, sinks)

    out_list = list(out_all.split(total_q, dim=0))
    lse_list = []
    start = 0
    for g, n in enumerate(total_q):
        lse = lse_all.narrow(1, start, n).contiguous()
        if sinks is not None:
            # Rows after cu_seqlens_q_list[g][B] belong to no sequence: lse = -inf, sinks or not.
            tail = torch.arange(n, device=lse.device) >= cu_seqlens_q_list[g][-1]
            lse = torch.where(tail, float("-inf"), lse)
        lse_list.append(lse)
        start += n
    return out_list, lse_list
