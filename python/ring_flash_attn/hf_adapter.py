"""HuggingFace transformers adapter: llama3 context parallelism inside a transformers model.

Two ways in, sharing one state (the process group, ``heads_k_stride`` and the current batch's
metadata):

1. **Our attention implementations** (recommended), registered in transformers'
   ``AttentionInterface`` by ``register_hf_attention(process_group, heads_k_stride)``: one per
   scheme of ``ring_flash_attn.cp.registry`` with an ``hf`` binding, today

   * ``"ring_attn_llama3"`` (``HF_ATTN_LLAMA3``): the CONTIGUOUS layout of
     ``llama3_flash_attn_varlen_func``: of the packed batch (``T`` tokens, ``T % N == 0``, any
     sequence lengths) rank r holds tokens ``[r T/N, (r+1) T/N)``;
   * ``"ring_attn_zigzag_llama3"`` (``HF_ATTN_ZIGZAG_LLAMA3``): the ZIGZAG layout of
     ``zigzag_llama3_flash_attn_varlen_func`` (``zigzag_shard``; every sequence length a multiple
     of 2N; causal work balanced across ranks).

   Build the model with ``attn_implementation=HF_ATTN_LLAMA3`` (or switch an existing one with
   ``model.set_attn_implementation(...)``). Neither name contains "flash": transformers treats
   any implementation whose name contains "flash" as a FlashAttention kernel to import, and
   would refuse ours without the flash_attn package. They need no flash_attn package.

2. **Upstream ring-flash-attention's drop-in** ``substitute_hf_flash_attn(process_group,
   heads_k_stride)``: a model built with ``attn_implementation="flash_attention_2"`` runs the
   contiguous llama3 scheme. It registers the contiguous function under ``"flash_attention_2"``
   and replaces ``transformers.modeling_flash_attention_utils._flash_attention_forward`` (for
   code that calls that private function directly); ``restore_hf_flash_attn()`` undoes both and
   ``use_ring_attn(False)`` routes ``"flash_attention_2"`` back to transformers' own functions
   without undoing. transformers still checks at model construction that the flash_attn package
   is installed for ``"flash_attention_2"``; where it is not (e.g. CPU), use way 1.

Either way, before the forward of every batch, every rank calls
``update_ring_flash_attn_params(cu_seqlens, process_group)`` with the GLOBAL cumulative sequence
lengths of the packed batch (int tensor ``[B + 1]``, ``cu_seqlens[-1] == T``): it computes the
rank's metadata of every registered scheme (its ``hf.prepare_batch``:
``llama3_flash_attn_prepare_cu_seqlens`` for the contiguous layout,
``zigzag_llama3_prepare_cu_seqlens`` for the zigzag one) on the host once per batch, so the
attention calls in the layers read nothing from the device. The model's input is the rank's
shard of the packed batch with batch size 1: ``input_ids`` ``[1, T/N]`` and the matching
``position_ids`` (the global positions of the rank's tokens, restarting at 0 with every
sequence, so RoPE sees the right positions). Keep the metadata until the backward is done
(gradient checkpointing recomputes the forward with it).

transformers is imported lazily: ``import ring_flash_attn`` works without it; the functions that
need it raise ImportError naming ``pip install transformers``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .cp.llama3 import HF_ATTN_LLAMA3
from .cp.process_group import resolve_group
from .cp.registry import hf_scheme, hf_schemes
from .cp.scheme import BatchMetadata, BatchNotSupported
from .cp.rank_agreement import Fingerprint, RankAgreement, device_of
from .cp.validation import check_cumulative_values, check_int32_values, host_ints

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
from .cp.zigzag_llama3 import HF_ATTN_ZIGZAG_LLAMA3

__all__ = [
    "HF_ATTN_LLAMA3",
    "HF_ATTN_ZIGZAG_LLAMA3",
    "llama3_attention_forward",
    "register_hf_attention",
    "restore_hf_flash_attn",
    "substitute_hf_flash_attn",
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


@dataclass
class _BatchParams:
    """What update_ring_flash_attn_params computed for one packed batch (host values + metadata)."""

    world_size: int
    rank: int
    total: int  # tokens of the packed batch (all ranks)
    # per scheme name: {causal: metadata} (CPU tensors), or why the scheme's layout cannot take the batch
    prepared: Dict[str, Union[Dict[bool, BatchMetadata], BatchNotSupported]]
    _on_device: Dict[Tuple[str, bool, str], BatchMetadata] = field(default_factory=dict)

    def metadata(self, attn_implementation: str, causal: bool, device: torch.device) -> BatchMetadata:
        """The scheme's metadata with its tensors on ``device`` (copied once per device, no sync)."""
        key = (attn_implementation, causal, str(device))
        if key not in self._on_device:
            scheme = hf_scheme(attn_implementation)
            if scheme.name not in self.prepared:
                raise RuntimeError(f"ring_flash_attn.hf_adapter: no metadata of the scheme {scheme.name!r} (registered "
                                   f"after update_ring_flash_attn_params): call update_ring_flash_attn_params again")
            prepared = self.prepared[scheme.name]
            if isinstance(prepared, BatchNotSupported):
                raise ValueError(f"cu_seqlens: the {scheme.layout} layout cannot take this batch: {prepared}")
            self._on_device[key] = tuple(x.to(device, non_blocking=True) if isinstance(x, Tensor) else x
                                         for x in prepared[causal])
        return self._on_device[key]


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


