"""``torch.library`` custom ops over libringattn's grouped varlen attention.

Two ops in the namespace ``ring_flash_attn``:

``torch.ops.ring_flash_attn.grouped_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k,
seqused_k_list, max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic,
window_size=(-1, -1), softcap=0.0, sinks=None, diagonal_shift_list=None)``
    -> ``(out_list, lse_list)``

``torch.ops.ring_flash_attn.grouped_bwd(dout_list, q_list, k, v, out_list, lse_list,
cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k, softmax_scale,
causal, deterministic, window_size=(-1, -1), softcap=0.0, sinks=None, diagonal_shift_list=None)``
    -> ``(dq_list, dk, dv)``

Shapes (G groups, B sequences, Hq query heads, Hk KV heads, D head dim):
  q_list[g], out_list[g], dout_list[g], dq_list[g]: [total_q_g, Hq, D]
  k, v, dk, dv: [total_k, Hk, D]
  cu_seqlens_q_list[g], cu_seqlens_k: [B + 1] int32
  seqused_k_list: empty, or G entries each None or [B] int32
  lse_list[g]: [Hq, total_q_g] float32 (natural log)
  sinks: None or float32 [Hq]
  diagonal_shift_list: None, or G entries each None or [B] int32

The mask, score and sink arguments (defaults: off), as in ringattn.h:
  ``window_size = (left, right)``: local attention, -1 = unbounded on that side; (-1, -1) is no
  window. Row i of a (group, sequence) with Lq rows and Lk keys has the diagonal key
  d = i + Lk - Lq (+ diagonal_shift_list[g][b]) and sees key j iff d - left <= j <= d + right;
  ``causal`` bounds the right side at d (right must then be -1 or 0).
  ``softcap > 0``: each score s = softmax_scale * q.k becomes softcap * tanh(s / softcap).
  ``sinks``: sink h adds exp(sinks[h]) to the softmax denominator of every row of head h (so to
  its LSE), never to the output; a row without keys gets out = 0 and lse = sinks[h]. The
  backward op reads the forward's LSE, which holds the sinks (it takes them for the float64 CPU
  path, which recomputes the LSE); the sinks' own gradient is computed by the autograd formula.
  ``diagonal_shift_list``: moves each sequence's diagonal (context parallelism); read only when
  the mask has a bound (causal or a window).

``softmax_scale == 0.0`` means the library default 1/sqrt(D); any other value must be a positive
float whose float32 value is finite and normal (ValueError otherwise: a value that the float32
field would round to 0, inf or a subnormal never silently becomes the default or another scale).
``max_seqlen_*`` are hints, ints in [0, 2**31 - 1]. ``deterministic`` only affects the backward;
the forward op takes it so that autograd can hand it on.

The kernels are registered with ``Library.define`` + ``Library.impl`` (not ``custom_op``, whose
Python dispatch costs more per call), for CPU and CUDA with the same Python function, which passes
data pointers, strides, the device index and the current CUDA stream to the C ABI. Outputs and
workspaces come from PyTorch's allocator. Nothing here reads tensor values on the host: no
``.item()``, no device-to-host copies (the metadata value checks are the library's, on request).
Where libringattn_torch loads (``_torch_shim``, torch >= 2.10), the CPU and CUDA kernels are its
C++ ones instead: the same checks, structs and library call without Python; a call they do not
take runs the Python kernel here through the private op ``_grouped_fwd_python`` /
``_grouped_bwd_python``, and the eager path calls them through ``_grouped_fwd_native`` /
``_grouped_bwd_native``.

Autograd (``torch.library.register_autograd``): the backward of ``grouped_fwd`` calls
``grouped_bwd``; a loss that also uses the LSE outputs gets their gradient through one more
backward call (see ``_add_lse_gradient``). Sinks that require grad get
``dsinks[h] = sum_i exp(sinks[h] - lse_i) * (dlse_i - rowsum(dO_i * O_i))`` over every row of
head h in every group, computed in torch (``_sink_gradient``). ``grouped_bwd`` has no double
backward.

Metadata values: on CPU tensors the library always checks them (ValueError at the call). On CUDA
it does so only with ``RING_FLASH_ATTN_CHECK_METADATA=1`` (a host copy and a sync per call);
otherwise every call passes the error word of its device (``_metadata_errors``), into which the
kernels record each kind of malformed ``cu_seqlens`` / ``seqused_k`` without a sync, and
``ring_flash_attn.check_errors()`` reads it when the caller chooses.

Per-call host work: a call whose tensors (type, dtype, device, shape, strides), scalars and
environment settings equal an earlier call's reuses that call's C structs, built through the full
validation, and writes only the data pointers and the stream (``_host_cache``; the library
validates the structs again at every call). The public functions call the kernels without the
dispatcher where nothing else would see the op (``eager_call_ok``), through an
``autograd.Function`` that shares this module's saved context and backward.

Python checks only what the ctypes call needs to be memory-safe (devices, dtypes, ranks, the
shapes that the C structs carry once for all groups, last-dim contiguity, sizes of the
metadata arrays); everything else is validated by the library, whose message is raised as
ValueError (invalid argument) or NotImplementedError (unsupported).
"""

from __future__ import annotations

import ctypes
import re
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _lib, _metadata_errors, _torch_shim
from ._host_cache import EnvSetting, PlanCache, current_raw_stream, eager_dispatch_ok
from ._host_cache import clear_plan_caches as _clear_plan_caches

__all__ = ["grouped_fwd", "grouped_bwd", "dtype_code"]

_NAMESPACE = "ring_flash_attn"

_DTYPE_CODES = {
    torch.float32: _lib.DTYPE_FP32,
    torch.float16: _lib.DTYPE_FP16,
    torch.bfloat16: _lib.DTYPE_BF16,
    torch.float64: _lib.DTYPE_FP64,
}

ENV_CHECK_METADATA = "RING_FLASH_ATTN_CHECK_METADATA"


def dtype_code(dtype: torch.dtype, name: str = "q") -> int:
    """The ``ringattn_dtype`` of a torch dtype; ValueError for an unsupported one."""
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(
            f"{name}: expected dtype float16, bfloat16, float32 or float64, got {dtype}"
        ) from None


# ---- validation (what ctypes needs to be safe) -----------------------------------------------
#
# Written for a small per-call cost: every tensor's shape and strides are read once (a
# Tensor.stride(i) call costs about 0.5 us) and handed on to the struct filling.


def _device_error(name: str, device: torch.device, got: torch.device) -> ValueError:
    return ValueError(f"{name}: expected a tensor on {device} (the device of q_list[0]), got {got}")


def _check_3d(t: Tensor, name: str, device: torch.device, dtype: torch.dtype):
    """A [tokens, heads, head_dim] tensor of `dtype` on `device` with the last dim contiguous.
    Returns (shape, strides)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a Tensor, got {type(t).__name__}")
    shape = t.shape
    if len(shape) != 3:
        raise ValueError(f"{name}: expected a 3-D tensor [tokens, heads, head_dim], got shape {tuple(shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype} (the dtype of q_list[0]), got {t.dtype}")
    if t.device != device:
        raise _device_error(name, device, t.device)
    if shape[0] == 0 or shape[1] == 0:
        # No element is ever addressed; hand the library the strides of a dense layout (an
        # empty tensor may carry any strides, e.g. an expanded empty gradient).
        return shape, (shape[1] * shape[2], shape[2], 1)
    stride = t.stride()
    if stride[2] != 1 and shape[2] > 1:
        raise ValueError(f"{name}: expected the last dim contiguous (stride 1), got strides {tuple(stride)}")
    return shape, stride


def _check_like(t: Tensor, name: str, device, dtype, shape, like_name: str):
    """An output / gradient tensor shaped like `like_name`. Returns its strides."""
    t_shape, stride = _check_3d(t, name, device, dtype)
    if t_shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)} (the shape of {like_name}), got {tuple(t_shape)}")
    return stride


def _check_int32_vector(t: Tensor, name: str, numel, device: torch.device, what: str = "") -> None:
    """A 1-D contiguous int32 tensor on `device` with `numel` entries (any if None)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected an int32 Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    shape = t.shape
    if len(shape) != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(shape)}")
    n = shape[0]
    if numel is not None and n != numel:
        raise ValueError(f"{name}: expected {numel} elements ({what}), got {n}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name}: expected a contiguous tensor, got stride {t.stride(0)}")
    if t.device != device:
        raise _device_error(name, device, t.device)


