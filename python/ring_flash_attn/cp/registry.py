"""The registry of context-parallel schemes: name -> ``ContextParallelScheme``.

Every scheme of the package has one entry here, in the order below; the HuggingFace adapter
offers every scheme whose entry has an ``hf`` binding (``hf_schemes()``), in that order. Adding a
scheme is a module under ``ring_flash_attn/cp/`` and one ``register_scheme`` call (see
``docs/cp-package.md``).
"""

from __future__ import annotations

from typing import Dict, Tuple

from .hybrid import HF_ATTN_HYBRID, hybrid_flash_attn_varlen_func, hybrid_prepare_cu_seqlens
from .hybrid import hf_batch_metadata as hybrid_hf_batch_metadata
from .llama3 import HF_ATTN_LLAMA3, llama3_flash_attn_varlen_func
from .llama3 import hf_batch_metadata as llama3_hf_batch_metadata
from .llama3_layout import llama3_flash_attn_prepare_cu_seqlens, llama3_shard, llama3_unshard
from .ring import ring_flash_attn_func, ring_flash_attn_varlen_func
from .ring_layout import ring_local_cu_seqlens, ring_shard, ring_unshard
from .scheme import ContextParallelScheme, HFBinding
from .stripe import stripe_flash_attn_func
from .ulysses import (HF_ATTN_ULYSSES, ulysses_flash_attn_func, ulysses_flash_attn_varlen_func,
                      ulysses_prepare_cu_seqlens, ulysses_shard, ulysses_unshard)
from .ulysses import hf_batch_metadata as ulysses_hf_batch_metadata
from .stripe_layout import stripe_shard, stripe_unshard
from .zigzag_layout import zigzag_llama3_prepare_cu_seqlens, zigzag_local_cu_seqlens, zigzag_shard, zigzag_unshard
from .zigzag_llama3 import HF_ATTN_ZIGZAG_LLAMA3, zigzag_llama3_flash_attn_varlen_func
from .zigzag_llama3 import hf_batch_metadata as zigzag_llama3_hf_batch_metadata
from .zigzag_ring import zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_varlen_func

__all__ = ["get_scheme", "hf_scheme", "hf_schemes", "register_scheme", "schemes"]

_SCHEMES: Dict[str, ContextParallelScheme] = {}


def register_scheme(scheme: ContextParallelScheme) -> ContextParallelScheme:
    """Adds ``scheme`` to the registry and returns it. Raises ValueError when its name, or the
    name of its HF attention implementation, is taken."""
    if scheme.name in _SCHEMES:
        raise ValueError(f"scheme.name: expected a name not registered yet, got {scheme.name!r}")
    if scheme.hf is not None:
        taken = [s.name for s in hf_schemes() if s.hf.attn_implementation == scheme.hf.attn_implementation]
        if taken:
            raise ValueError(f"scheme.hf.attn_implementation: expected a name not used by another scheme, got "
                             f"{scheme.hf.attn_implementation!r} (used by {taken[0]!r})")
    _SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> ContextParallelScheme:
    """The scheme registered as ``name``; ValueError listing the registered names otherwise."""
    try:
        return _SCHEMES[name]
    except KeyError:
        raise ValueError(f"name: expected one of the registered schemes {sorted(_SCHEMES)}, got {name!r}") from None


def schemes() -> Tuple[ContextParallelScheme, ...]:
    """Every registered scheme, in registration order."""
    return tuple(_SCHEMES.values())


def hf_schemes() -> Tuple[ContextParallelScheme, ...]:
    """The schemes the HuggingFace adapter offers (those with an ``hf`` binding), in registration order."""
    return tuple(s for s in _SCHEMES.values() if s.hf is not None)


def hf_scheme(attn_implementation: str) -> ContextParallelScheme:
    """The scheme registered in transformers as ``attn_implementation``; ValueError otherwise."""
    for s in hf_schemes():
        if s.hf.attn_implementation == attn_implementation:
            return s
    names = [s.hf.attn_implementation for s in hf_schemes()]
    raise ValueError(f"attn_implementation: expected one of {names}, got {attn_implementation!r}")


# ---- the schemes ----------------------------------------------------------------------------------

register_scheme(ContextParallelScheme(
    name="ring", layout="contiguous",
    summary="ring attention, rank r holds piece r of every sequence (K/V blocks pass around the ring)",
    func=ring_flash_attn_func, varlen_func=ring_flash_attn_varlen_func, shard=ring_shard, unshard=ring_unshard,
    prepare_cu_seqlens=ring_local_cu_seqlens))

register_scheme(ContextParallelScheme(
    name="zigzag_ring", layout="zigzag",
    summary="ring attention, rank r holds chunks r and 2N-1-r of every sequence (causal work balanced)",
    func=zigzag_ring_flash_attn_func, varlen_func=zigzag_ring_flash_attn_varlen_func,
    shard=zigzag_shard, unshard=zigzag_unshard, prepare_cu_seqlens=zigzag_local_cu_seqlens))

register_scheme(ContextParallelScheme(
    name="stripe", layout="stripe",
    summary="ring attention, rank r holds tokens r, r + N, r + 2N, ... of every sequence",
    func=stripe_flash_attn_func, shard=stripe_shard, unshard=stripe_unshard))

register_scheme(ContextParallelScheme(
    name="llama3", layout="contiguous",
    summary="all-gather of K/V slices, rank r holds tokens [r T/N, (r+1) T/N) of the packed batch (padded to N T)",
    varlen_func=llama3_flash_attn_varlen_func, shard=llama3_shard, unshard=llama3_unshard,
    prepare_cu_seqlens=llama3_flash_attn_prepare_cu_seqlens,
    hf=HFBinding(attn_implementation=HF_ATTN_LLAMA3, prepare_batch=llama3_hf_batch_metadata)))

register_scheme(ContextParallelScheme(
    name="zigzag_llama3", layout="zigzag",
    summary="all-gather of K/V slices, rank r holds chunks r and 2N-1-r of every sequence",
    varlen_func=zigzag_llama3_flash_attn_varlen_func, shard=zigzag_shard, unshard=zigzag_unshard,
    prepare_cu_seqlens=zigzag_llama3_prepare_cu_seqlens,
    hf=HFBinding(attn_implementation=HF_ATTN_ZIGZAG_LLAMA3, prepare_batch=zigzag_llama3_hf_batch_metadata)))

register_scheme(ContextParallelScheme(
    name="ulysses", layout="contiguous",
    summary="all-to-all from sequence to head shards, rank r holds tokens [r T/N, (r+1) T/N) of the packed batch (padded to N T)",
    func=ulysses_flash_attn_func, varlen_func=ulysses_flash_attn_varlen_func, shard=ulysses_shard,
    unshard=ulysses_unshard, prepare_cu_seqlens=ulysses_prepare_cu_seqlens,
    hf=HFBinding(attn_implementation=HF_ATTN_ULYSSES, prepare_batch=ulysses_hf_batch_metadata)))

register_scheme(ContextParallelScheme(
    name="hybrid", layout="hybrid",
    summary="all-to-all inside groups of ulysses_degree ranks, zigzag llama3 (or llama3) across kv_degree ranks",
    varlen_func=hybrid_flash_attn_varlen_func, prepare_cu_seqlens=hybrid_prepare_cu_seqlens,
    hf=HFBinding(attn_implementation=HF_ATTN_HYBRID, prepare_batch=hybrid_hf_batch_metadata)))