# ---- per-batch metadata --------------------------------------------------------------------------


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


def update_ring_flash_attn_params(cu_seqlens: Union[Tensor, Sequence[int]],
                                  process_group: Optional[ProcessGroup] = None) -> None:
    """Set the packed batch the next forward (and its backward) runs on (upstream's semantics).

    Args:
        cu_seqlens: the GLOBAL cumulative sequence lengths of the packed batch: a 1-D integer
            tensor (or list of ints) ``[B + 1]``, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``
            (the tokens of all ranks, ``T % N == 0``). Any integer dtype, any device: its values
            are read once here, and the metadata tensors built from them are moved to the device
            of the attention inputs on first use.
        process_group: the context-parallel group (None: the default group, or a single process
            when ``torch.distributed`` is not initialised). Must be the group the attention runs
            on (the one given to ``register_hf_attention`` / ``substitute_hf_flash_attn``).

    Computes, for this rank, the metadata of every scheme the adapter offers (its
    ``hf.prepare_batch`` in ``ring_flash_attn.cp.registry``):
    ``llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, N)`` (causal and not) for the
    contiguous layout and, when every sequence length is a multiple of 2N,
    ``zigzag_llama3_prepare_cu_seqlens`` for the zigzag layout. A setup step: it reads
    cu_seqlens on the host (one device-to-host copy for a CUDA tensor), once per batch, so the
    attention calls of the layers never do (they only copy the small metadata tensors to the
    device, host to device, once per batch).

    Raises:
        ValueError: cu_seqlens is not 1-D with >= 2 entries, not integer, does not start at 0,
            decreases, has an entry outside int32, or its total is not divisible by the group's
            world size.
        RuntimeError: with ``RING_FLASH_ATTN_CHECK_METADATA=1``, the ranks passed different
            cu_seqlens (compared with one small all-gather; every rank raises). Without it,
            ranks given different batches compute wrong gradients.
    """
    group, world_size, rank = resolve_group(process_group)
    device = cu_seqlens.device if isinstance(cu_seqlens, Tensor) else torch.device("cpu")
    agreement = RankAgreement("update_ring_flash_attn_params", group, world_size, device, values_checked=True)
    with agreement.validating():
        values = _checked_values(cu_seqlens, world_size)
    # the GLOBAL batch: the same on every rank (opt-in check; the host values are hashed on the CPU)
    agreement.check(lambda: Fingerprint().tensor_values("cu_seqlens", torch.tensor(values, dtype=torch.int64)))
    total = values[-1]
    # from the host values: CPU tensors, moved to the activations' device on first use
    prepared: Dict[str, Union[Dict[bool, BatchMetadata], BatchNotSupported]] = {}
    for scheme in hf_schemes():
        try:
            prepared[scheme.name] = scheme.hf.prepare_batch(values, rank, world_size)
        except BatchNotSupported as e:  # reported when the scheme is used on this batch
            prepared[scheme.name] = e
    params = _BatchParams(world_size=world_size, rank=rank, total=total, prepared=prepared)
    with _LOCK:
        _STATE.batch = params


# ---- the attention itself ------------------------------------------------------------------------