def _check_lse(t: Tensor, name: str, Hq, total_q, device: torch.device) -> int:
    """A contiguous float32 [Hq, total_q] tensor. Returns its data pointer."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a float32 Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: expected dtype torch.float32, got {t.dtype}")
    shape = t.shape
    if len(shape) != 2 or shape[0] != Hq or shape[1] != total_q:
        raise ValueError(
            f"{name}: expected shape ({Hq}, {total_q}) ([num_heads_q, total_q]), got {tuple(shape)}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")
    if t.device != device:
        raise _device_error(name, device, t.device)
    return t.data_ptr()


def _check_sinks(sinks: Tensor, Hq, device: torch.device) -> int:
    """Sink logits: a float32 [Hq] tensor on the device (one element may have any stride).
    Returns its data pointer."""
    if not isinstance(sinks, Tensor):
        raise ValueError(f"sinks: expected None or a float32 Tensor [num_heads_q], got {type(sinks).__name__}")
    if sinks.dtype != torch.float32:
        raise ValueError(f"sinks: expected dtype torch.float32, got {sinks.dtype}")
    shape = sinks.shape
    if len(shape) != 1 or shape[0] != Hq:
        raise ValueError(f"sinks: expected shape ({Hq},) ([num_heads_q], the heads of q_list[0]), got {tuple(shape)}")
    if Hq > 1 and sinks.stride(0) != 1:
        raise ValueError(f"sinks: expected a contiguous tensor, got stride {sinks.stride(0)}")
    if sinks.device != device:
        raise _device_error("sinks", device, sinks.device)
    return sinks.data_ptr()


def _check_list_len(name: str, lst: Sequence, G: int) -> None:
    if len(lst) != G:
        raise ValueError(f"{name}: expected {G} entries (one per group in q_list), got {len(lst)}")


def _validate_common(
    q_list: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    cu_seqlens_q_list: Sequence[Tensor],
    cu_seqlens_k: Tensor,
    seqused_k_list: Sequence[Optional[Tensor]],
    max_seqlen_q_list: Sequence[int],
):
    """Checks shared by forward and backward (and their fake kernels).

    Returns (G, B, Hq, Hk, D, dtype, device, [(shape, strides) of each q], k strides, v strides).
    Reads no data pointer, so it serves the fake kernels too."""
    G = len(q_list)
    if G == 0:
        raise ValueError("q_list: expected at least one query group, got an empty list")
    q0 = q_list[0]
    if not isinstance(q0, Tensor):
        raise ValueError(f"q_list[0]: expected a Tensor, got {type(q0).__name__}")
    dtype, device = q0.dtype, q0.device
    dtype_code(dtype, "q_list[0]")
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"q_list[0]: expected a CPU or CUDA tensor, got device {device}")
    _check_list_len("cu_seqlens_q_list", cu_seqlens_q_list, G)
    _check_list_len("max_seqlen_q_list", max_seqlen_q_list, G)
    if len(seqused_k_list) not in (0, G):
        raise ValueError(
            f"seqused_k_list: expected None or {G} entries (one per group in q_list), got {len(seqused_k_list)}"
        )

    k_shape, k_stride = _check_3d(k, "k", device, dtype)
    v_shape, v_stride = _check_3d(v, "v", device, dtype)
    if v_shape != k_shape:
        raise ValueError(f"v: expected the shape of k {tuple(k_shape)}, got {tuple(v_shape)}")
    Hk, D = k_shape[1], k_shape[2]

    q_info = []
    Hq = None
    for g in range(G):
        name = f"q_list[{g}]"
        shape, stride = _check_3d(q_list[g], name, device, dtype)
        if g == 0:
            Hq = shape[1]
        elif shape[1] != Hq:
            raise ValueError(f"{name}: expected {Hq} heads (as q_list[0]), got {shape[1]}")
        if shape[2] != D:
            raise ValueError(f"{name}: expected head_dim {D} (the head_dim of k), got {shape[2]}")
        q_info.append((shape, stride))

    _check_int32_vector(cu_seqlens_k, "cu_seqlens_k", None, device)
    B = cu_seqlens_k.shape[0] - 1
    if B < 1:
        raise ValueError(f"cu_seqlens_k: expected at least 2 elements (batch_size + 1), got {B + 1}")
    for g in range(G):
        _check_int32_vector(cu_seqlens_q_list[g], f"cu_seqlens_q_list[{g}]", B + 1, device,
                            "batch_size + 1, as cu_seqlens_k")
    for g, s in enumerate(seqused_k_list):
        if s is not None:
            _check_int32_vector(s, f"seqused_k_list[{g}]", B, device,
                                "batch_size, one less than cu_seqlens_k")
    return G, B, Hq, Hk, D, dtype, device, q_info, k_stride, v_stride


# ---- filling the C structs --------------------------------------------------------------------


ENV_TIER = "RING_FLASH_ATTN_TIER"
_TIERS = {"auto": _lib.TIER_AUTO, "sm80": _lib.TIER_SM80, "sm90": _lib.TIER_SM90}


def _parse_tier(raw: Optional[str]) -> int:
    name = (raw if raw is not None else "auto").strip().lower() or "auto"
    tier = _TIERS.get(name)
    if tier is None:
        raise ValueError(f"${ENV_TIER}: expected one of {sorted(_TIERS)}, got {name!r}")
    return tier


_TIER_SETTING = EnvSetting(ENV_TIER, _parse_tier)
_CHECK_METADATA_SETTING = EnvSetting(ENV_CHECK_METADATA, lambda raw: 1 if raw == "1" else 0)


def _kernel_tier() -> int:
    """The GPU kernel tier from $RING_FLASH_ATTN_TIER: ``auto`` (default: tier 2 on sm90 cards where
    it applies, else tier 1), ``sm80`` (force tier 1, for comparison) or ``sm90`` (force tier 2; a
    call it cannot run fails with the reason). Read at every call, so it can be switched at run time."""
    return _TIER_SETTING.get()


def _exec(device: torch.device) -> Tuple[_lib.Exec, int]:
    """(ringattn_exec, check_metadata) for a call on `device`."""
    ex = _lib.Exec()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        ex.device_type = _lib.DEVICE_CUDA
        ex.device_index = index
        ex.stream = current_raw_stream(index)
        ex.tier = _kernel_tier()
        # Where the kernels report malformed metadata without a sync (ring_flash_attn.check_errors).
        ex.metadata_errors = _metadata_errors.word_pointer(index)
        check_metadata = _CHECK_METADATA_SETTING.get()
    elif device.type == "cpu":
        ex.device_type = _lib.DEVICE_CPU
        # torch's intra-op thread count; the library caps it at the hardware threads.
        ex.num_threads = min(torch.get_num_threads(), _lib.INT32_MAX)
        check_metadata = 1  # free on the host
    else:
        raise ValueError(f"q_list[0]: expected a CPU or CUDA tensor, got device {device}")
    return ex, check_metadata


def _max_seqlen_q(max_seqlen_q_list: Sequence[int], g: int) -> int:
    return _lib.int32_value(max_seqlen_q_list[g], f"max_seqlen_q_list[{g}]",
                            "a hint: the longest query sequence of the group")


def _fill_common(params, checked, k, v, cu_seqlens_k, max_seqlen_k, softmax_scale, causal, window_size, softcap,
                 sinks) -> None:
    """The ringattn_problem, ringattn_exec and ringattn_kv members shared by forward and backward.
    Every value is checked before it is narrowed to its C type."""
    G, B, Hq, Hk, D, dtype, device, _, k_stride, v_stride = checked
    for name, value, what in (("cu_seqlens_k", B + 1, "entries (batch_size + 1)"), ("q_list[0]", Hq, "heads"),
                              ("k", Hk, "heads"), ("k", D, "elements in the head dim")):
        if value > _lib.INT32_MAX:
            raise ValueError(f"{name}: expected at most {_lib.INT32_MAX} {what}, got {value}")
    max_seqlen_k = _lib.int32_value(max_seqlen_k, "max_seqlen_k", "a hint: the longest key sequence")
    default_scale = softmax_scale == 0.0  # the ops' encoding of 1/sqrt(head_dim)
    scale = 0.0 if default_scale else _lib.float32_scale(softmax_scale)
    params.exec, check_metadata = _exec(device)
    p = params.problem
    p.dtype = _DTYPE_CODES[dtype]
    p.batch_size = B
    p.num_heads_q = Hq
    p.num_heads_k = Hk
    p.head_dim = D
    p.num_groups = G
    p.softmax_scale = scale
    p.default_softmax_scale = 1 if default_scale else 0
    p.causal = 1 if causal else 0
    p.total_k = k.shape[0]
    p.max_seqlen_k = max_seqlen_k
    p.cu_seqlens_k = cu_seqlens_k.data_ptr()
    p.check_metadata = check_metadata
    kv = params.kv
    _set_tensor_fields(kv, "k", k, k_stride)
    _set_tensor_fields(kv, "v", v, v_stride)
    # Window, softcap, sinks: a few compares when they are off.
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size: expected a (left, right) pair of ints (-1 for unbounded), "
                         f"got {window_size!r}") from None
    if left != -1 or right != -1:
        p.has_window = 1
        p.window_left = _lib.int32_value(left, "window_size[0]", "the keys left of the diagonal, -1 = unbounded",
                                         minimum=-1)
        p.window_right = _lib.int32_value(right, "window_size[1]", "the keys right of the diagonal, -1 = unbounded",
                                          minimum=-1)
    if softcap != 0.0:
        p.softcap = _lib.float32_scale(softcap, "softcap")  # > 0, and its float32 value finite and normal
    if sinks is not None:
        p.sinks = _check_sinks(sinks, Hq, device)


def _diagonal_shift_pointers(diagonal_shift_list, G: int, B: int, device: torch.device) -> Optional[list]:
    """The data pointers of diagonal_shift_list (None or G entries, each None or int32 [B]), or
    None when there is none."""
    if diagonal_shift_list is None:
        return None
    _check_list_len("diagonal_shift_list", diagonal_shift_list, G)
    pointers = []
    for g, shift in enumerate(diagonal_shift_list):
        if shift is None:
            pointers.append(None)
            continue
        _check_int32_vector(shift, f"diagonal_shift_list[{g}]", B, device, "batch_size, one less than cu_seqlens_k")
        pointers.append(shift.data_ptr())
    return pointers


# A tensor's fields in the C structs: its data pointer and its row and head strides.
_TENSOR_FIELDS = {name: (name, f"{name}_row_stride", f"{name}_head_stride")
                  for name in ("q", "out", "dout", "dq", "k", "v", "dk", "dv")}


def _set_tensor_fields(struct, name: str, t: Tensor, stride) -> None:
    """Writes tensor `t` (strides `stride`, from the checks) into the struct's fields `name`,
    `name`_row_stride and `name`_head_stride."""
    pointer, row, head = _TENSOR_FIELDS[name]
    setattr(struct, pointer, t.data_ptr())
    setattr(struct, row, stride[0])
    setattr(struct, head, stride[1])


def _new_structs(params_type, group_type, checked, k, v, cu_seqlens_k, max_seqlen_k, softmax_scale, causal,
                 window_size, softcap, sinks, diagonal_shift_list):
    """The structs of a forward or backward call: (lib, params with the fields shared by both
    passes filled (_fill_common), an array of G groups, the diagonal shifts' pointers or None)."""
    G, B, device = checked[0], checked[1], checked[6]
    shifts = _diagonal_shift_pointers(diagonal_shift_list, G, B, device)
    lib = _lib.get()
    params = params_type()
    _fill_common(params, checked, k, v, cu_seqlens_k, max_seqlen_k, softmax_scale, causal, window_size, softcap,
                 sinks)
    return lib, params, (group_type * G)(), shifts


def _fill_group(gr, g: int, checked, q_list, out, out_stride, lse_pointer: int, cu_seqlens_q_list, seqused_k_list,
                max_seqlen_q_list, shifts) -> None:
    """The fields of group g shared by ringattn_fwd_group and ringattn_bwd_group, from the
    checked tensors (out's strides and the LSE's pointer from their checks)."""
    q_shape, q_stride = checked[7][g]
    _set_tensor_fields(gr, "q", q_list[g], q_stride)
    _set_tensor_fields(gr, "out", out, out_stride)
    gr.softmax_lse = lse_pointer
    gr.cu_seqlens_q = cu_seqlens_q_list[g].data_ptr()
    seqused = seqused_k_list[g] if len(seqused_k_list) == checked[0] else None
    gr.seqused_k = seqused.data_ptr() if seqused is not None else None
    gr.total_q = q_shape[0]
    gr.max_seqlen_q = _max_seqlen_q(max_seqlen_q_list, g)
    if shifts is not None:
        gr.diagonal_shift = shifts[g]


def _finish_plan(lib, params, groups, checked, backward: bool) -> "_Plan":
    """The plan of the filled structs, with its workspace size queried."""
    params.groups = groups
    if backward:
        plan = _Plan(params, groups, checked[0], checked[6], lib.ringattn_grouped_bwd, "backward")
        _query_workspace(plan, lib.ringattn_bwd_workspace_size)
    else:
        plan = _Plan(params, groups, checked[0], checked[6], lib.ringattn_grouped_fwd, "forward")
        _query_workspace(plan, lib.ringattn_fwd_workspace_size)
    return plan


# The library names the fields of its C structs ("q (group 1)", "cu_seqlens_q[2] (group 0)",
# "k.row_stride"); the ops' errors name the ops' arguments ("q_list[1]", "cu_seqlens_q_list[0][2]",
# "k.stride(0)").
_C_GROUP_FIELDS = {
    "q": "q_list", "out": "out_list", "dout": "dout_list", "dq": "dq_list", "softmax_lse": "lse_list",
    "cu_seqlens_q": "cu_seqlens_q_list", "seqused_k": "seqused_k_list", "max_seqlen_q": "max_seqlen_q_list",
    "diagonal_shift": "diagonal_shift_list",
}
_C_GROUP_FIELD = re.compile(
    r"\b(total_q|" + "|".join(_C_GROUP_FIELDS) + r")(\.row_stride|\.head_stride)?((?:\[\d+\])?) \(group (\d+)\)")
_C_STRIDE = re.compile(r"\b(k|v|dk|dv)\.(row|head)_stride\b")
_STRIDE_DIM = {".row_stride": ".stride(0)", ".head_stride": ".stride(1)", None: ""}
_C_WINDOW = re.compile(r"\bwindow_left/window_right\b|\bwindow_(left|right)\b")


def _op_names(message: str) -> str:
    """A library message with the C field names replaced by the ops' argument names."""
    def group_field(m: "re.Match") -> str:
        field, stride, index, g = m.group(1), m.group(2), m.group(3), m.group(4)
        if field == "total_q":
            return f"q_list[{g}].shape[0]"
        return f"{_C_GROUP_FIELDS[field]}[{g}]{index}{_STRIDE_DIM[stride]}"

    message = _C_GROUP_FIELD.sub(group_field, message)
    message = _C_WINDOW.sub(
        lambda m: "window_size" if m.group(1) is None else f"window_size[{0 if m.group(1) == 'left' else 1}]", message)
    return _C_STRIDE.sub(lambda m: f"{m.group(1)}.stride({0 if m.group(2) == 'row' else 1})", message)


def _check_call(status: int, pass_name: str) -> None:
    """Raise for a failed library call, naming the ops' arguments (see _lib.check)."""
    _lib.check(status, f"ring_flash_attn {pass_name}", _op_names)



# ---- call plans: the structs of a call, kept per key (see _host_cache) ---------------------------


_ALLOCATE = object()  # the ops' outputs: allocated by _run_fwd / _run_bwd


class _Plan:
    """The C structs of one call key, built through the full validation on the key's first call.
    A later call with the same key writes its data pointers (and CUDA stream) and runs."""

    __slots__ = ("params", "ref", "problem", "exec", "kv", "group_array", "groups", "workspace_size", "device",
                 "cuda_index", "run", "pass_name", "out_alloc", "extra_alloc")

    def __init__(self, params, group_array, G: int, device: torch.device, run, pass_name: str) -> None:
        self.params = params
        self.ref = ctypes.byref(params)
        self.problem = params.problem
        self.exec = params.exec
        self.kv = params.kv  # a view into params: writing its fields writes the call's struct
        self.group_array = group_array
        self.groups = [group_array[g] for g in range(G)]
        self.workspace_size = 0
        self.device = device
        self.cuda_index = device.index if device.type == "cuda" else None
        self.run = run
        self.pass_name = pass_name
        self.out_alloc = None  # per group, _contiguous_layout of out (forward) or dq (backward)
        self.extra_alloc = None  # forward: the LSEs' layouts; backward: dk's and dv's


def _query_workspace(plan: _Plan, size_fn) -> None:
    size = ctypes.c_size_t(0)
    _check_call(size_fn(plan.ref, ctypes.byref(size)), plan.pass_name)
    plan.workspace_size = size.value
    plan.params.workspace_size = size.value


def _workspace(plan: _Plan) -> Optional[Tensor]:
    """A new workspace for one call of `plan` (None when it needs none). Allocated before any
    pointer of the call is written, so that nothing the allocation may run (a finalizer) can
    use the plan between the writes and the call."""
    if plan.workspace_size:
        return torch.empty_strided((plan.workspace_size,), (1,), dtype=torch.uint8, device=plan.device)
    return None


def _launch(plan: _Plan, workspace: Optional[Tensor]) -> None:
    """Run the call with `workspace` (from _workspace)."""
    if workspace is not None:
        plan.params.workspace = workspace.data_ptr()
    _check_call(plan.run(plan.ref), plan.pass_name)
    # The workspace lives until the call has been issued; on CUDA the caching allocator hands
    # freed memory only to later work on the same stream, which runs after this kernel.


def _write_call_pointers(plan: _Plan, k, v, cu_seqlens_k, sinks) -> None:
    """The per-call fields shared by forward and backward: K/V and metadata pointers, stream."""
    kv = plan.kv
    kv.k = k.data_ptr()
    kv.v = v.data_ptr()
    problem = plan.problem
    problem.cu_seqlens_k = cu_seqlens_k.data_ptr()
    if sinks is not None:
        problem.sinks = sinks.data_ptr()
    index = plan.cuda_index
    if index is not None:
        ex = plan.exec
        ex.stream = current_raw_stream(index)
        ex.metadata_errors = _metadata_errors.word_pointer(index)


def _write_group_pointers(gr, g: int, q_list, out_list, lse_list, cu_seqlens_q_list, seqused,
                          diagonal_shift_list) -> None:
    """The per-call pointers of group g shared by forward and backward (ringattn_fwd_group /
    ringattn_bwd_group): q, out, LSE, cu_seqlens_q, and seqused_k / diagonal_shift where given
    (the plan's key fixes which of those two are present)."""
    gr.q = q_list[g].data_ptr()
    gr.out = out_list[g].data_ptr()
    gr.softmax_lse = lse_list[g].data_ptr()
    gr.cu_seqlens_q = cu_seqlens_q_list[g].data_ptr()
    if seqused is not None and seqused[g] is not None:
        gr.seqused_k = seqused[g].data_ptr()
    if diagonal_shift_list is not None and diagonal_shift_list[g] is not None:
        gr.diagonal_shift = diagonal_shift_list[g].data_ptr()


def _contiguous_layout(shape, dtype: torch.dtype) -> tuple:
    """(shape, strides, dtype) of a contiguous tensor: the recipe of an output allocated with
    torch.empty_strided at each call (a torch.Size argument or keyword parsing would cost more)."""
    shape = tuple(int(n) for n in shape)
    return shape, torch.empty(shape, device="meta").stride(), dtype


# Every tensor argument enters a key as (type, dtype, device, shape, strides): what the Python
# checks read. The scalars enter as values, after their exact type is checked (True == 1 and
# hash(True) == hash(1): a bool must not hit the plan of an int).


def _fwd_key(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
             softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list, out_list, lse_list):
    """The plan key of a forward call, or None when the call is not cached (it then takes the
    full validation, which raises the precise error for a bad argument)."""
    try:
        if type(max_seqlen_k) is not int or type(softmax_scale) is not float or type(softcap) is not float:
            return None
        hints = tuple(max_seqlen_q_list)
        for m in hints:
            if type(m) is not int:
                return None
        left, right = window_size
        if type(left) is not int or type(right) is not int:
            return None
        if q_list[0].is_cuda:
            exec_key = (_TIER_SETTING.get(), _CHECK_METADATA_SETTING.get())
        else:
            exec_key = torch.get_num_threads()
        return (
            exec_key,
            tuple([(type(t), t.dtype, t.device, t.shape, t.stride()) for t in q_list]),
            (type(k), k.dtype, k.device, k.shape, k.stride()),
            (type(v), v.dtype, v.device, v.shape, v.stride()),
            (type(cu_seqlens_k), cu_seqlens_k.dtype, cu_seqlens_k.device, cu_seqlens_k.shape, cu_seqlens_k.stride()),
            tuple([(type(t), t.dtype, t.device, t.shape, t.stride()) for t in cu_seqlens_q_list]),
            tuple([None if t is None else (type(t), t.dtype, t.device, t.shape, t.stride()) for t in seqused_k_list]),
            hints, max_seqlen_k, softmax_scale, True if causal else False, left, right, softcap,
            None if sinks is None else (type(sinks), sinks.dtype, sinks.device, sinks.shape, sinks.stride()),
            None if diagonal_shift_list is None else tuple(
                [None if t is None else (type(t), t.dtype, t.device, t.shape, t.stride()) for t in diagonal_shift_list]),
            None if out_list is _ALLOCATE else tuple([(type(t), t.dtype, t.device, t.shape, t.stride()) for t in out_list]),
            None if lse_list is _ALLOCATE else tuple([(type(t), t.dtype, t.device, t.shape, t.stride()) for t in lse_list]),
        )
    except Exception:  # not a tensor, no strides (sparse), a malformed list: the full path says what
        return None


def _bwd_key(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
             max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic, window_size, softcap, sinks,
             diagonal_shift_list, dq_list, dk, dv):
    """The plan key of a backward call (see _fwd_key); dq_list, dk, dv _ALLOCATE when the op
    allocates them."""
    try:
        fwd = _fwd_key(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
                       max_seqlen_k, softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list,
                       out_list, lse_list)
        if fwd is None:
            return None
        return (
            fwd,
            True if deterministic else False,
            tuple([(type(t), t.dtype, t.device, t.shape, t.stride()) for t in dout_list]),
            None if dq_list is _ALLOCATE else tuple([(type(t), t.dtype, t.device, t.shape, t.stride()) for t in dq_list]),
            None if dk is _ALLOCATE else (type(dk), dk.dtype, dk.device, dk.shape, dk.stride()),
            None if dv is _ALLOCATE else (type(dv), dv.dtype, dv.device, dv.shape, dv.stride()),
        )
    except Exception:
        return None


_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()


def clear_plan_caches() -> None:
    """Forget the cached call plans of every thread (see _host_cache.clear_plan_caches)."""
    _clear_plan_caches()


def _build_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
               softmax_scale, causal, out_list, lse_list, window_size, softcap, sinks, diagonal_shift_list) -> _Plan:
    """Validate a forward call and fill its structs (pointers included); query its workspace."""
    checked = _validate_common(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                               max_seqlen_q_list)
    G, Hq, dtype, device, q_info = checked[0], checked[2], checked[5], checked[6], checked[7]
    _check_list_len("out_list", out_list, G)
    _check_list_len("lse_list", lse_list, G)
    lib, params, groups, shifts = _new_structs(_lib.FwdParams, _lib.FwdGroup, checked, k, v, cu_seqlens_k,
                                               max_seqlen_k, softmax_scale, causal, window_size, softcap, sinks,
                                               diagonal_shift_list)
    for g in range(G):
        q_shape = q_info[g][0]
        out = out_list[g]
        out_stride = _check_like(out, f"out_list[{g}]", device, dtype, q_shape, f"q_list[{g}]")
        lse_pointer = _check_lse(lse_list[g], f"lse_list[{g}]", Hq, q_shape[0], device)
        _fill_group(groups[g], g, checked, q_list, out, out_stride, lse_pointer, cu_seqlens_q_list, seqused_k_list,
                    max_seqlen_q_list, shifts)
    return _finish_plan(lib, params, groups, checked, backward=False)


def _run_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
             softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list,
             out_list=_ALLOCATE, lse_list=_ALLOCATE) -> Tuple[List[Tensor], List[Tensor]]:
    """The forward into out_list / lse_list, or into new ones when they are _ALLOCATE (the op's
    outputs: contiguous). Returns (out_list, lse_list)."""
    key = _fwd_key(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
                   softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list, out_list, lse_list)
    plan = _FWD_PLANS.get(key) if key is not None else None
    if plan is None:
        allocate = out_list is _ALLOCATE
        if allocate:
            if not q_list or not isinstance(q_list[0], Tensor) or q_list[0].dim() != 3:
                _validate_common(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                                 max_seqlen_q_list)  # raises the precise error
            out_list, lse_list = _alloc_fwd_outputs(q_list, q_list[0].shape[1])
        plan = _build_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
                          max_seqlen_k, softmax_scale, causal, out_list, lse_list, window_size, softcap, sinks,
                          diagonal_shift_list)
        _launch(plan, _workspace(plan))
        if key is not None:
            if allocate:
                plan.out_alloc = [_contiguous_layout(q.shape, q.dtype) for q in q_list]
                plan.extra_alloc = [_contiguous_layout(lse.shape, torch.float32) for lse in lse_list]
            _FWD_PLANS.put(key, plan)
        return out_list, lse_list

    if out_list is _ALLOCATE:
        device = plan.device
        out_list = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                    for shape, stride, dtype in plan.out_alloc]
        lse_list = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                    for shape, stride, dtype in plan.extra_alloc]
    workspace = _workspace(plan)
    _write_call_pointers(plan, k, v, cu_seqlens_k, sinks)
    seqused = seqused_k_list if seqused_k_list else None
    for g, gr in enumerate(plan.groups):
        _write_group_pointers(gr, g, q_list, out_list, lse_list, cu_seqlens_q_list, seqused, diagonal_shift_list)
    _launch(plan, workspace)
    return out_list, lse_list