def _validating(x: object):
    """The adapter's own argument checks of an attention call: with the cross-rank check on
    (``RING_FLASH_ATTN_CHECK_METADATA=1``), a rank whose checks raise tells the other ranks, which
    raise in the scheme's own check instead of waiting for it (``cp.rank_agreement``)."""
    group, world_size, _ = resolve_group(_STATE.group)
    return RankAgreement("the HF adapter's attention", group, world_size, device_of(x),
                         values_checked=True).validating()


def _ring_attention(attn_implementation: str, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                    softmax_scale: Optional[float], dropout: float, deterministic: Optional[bool]) -> Tensor:
    """The scheme registered as ``attn_implementation`` on q ``[T, Hq, D]``, k/v ``[T, Hk, D]``
    (the rank's T = total / N tokens) -> out ``[T, Hq, D]``."""
    group = _STATE.group
    with _validating(q):
        batch = _STATE.batch
        if batch is None:
            raise RuntimeError("ring_flash_attn.hf_adapter: no batch metadata: call "
                               "update_ring_flash_attn_params(cu_seqlens, process_group) on every rank before the "
                               "model's forward")
        _, world_size, rank = resolve_group(group)
        if (world_size, rank) != (batch.world_size, batch.rank):
            raise RuntimeError(f"update_ring_flash_attn_params was called for rank {batch.rank} of "
                               f"{batch.world_size}, but the attention runs on rank {rank} of {world_size} (the "
                               f"process group given to register_hf_attention / substitute_hf_flash_attn): pass the "
                               f"same group to both")
        local = batch.total // batch.world_size
        if q.shape[0] != local:
            raise ValueError(f"query: expected {local} local tokens (the {batch.total} tokens of the cu_seqlens "
                             f"given to update_ring_flash_attn_params / world size {batch.world_size}), got "
                             f"{q.shape[0]}")
        if deterministic is None:
            deterministic = os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
        cu_q, cu_k, max_q, max_k, k_slice = batch.metadata(attn_implementation, bool(causal), q.device)
    fn = hf_scheme(attn_implementation).varlen_func
    return fn(q, k, v, cu_q, cu_k, max_q, max_k, _STATE.heads_k_stride, k_slice, dropout_p=dropout,
              softmax_scale=softmax_scale, causal=bool(causal), deterministic=bool(deterministic), group=group)


def _check_unsupported(batch_size: int, q_len: int, k_len: int, attention_mask, sliding_window, softcap,
                       s_aux) -> None:
    if batch_size != 1:
        raise ValueError(f"query: expected batch size 1 (pack the sequences into one row and describe them with "
                         f"update_ring_flash_attn_params), got {batch_size}")
    if k_len != q_len:
        raise NotImplementedError(f"key: expected as many tokens as the query ({q_len}), got {k_len}: a KV cache "
                                  f"is not supported by context-parallel attention; pass use_cache=False")
    if attention_mask is not None:
        raise NotImplementedError("attention_mask: padding masks are not supported; pack the sequences without "
                                  "padding (batch size 1, position_ids restarting per sequence) and pass their "
                                  "cu_seqlens to update_ring_flash_attn_params")
    if sliding_window is not None:
        raise NotImplementedError(f"sliding_window: sliding-window attention is not supported (got {sliding_window})")
    if softcap is not None and softcap != 0.0:
        raise NotImplementedError(f"softcap: logit soft-capping is not supported (got {softcap})")
    if s_aux is not None:
        raise NotImplementedError("s_aux: attention sinks are not supported")


def _hf_attention(attn_implementation: str, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Optional[Tensor], dropout: float, scaling: Optional[float],
                  sliding_window: Optional[int], softcap: Optional[float], is_causal: Optional[bool],
                  kwargs: Dict[str, Any]) -> Tuple[Tensor, None]:
    with _validating(query):
        if query.dim() != 4:
            raise ValueError(f"query: expected a 4-D tensor [batch, heads, seq, head_dim], got shape "
                             f"{tuple(query.shape)}")
        _check_unsupported(query.shape[0], query.shape[2], key.shape[2], attention_mask, sliding_window, softcap,
                           kwargs.get("s_aux"))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # [1, H, S, D] -> [S, H, D] views (token and head strides are free, head_dim stays contiguous)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = _ring_attention(attn_implementation, q, k, v, causal, scaling, dropout, kwargs.get("deterministic"))
    return out.unsqueeze(0), None