def fwd_into(
    q_list: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    cu_seqlens_q_list: Sequence[Tensor],
    cu_seqlens_k: Tensor,
    seqused_k_list: Sequence[Optional[Tensor]],
    max_seqlen_q_list: Sequence[int],
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    out_list: Sequence[Tensor],
    lse_list: Sequence[Tensor],
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
    diagonal_shift_list: Optional[Sequence[Optional[Tensor]]] = None,
) -> None:
    """Run the grouped forward into caller-provided outputs (the ops' kernel; tests use it to
    check that a rejected call leaves pre-filled outputs untouched). window_size, softcap,
    sinks (float32 [Hq]) and diagonal_shift_list (G entries, each None or int32 [B]) as in the
    module docstring. A call whose tensors match an earlier call's in type, dtype, device, shape
    and strides (and whose other arguments are equal) reuses that call's validated structs."""
    _run_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
             softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list, out_list, lse_list)


def _build_bwd(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
               max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic, dq_list, dk, dv, window_size,
               softcap, sinks, diagonal_shift_list) -> _Plan:
    """Validate a backward call and fill its structs (pointers included); query its workspace."""
    checked = _validate_common(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                               max_seqlen_q_list)
    G, Hq, dtype, device, q_info = checked[0], checked[2], checked[5], checked[6], checked[7]
    for name, lst in (("dout_list", dout_list), ("out_list", out_list), ("lse_list", lse_list),
                      ("dq_list", dq_list)):
        _check_list_len(name, lst, G)
    dk_stride = _check_like(dk, "dk", device, dtype, k.shape, "k")
    dv_stride = _check_like(dv, "dv", device, dtype, v.shape, "v")
    lib, params, groups, shifts = _new_structs(_lib.BwdParams, _lib.BwdGroup, checked, k, v, cu_seqlens_k,
                                               max_seqlen_k, softmax_scale, causal, window_size, softcap, sinks,
                                               diagonal_shift_list)
    _set_tensor_fields(params, "dk", dk, dk_stride)
    _set_tensor_fields(params, "dv", dv, dv_stride)
    params.deterministic = 1 if deterministic else 0
    for g in range(G):
        q_shape = q_info[g][0]
        out, dout, dq = out_list[g], dout_list[g], dq_list[g]
        like = f"q_list[{g}]"
        out_stride = _check_like(out, f"out_list[{g}]", device, dtype, q_shape, like)
        dout_stride = _check_like(dout, f"dout_list[{g}]", device, dtype, q_shape, like)
        dq_stride = _check_like(dq, f"dq_list[{g}]", device, dtype, q_shape, like)
        lse_pointer = _check_lse(lse_list[g], f"lse_list[{g}]", Hq, q_shape[0], device)
        gr = groups[g]
        _fill_group(gr, g, checked, q_list, out, out_stride, lse_pointer, cu_seqlens_q_list, seqused_k_list,
                    max_seqlen_q_list, shifts)
        _set_tensor_fields(gr, "dout", dout, dout_stride)
        _set_tensor_fields(gr, "dq", dq, dq_stride)
    return _finish_plan(lib, params, groups, checked, backward=True)


def _run_bwd(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
             max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic, window_size, softcap, sinks,
             diagonal_shift_list, dq_list=_ALLOCATE, dk=_ALLOCATE, dv=_ALLOCATE) -> Tuple[List[Tensor], Tensor, Tensor]:
    """The backward into dq_list / dk / dv, or into new ones (contiguous) when they are _ALLOCATE.
    Returns (dq_list, dk, dv)."""
    key = _bwd_key(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                   max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic, window_size, softcap, sinks,
                   diagonal_shift_list, dq_list, dk, dv)
    plan = _BWD_PLANS.get(key) if key is not None else None
    if plan is None:
        allocate = dq_list is _ALLOCATE
        if allocate:
            dq_list = [torch.empty(q.shape, dtype=q.dtype, device=q.device) for q in q_list]
            dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
            dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        plan = _build_bwd(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list, cu_seqlens_k,
                          seqused_k_list, max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic,
                          dq_list, dk, dv, window_size, softcap, sinks, diagonal_shift_list)
        _launch(plan, _workspace(plan))
        if key is not None:
            if allocate:
                plan.out_alloc = [_contiguous_layout(q.shape, q.dtype) for q in q_list]
                plan.extra_alloc = (_contiguous_layout(k.shape, k.dtype), _contiguous_layout(v.shape, v.dtype))
            _BWD_PLANS.put(key, plan)
        return dq_list, dk, dv

    if dq_list is _ALLOCATE:
        device = plan.device
        dq_list = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                   for shape, stride, dtype in plan.out_alloc]
        (k_shape, k_stride, k_dtype), (v_shape, v_stride, v_dtype) = plan.extra_alloc
        dk = torch.empty_strided(k_shape, k_stride, dtype=k_dtype, device=device)
        dv = torch.empty_strided(v_shape, v_stride, dtype=v_dtype, device=device)
    workspace = _workspace(plan)
    _write_call_pointers(plan, k, v, cu_seqlens_k, sinks)
    params = plan.params
    params.dk = dk.data_ptr()
    params.dv = dv.data_ptr()
    seqused = seqused_k_list if seqused_k_list else None
    for g, gr in enumerate(plan.groups):
        _write_group_pointers(gr, g, q_list, out_list, lse_list, cu_seqlens_q_list, seqused, diagonal_shift_list)
        gr.dout = dout_list[g].data_ptr()
        gr.dq = dq_list[g].data_ptr()
    _launch(plan, workspace)
    return dq_list, dk, dv