def llama3_attention_forward(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
    dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
    softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs: Any,
) -> Tuple[Tensor, None]:
    """transformers attention function (``AttentionInterface``) for the CONTIGUOUS llama3 layout.

    Args:
        module: the attention module (``module.is_causal`` is used unless ``is_causal`` is given).
        query: ``[1, Hq, T, D]``, key, value: ``[1, Hk, T, D]``: the rank's T = total / N tokens
            (contiguous piece ``[r T, (r+1) T)`` of the packed batch), after RoPE.
        attention_mask: must be None (no padding; the packing is described by the cu_seqlens of
            ``update_ring_flash_attn_params``).
        dropout: must be 0.0. scaling: softmax scale (default ``1 / sqrt(D)``).
        sliding_window, softcap, kwargs["s_aux"]: unsupported (NotImplementedError unless unset).
        kwargs: the model's other keyword arguments (position_ids, ...), ignored except
            ``deterministic`` (default: ``FLASH_ATTENTION_DETERMINISTIC=1`` in the environment).

    Returns ``(attn_output [1, T, Hq, D], None)`` (no attention weights). Collective over the
    group of ``register_hf_attention``.
    """
    return _hf_attention(HF_ATTN_LLAMA3, module, query, key, value, attention_mask, dropout, scaling,
                         sliding_window, softcap, is_causal, kwargs)


def zigzag_llama3_attention_forward(
    module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
    dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
    softcap: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs: Any,
) -> Tuple[Tensor, None]:
    """transformers attention function for the ZIGZAG llama3 layout: as ``llama3_attention_forward``
    but the rank's T tokens are its ``zigzag_shard`` of the packed batch (of every sequence, chunk
    r then chunk 2N-1-r; every sequence length a multiple of 2N). Returns
    ``(attn_output [1, T, Hq, D], None)`` in the rank's local (zigzag) order."""
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
    binding: ``"ring_attn_llama3"`` and ``"ring_attn_zigzag_llama3"``) and set the group and
    ``heads_k_stride`` they use.

    Args:
        process_group: the context-parallel group (None: the default group).
        heads_k_stride: KV heads per all-gather slice (must divide the model's KV heads; 1 always
            does): bounds the gathered K/V memory and lets the next slice's all-gather overlap
            this slice's compute.

    Returns the registered names in registry order, ``(HF_ATTN_LLAMA3, HF_ATTN_ZIGZAG_LLAMA3)``,
    the names to pass as ``attn_implementation``. Calling it again replaces the group and stride
    (shared with ``substitute_hf_flash_attn``). Raises ImportError without transformers.
    """
    transformers = _transformers()
    stride = _check_stride(heads_k_stride)
    with _LOCK:
        _STATE.group, _STATE.heads_k_stride = process_group, stride
    names = tuple(scheme.hf.attn_implementation for scheme in hf_schemes())
    for name in names:
        transformers.AttentionInterface.register(name, _attention_function(name))
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
    query_states ``[1, T, Hq, D]``, key/value_states ``[1, T, Hk, D]`` -> ``[1, T, Hq, D]``."""
    if not _STATE.enabled:
        return _STATE.original_flash_forward(
            query_states, key_states, value_states, attention_mask, query_length, is_causal, dropout=dropout,
            position_ids=position_ids, softmax_scale=softmax_scale, sliding_window=sliding_window,
            use_top_left_mask=use_top_left_mask, softcap=softcap, deterministic=deterministic, **kwargs)
    with _validating(query_states):
        if query_states.dim() != 4:
            raise ValueError(f"query_states: expected a 4-D tensor [batch, seq, heads, head_dim], got shape "
                             f"{tuple(query_states.shape)}")
        _check_unsupported(query_states.shape[0], query_states.shape[1], key_states.shape[1], attention_mask,
                           sliding_window, softcap, kwargs.get("s_aux"))
    out = _ring_attention(_SUBSTITUTED_SCHEME, query_states[0], key_states[0], value_states[0], is_causal,
                          softmax_scale, dropout, deterministic)
    return out.unsqueeze(0)


def substitute_hf_flash_attn(process_group: Optional[ProcessGroup], heads_k_stride: int) -> None:
    """Make transformers' ``"flash_attention_2"`` run llama3 context parallelism (contiguous
    layout) over ``process_group`` (upstream ring-flash-attention's adapter entry point).

    Registers the contiguous attention function under ``"flash_attention_2"`` in the
    ``AttentionInterface`` and replaces ``transformers.modeling_flash_attention_utils.
    _flash_attention_forward`` (``[1, T, H, D]`` in and out) for code that calls it directly.
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