def bwd_into(
    dout_list: Sequence[Tensor],
    q_list: Sequence[Tensor],
    k: Tensor,
    v: Tensor,
    out_list: Sequence[Tensor],
    lse_list: Sequence[Tensor],
    cu_seqlens_q_list: Sequence[Tensor],
    cu_seqlens_k: Tensor,
    seqused_k_list: Sequence[Optional[Tensor]],
    max_seqlen_q_list: Sequence[int],
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    deterministic: bool,
    dq_list: Sequence[Tensor],
    dk: Tensor,
    dv: Tensor,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
    diagonal_shift_list: Optional[Sequence[Optional[Tensor]]] = None,
) -> None:
    """Run the grouped backward into caller-provided gradients (dk, dv are overwritten with the
    sum over groups, not accumulated into). The mask, softcap, sinks and shifts must be the
    forward's (lse_list holds the sinks already; the sinks' gradient is not computed here).
    Cached per call key like fwd_into."""
    _run_bwd(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
             max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic, window_size, softcap, sinks,
             diagonal_shift_list, dq_list, dk, dv)


# ---- op definitions ----------------------------------------------------------------------------

# The mask, score and sink arguments come last with their defaults (positional in the schema, so
# that autograd can give sinks a gradient; callers pass them by keyword).
_FEATURE_ARGS = ("int[2] window_size=[-1, -1], float softcap=0.0, Tensor? sinks=None, "
                 "Tensor?[]? diagonal_shift_list=None")
_FWD_SCHEMA = (
    "grouped_fwd(Tensor[] q_list, Tensor k, Tensor v, Tensor[] cu_seqlens_q_list, "
    "Tensor cu_seqlens_k, Tensor?[] seqused_k_list, SymInt[] max_seqlen_q_list, "
    "SymInt max_seqlen_k, float softmax_scale, bool causal, bool deterministic, "
    f"{_FEATURE_ARGS}) -> (Tensor[], Tensor[])"
)
_BWD_SCHEMA = (
    "grouped_bwd(Tensor[] dout_list, Tensor[] q_list, Tensor k, Tensor v, Tensor[] out_list, "
    "Tensor[] lse_list, Tensor[] cu_seqlens_q_list, Tensor cu_seqlens_k, Tensor?[] seqused_k_list, "
    "SymInt[] max_seqlen_q_list, SymInt max_seqlen_k, float softmax_scale, bool causal, "
    f"bool deterministic, {_FEATURE_ARGS}) -> (Tensor[], Tensor, Tensor)"
)

_library = torch.library.Library(_NAMESPACE, "DEF")
_library.define(_FWD_SCHEMA)
_library.define(_BWD_SCHEMA)


def _alloc_fwd_outputs(q_list: Sequence[Tensor], Hq) -> Tuple[List[Tensor], List[Tensor]]:
    outs = [torch.empty(q.shape, dtype=q.dtype, device=q.device) for q in q_list]
    lses = [torch.empty((Hq, q.shape[0]), dtype=torch.float32, device=q.device) for q in q_list]
    return outs, lses


def _grouped_fwd_kernel(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                        max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic,
                        window_size=(-1, -1), softcap=0.0, sinks=None, diagonal_shift_list=None):
    return _run_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
                    max_seqlen_k, softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list)


def _grouped_bwd_kernel(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list,
                        cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
                        softmax_scale, causal, deterministic, window_size=(-1, -1), softcap=0.0,
                        sinks=None, diagonal_shift_list=None):
    return _run_bwd(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list, cu_seqlens_k,
                    seqused_k_list, max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic,
                    window_size, softcap, sinks, diagonal_shift_list)


# The CPU and CUDA kernels: libringattn_torch's C++ ones for the ops it covers when it can be
# loaded (_torch_shim; one binary for every torch >= 2.10), else the Python ones above, which call
# libringattn through ctypes. ring_flash_attn.ops_implementation() says which.
_KERNELS = {"grouped_fwd": _grouped_fwd_kernel, "grouped_bwd": _grouped_bwd_kernel}
_SHIM_LOADED = _torch_shim.load(_library, {"grouped_fwd": _FWD_SCHEMA, "grouped_bwd": _BWD_SCHEMA}, _KERNELS)
for _name, _kernel in _KERNELS.items():
    if not (_SHIM_LOADED and _name in _torch_shim.SHIM_OPS):
        for _key in ("CPU", "CUDA"):
            _library.impl(_name, _kernel, _key)

# The kernels of the eager path (grouped_fwd_eager, _GroupedAttention, _call_bwd with eager=True):
# with libringattn_torch, its C++ kernels through ops without an autograd wrapper (a call that
# raises runs again on the Python path, which raises its exact exception); else the Python ones.
if _SHIM_LOADED:
    _eager_fwd, _eager_bwd = _torch_shim.eager_calls(lambda *a: _run_fwd(*a), lambda *a: _run_bwd(*a))
else:
    _eager_fwd, _eager_bwd = _run_fwd, _run_bwd


def _validate_features_fake(checked, sinks, diagonal_shift_list) -> None:
    """The shape checks of sinks and diagonal_shift_list that need no data pointer (the fake
    kernels' share of _fill_common and _diagonal_shift_pointers)."""
    G, B, Hq, device = checked[0], checked[1], checked[2], checked[6]
    if sinks is not None:
        if not isinstance(sinks, Tensor) or sinks.dtype != torch.float32 or tuple(sinks.shape) != (Hq,):
            raise ValueError(f"sinks: expected None or a float32 Tensor of shape ({Hq},) ([num_heads_q]), got "
                             f"{getattr(sinks, 'dtype', type(sinks).__name__)} {tuple(getattr(sinks, 'shape', ()))}")
        if sinks.device != device:
            raise _device_error("sinks", device, sinks.device)
    if diagonal_shift_list is not None:
        _check_list_len("diagonal_shift_list", diagonal_shift_list, G)
        for g, shift in enumerate(diagonal_shift_list):
            if shift is not None:
                _check_int32_vector(shift, f"diagonal_shift_list[{g}]", B, device,
                                    "batch_size, one less than cu_seqlens_k")


@torch.library.register_fake(f"{_NAMESPACE}::grouped_fwd")
def _grouped_fwd_fake(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                      max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic,
                      window_size=(-1, -1), softcap=0.0, sinks=None, diagonal_shift_list=None):
    checked = _validate_common(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                               max_seqlen_q_list)
    _validate_features_fake(checked, sinks, diagonal_shift_list)
    return _alloc_fwd_outputs(q_list, q_list[0].shape[1])


@torch.library.register_fake(f"{_NAMESPACE}::grouped_bwd")
def _grouped_bwd_fake(dout_list, q_list, k, v, out_list, lse_list, cu_seqlens_q_list,
                      cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
                      softmax_scale, causal, deterministic, window_size=(-1, -1), softcap=0.0,
                      sinks=None, diagonal_shift_list=None):
    checked = _validate_common(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                               max_seqlen_q_list)
    _validate_features_fake(checked, sinks, diagonal_shift_list)
    dqs = [torch.empty(q.shape, dtype=q.dtype, device=q.device) for q in q_list]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    return dqs, dk, dv


# ---- autograd ---------------------------------------------------------------------------------


def _list_grad_structure(values: Optional[Sequence]) -> Optional[list]:
    """The None-gradient for a list input, shaped the way torch.library's tensor-list autograd
    expects: a list of Nones when every entry is a Tensor (including []), else a single None
    (also for an optional list that is None)."""
    if values is not None and all(isinstance(x, Tensor) for x in values):
        return [None] * len(values)
    return None


def _feature_kwargs(window_size, softcap, sinks, diagonal_shift_list) -> Optional[dict]:
    """The mask, score and sink arguments to hand on to the ops, or None when all are off (the
    plain call then stays a plain call)."""
    left, right = window_size
    if left == -1 and right == -1 and softcap == 0.0 and sinks is None and diagonal_shift_list is None:
        return None
    return {"window_size": [left, right], "softcap": softcap, "sinks": sinks,
            "diagonal_shift_list": diagonal_shift_list}


def _save_attention_context(ctx, q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
                            max_seqlen_k, softmax_scale, causal, deterministic, window_size, softcap, sinks,
                            diagonal_shift_list, out_list, lse_list) -> None:
    """What _attention_grads reads: the tensors through save_for_backward, the rest on ctx."""
    # Outputs the loss does not use arrive as None (not zeros), so the backward can skip work:
    # an unused group gets a zero dout, and the LSE term runs only if some LSE is used.
    ctx.set_materialize_grads(False)
    seqused_present = [s is not None for s in seqused_k_list]
    saved = [*q_list, k, v, *out_list, *lse_list, *cu_seqlens_q_list, cu_seqlens_k]
    if any(seqused_present):
        saved += [s for s in seqused_k_list if s is not None]
    if sinks is not None:
        saved.append(sinks)
    shifts_present = None
    if diagonal_shift_list is not None:
        shifts_present = [s is not None for s in diagonal_shift_list]
        saved += [s for s in diagonal_shift_list if s is not None]
    ctx.save_for_backward(*saved)
    ctx.num_groups = len(q_list)
    ctx.seqused_present = seqused_present
    # The scalar arguments the backward call takes after the metadata tensors.
    ctx.scalars = (list(max_seqlen_q_list), max_seqlen_k, softmax_scale, causal, deterministic)
    ctx.window_size, ctx.softcap = window_size, softcap
    ctx.has_sinks = sinks is not None
    ctx.shifts_present = shifts_present


def _fwd_setup_context(ctx, inputs, output) -> None:
    """setup_context of the grouped_fwd op's registered autograd."""
    (q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
     max_seqlen_k, softmax_scale, causal, deterministic, window_size, softcap, sinks,
     diagonal_shift_list) = inputs
    out_list, lse_list = output
    _save_attention_context(ctx, q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
                            max_seqlen_k, softmax_scale, causal, deterministic, window_size, softcap, sinks,
                            diagonal_shift_list, out_list, lse_list)
    ctx.cu_seqlens_q_grad = _list_grad_structure(cu_seqlens_q_list)
    ctx.seqused_k_grad = _list_grad_structure(seqused_k_list)
    ctx.diagonal_shift_grad = _list_grad_structure(diagonal_shift_list)


# Where sinks sits among grouped_fwd's arguments (for ctx.needs_input_grad).
_FWD_SINKS_INDEX = 13


def _call_bwd(eager: bool, dout_list, q_list, k, v, out_list, lse_list, meta, features):
    """One backward call: through torch.ops (recorded by tracers and modes, and by autograd, whose
    node refuses a double backward), or straight to the kernel when `eager` (see
    _host_cache.eager_dispatch_ok)."""
    if eager:
        f = features or {}
        return _eager_bwd(dout_list, q_list, k, v, out_list, lse_list, *meta, f.get("window_size", (-1, -1)),
                          f.get("softcap", 0.0), f.get("sinks"), f.get("diagonal_shift_list"))
    if features is None:
        return torch.ops.ring_flash_attn.grouped_bwd(dout_list, q_list, k, v, out_list, lse_list, *meta)
    return torch.ops.ring_flash_attn.grouped_bwd(dout_list, q_list, k, v, out_list, lse_list, *meta, **features)


def _attention_grads(ctx, grad_out_list, grad_lse_list, sinks_need_grad: bool, eager: bool):
    """(dq_list, dk, dv, dsinks) of grouped_fwd from what _fwd_setup_context saved, for the
    gradients of the outputs (None for an output the loss does not use, or None for the whole
    list). dsinks is None unless sinks_need_grad."""
    G = ctx.num_groups
    saved = list(ctx.saved_tensors)
    q_list, saved = saved[:G], saved[G:]
    k, v, saved = saved[0], saved[1], saved[2:]
    out_list, saved = saved[:G], saved[G:]
    lse_list, saved = saved[:G], saved[G:]
    cu_seqlens_q_list, saved = saved[:G], saved[G:]
    cu_seqlens_k, saved = saved[0], saved[1:]
    seqused_k_list = []
    for present in ctx.seqused_present:
        if present:
            seqused_k_list.append(saved.pop(0))
        else:
            seqused_k_list.append(None)
    sinks = saved.pop(0) if ctx.has_sinks else None
    diagonal_shift_list = None
    if ctx.shifts_present is not None:
        diagonal_shift_list = [saved.pop(0) if present else None for present in ctx.shifts_present]
    features = _feature_kwargs(ctx.window_size, ctx.softcap, sinks, diagonal_shift_list)

    dout_list = []
    for g in range(G):
        d = grad_out_list[g] if grad_out_list is not None else None
        # Incoming gradients may have any strides (the gradient of a .sum() is expanded, all
        # strides 0); the kernel wants a contiguous head dim and non-overlapping rows and heads.
        dout_list.append(torch.zeros_like(out_list[g]) if d is None else d.contiguous())

    meta = (cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, *ctx.scalars)
    dq_list, dk, dv = _call_bwd(eager, dout_list, q_list, k, v, out_list, lse_list, meta, features)
    dq_list = list(dq_list)

    lse_used = grad_lse_list is not None and any(d is not None for d in grad_lse_list)
    if lse_used:
        dq_list, dk = _add_lse_gradient(grad_lse_list, q_list, k, v, out_list, lse_list, meta,
                                        dq_list, dk, features, eager)
    dsinks = None
    if sinks is not None and sinks_need_grad:
        dsinks = _sink_gradient(sinks, out_list, dout_list if grad_out_list is not None else None, lse_list,
                                grad_lse_list if lse_used else None)
    return dq_list, dk, dv, dsinks


def _fwd_backward(ctx, grad_out_list, grad_lse_list):
    """The backward registered for the grouped_fwd op (torch.library.register_autograd)."""
    # The dispatcher drops trailing arguments left at their defaults; autograd wants one gradient
    # per argument it was given (needs_input_grad has one entry per argument).
    given = len(ctx.needs_input_grad)
    sinks_need_grad = given > _FWD_SINKS_INDEX and ctx.needs_input_grad[_FWD_SINKS_INDEX]
    dq_list, dk, dv, dsinks = _attention_grads(ctx, grad_out_list, grad_lse_list, sinks_need_grad, eager=False)
    grads = (dq_list, dk, dv, ctx.cu_seqlens_q_grad, None, ctx.seqused_k_grad, None, None,
             None, None, None, None, None, dsinks, ctx.diagonal_shift_grad)
    return grads[:given]


def _sink_gradient(sinks: Tensor, out_list: Sequence[Tensor], dout_list: Optional[Sequence[Tensor]],
                   lse_list: Sequence[Tensor], grad_lse_list: Optional[Sequence[Optional[Tensor]]]) -> Tensor:
    """The gradient of the sink logits [Hq] (float32), summed over every row of every group.

    With P_sink,i = exp(sinks[h] - lse_i) the sink's share of row i's softmax, d out_i /d sinks[h]
    = -P_sink,i out_i and d lse_i / d sinks[h] = P_sink,i, so
        dsinks[h] = sum_i P_sink,i * (dlse_i - rowsum(dO_i * O_i)).
    Rows with lse = -inf (after the last sequence, or without keys under a -inf sink) have
    P_sink = 0. Shapes: out_list[g], dout_list[g] [total_q_g, Hq, D]; lse_list[g] and
    grad_lse_list[g] [Hq, total_q_g].
    """
    acc = torch.float64 if out_list[0].dtype == torch.float64 else torch.float32
    sink_column = sinks.to(acc).unsqueeze(1)  # [Hq, 1]
    dsinks = torch.zeros(sinks.shape, dtype=acc, device=sinks.device)
    for g, lse in enumerate(lse_list):
        lse = lse.to(acc)
        share = torch.where(torch.isneginf(lse), 0.0, torch.exp(sink_column - lse))  # [Hq, total_q]
        term = None
        if dout_list is not None:
            rowsum = (dout_list[g].to(acc) * out_list[g].to(acc)).sum(-1).t()  # [Hq, total_q]
            term = -rowsum
        if grad_lse_list is not None and grad_lse_list[g] is not None:
            dlse = grad_lse_list[g].to(acc)
            term = dlse if term is None else term + dlse
        if term is not None:
            dsinks = dsinks + (share * term).sum(1)
    return dsinks.to(sinks.dtype)


def _add_lse_gradient(grad_lse_list, q_list, k, v, out_list, lse_list, meta, dq_list, dk, features=None,
                      eager: bool = False):
    """Adds the gradient that flows through LSE, with one more call of the library's backward.

    d lse_i / d S_ij = P_ij for every score S_ij = scale * q_i . k_j (sinks only lower P), so a
    dlse adds dS_ij = dlse_i * P_ij, before the softcap's derivative. The backward kernel forms
    dS_ij = P_ij (dP_ij - D_i) with dP_ij = dO_i . v_j and D_i = rowsum(dO_i * O_i); called with
    V = 0 (dP = 0), dO_i = e_0 and O_i = -dlse_i e_0 (D_i = -dlse_i) it forms exactly that, and
    returns its dQ and dK with the mask, the softcap's derivative and GQA sums applied. Rows
    without keys have P = 0 and get nothing. Costs one more backward call, only when some LSE is
    used by the loss.
    """
    G = len(q_list)
    zero_v = torch.zeros_like(v)
    unit_douts, minus_dlse_outs = [], []
    for g in range(G):
        q, lse, d = q_list[g], lse_list[g], grad_lse_list[g]
        unit = torch.zeros_like(q)
        unit[..., 0] = 1.0
        minus_dlse = torch.zeros_like(q)
        if d is not None:
            # -inf rows have P = 0 whatever their dlse; keep inf * 0 from making NaN.
            d = torch.where(torch.isneginf(lse), 0.0, d)
            minus_dlse[..., 0] = -d.t()
        unit_douts.append(unit)
        minus_dlse_outs.append(minus_dlse)
    dq_extra, dk_extra, _ = _call_bwd(eager, unit_douts, q_list, k, zero_v, minus_dlse_outs, lse_list, meta, features)
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    dq_list = [(dq.to(acc) + extra.to(acc)).to(dq.dtype) for dq, extra in zip(dq_list, dq_extra)]
    dk = (dk.to(acc) + dk_extra.to(acc)).to(dk.dtype)
    return dq_list, dk


def _bwd_setup_context(ctx, inputs, output) -> None:
    pass


def _bwd_backward(ctx, *grads):
    raise NotImplementedError(
        "ring_flash_attn: double backward (gradients of the attention backward) is not supported"
    )


torch.library.register_autograd(
    f"{_NAMESPACE}::grouped_fwd", _fwd_backward, setup_context=_fwd_setup_context
)
torch.library.register_autograd(
    f"{_NAMESPACE}::grouped_bwd", _bwd_backward, setup_context=_bwd_setup_context
)

grouped_fwd = torch.ops.ring_flash_attn.grouped_fwd.default
grouped_bwd = torch.ops.ring_flash_attn.grouped_bwd.default


# ---- eager calls: the ops' kernels and autograd without the dispatcher -------------------------
#
# A call through torch.ops pays the dispatcher's trip into Python and torch.library's autograd
# wrapper (pytree flattening of the arguments and gradients) on every call: most of the host time
# of a small attention call. Where nothing but the kernel would see the op (no compile, tracing,
# mode or transform: _host_cache.eager_dispatch_ok, and plain tensors), the public functions call
# the kernel directly, through the autograd.Function below when a gradient is needed. Its saved
# tensors and backward are the registered autograd's (_fwd_setup_context, _attention_grads).

_PLAIN_TENSOR_TYPES = frozenset((Tensor, torch.nn.Parameter))


def eager_call_ok(q_list: Sequence, k, v, cu_seqlens_q_list: Sequence, cu_seqlens_k, seqused_k_list: Sequence,
                  sinks) -> bool:
    """True when grouped_fwd may run without the dispatcher: every tensor argument is a plain
    torch.Tensor (or nn.Parameter) and eager_dispatch_ok(). Otherwise the caller uses torch.ops."""
    plain = _PLAIN_TENSOR_TYPES
    if type(k) not in plain or type(v) not in plain or type(cu_seqlens_k) not in plain:
        return False
    if sinks is not None and type(sinks) not in plain:
        return False
    for t in q_list:
        if type(t) not in plain:
            return False
    for t in cu_seqlens_q_list:
        if type(t) not in plain:
            return False
    for t in seqused_k_list:
        if t is not None and type(t) not in plain:
            return False
    return eager_dispatch_ok()


class _GroupedAttention(torch.autograd.Function):
    """grouped_fwd with its gradient, for eager calls (see eager_call_ok). apply(args, k, v,
    sinks, *q_list) with args = (cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
    max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic, window_size, softcap,
    diagonal_shift_list); returns (*out_list, *lse_list)."""

    @staticmethod
    def forward(ctx, args, k, v, sinks, *q_list):
        (cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k, softmax_scale, causal,
         deterministic, window_size, softcap, diagonal_shift_list) = args
        q_list = list(q_list)
        out_list, lse_list = _eager_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                                        max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, window_size, softcap,
                                        sinks, diagonal_shift_list)
        _save_attention_context(ctx, q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list,
                                max_seqlen_q_list, max_seqlen_k, softmax_scale, causal, deterministic, window_size,
                                softcap, sinks, diagonal_shift_list, out_list, lse_list)
        return (*out_list, *lse_list)

    @staticmethod
    def backward(ctx, *grads):
        G = ctx.num_groups
        grad_out_list, grad_lse_list = grads[:G], grads[G:]
        if all(d is None for d in grad_out_list):
            grad_out_list = None
        # With create_graph=True (grad mode on here) the backward goes through torch.ops, whose
        # autograd node refuses a double backward instead of silently returning no gradient.
        eager = not torch.is_grad_enabled() and eager_dispatch_ok()
        dq_list, dk, dv, dsinks = _attention_grads(ctx, grad_out_list, grad_lse_list,
                                                   ctx.has_sinks and ctx.needs_input_grad[3], eager)
        return (None, dk, dv, dsinks, *dq_list)


def grouped_fwd_eager(q_list: List[Tensor], k: Tensor, v: Tensor, cu_seqlens_q_list: List[Tensor],
                      cu_seqlens_k: Tensor, seqused_k_list: List[Optional[Tensor]], max_seqlen_q_list: List[int],
                      max_seqlen_k: int, softmax_scale: float, causal: bool, deterministic: bool,
                      window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0, sinks: Optional[Tensor] = None,
                      diagonal_shift_list: Optional[List[Optional[Tensor]]] = None
                      ) -> Tuple[List[Tensor], List[Tensor]]:
    """grouped_fwd (same arguments, outputs, gradients and errors) without the dispatcher; only
    where eager_call_ok(...) holds."""
    need_grad = False
    if torch.is_grad_enabled():
        need_grad = k.requires_grad or v.requires_grad or (sinks is not None and sinks.requires_grad)
        if not need_grad:
            for q in q_list:
                if q.requires_grad:
                    need_grad = True
                    break
    if need_grad:
        outputs = _GroupedAttention.apply(
            (cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k, softmax_scale, causal,
             deterministic, window_size, softcap, diagonal_shift_list), k, v, sinks, *q_list)
        G = len(q_list)
        return list(outputs[:G]), list(outputs[G:])
    return _eager_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
                      softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list)
