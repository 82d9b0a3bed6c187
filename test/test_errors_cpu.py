"""Error paths: every bad input raises ValueError (or NotImplementedError for valid-but-unsupported)
with a message naming the argument, and a rejected call writes nothing."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cases import make_case
from ring_flash_attn import (_lib, flash_attn_varlen_func, grouped_flash_attn_varlen_func, ring_flash_attn_func,
                             stripe_flash_attn_func, zigzag_ring_flash_attn_func)
from ring_flash_attn import ops as rfa_ops


def _case(G=2, Hq=4, Hk=2, D=32, dtype=torch.float32, seqused=None):
    seqlens_k = [10, 7]
    seqlens_q = [[10, 7], [6, 3], [4, 7]][:G] if G <= 3 else [[10, 7]] * G
    return make_case(seqlens_q, seqlens_k, Hq, Hk, D, dtype, seqused_k=seqused, seed=21)


def _call(case, **kw):
    kw.setdefault("seqused_k_list", case.seqused_k_list)
    return grouped_flash_attn_varlen_func(*case.api_args(), **kw)


# ---- rejected in Python (what the ctypes call needs to be safe) ---------------------------------


def test_empty_q_list():
    c = _case()
    c.q_list, c.cu_seqlens_q_list, c.max_seqlen_q_list = [], [], []
    with pytest.raises(ValueError, match=r"q_list: expected at least one"):
        _call(c)


def _int32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


# One bad input each, rejected in Python or by the library: (id, the case's field, its list index
# or None, the field's new value from its old one, the message).
_BAD_INPUTS = [
    ("q_not_3d", "q_list", 1, lambda t: t.flatten(1), r"q_list\[1\]: expected a 3-D tensor"),
    ("k_not_3d", "k", None, lambda t: t[None], r"^k: expected a 3-D tensor"),
    ("mixed_dtypes_q_and_k", "k", None, lambda t: t.half(), r"^k: expected dtype torch.float32 .*got torch.float16"),
    ("mixed_dtypes_between_groups", "q_list", 1, lambda t: t.double(), r"q_list\[1\]: expected dtype torch.float32"),
    ("head_dim_differs_between_q_and_k", "q_list", 1, lambda t: torch.randn(t.shape[0], 4, 40),
     r"q_list\[1\]: expected head_dim 32 \(the head_dim of k\), got 40"),
    ("v_shape_differs_from_k", "v", None, lambda t: torch.randn(t.shape[0], 1, 32), r"^v: expected the shape of k"),
    ("heads_differ_between_groups", "q_list", 1, lambda t: torch.randn(t.shape[0], 8, 32),
     r"q_list\[1\]: expected 4 heads"),
    ("cu_seqlens_q_wrong_length", "cu_seqlens_q_list", 0, lambda t: t[:2],
     r"cu_seqlens_q_list\[0\]: expected 3 elements"),
    ("cu_seqlens_k_too_short", "cu_seqlens_k", None, lambda t: t[:1], r"cu_seqlens_k: expected at least 2 elements"),
    ("cu_seqlens_not_contiguous", "cu_seqlens_k", None, lambda t: torch.stack([t, t], 1)[:, 0],
     r"cu_seqlens_k: expected a contiguous tensor"),
    ("cu_seqlens_k_not_monotone", "cu_seqlens_k", None, lambda t: _int32(0, 10, 9),
     r"cu_seqlens_k\[2\].*never decrease"),
    ("cu_seqlens_k_not_starting_at_zero", "cu_seqlens_k", None, lambda t: _int32(1, 10, 17),
     r"cu_seqlens_k\[0\]: expected 0, got 1"),
    ("cu_seqlens_k_exceeds_total", "cu_seqlens_k", None, lambda t: _int32(0, 10, 18),
     r"cu_seqlens_k\[2\].*expected <= the number of tokens in the tensor \(17\), got 18"),
    ("cu_seqlens_q_exceeds_total", "cu_seqlens_q_list", 1, lambda t: _int32(0, 6, 10),
     r"cu_seqlens_q_list\[1\]\[2\]: .*\(9\), got 10"),
    ("cu_seqlens_q_not_monotone", "cu_seqlens_q_list", 0, lambda t: _int32(0, 11, 10),
     r"cu_seqlens_q_list\[0\]\[2\]: "),
]


@pytest.mark.parametrize("field,index,change,pattern", [pytest.param(*row[1:], id=row[0]) for row in _BAD_INPUTS])
def test_bad_input_is_rejected(field, index, change, pattern):
    c = _case()
    if index is None:
        setattr(c, field, change(getattr(c, field)))
    else:
        getattr(c, field)[index] = change(getattr(c, field)[index])
    with pytest.raises(ValueError, match=pattern):
        _call(c)


def test_unsupported_dtype():
    c = _case()
    c.q_list = [q.to(torch.int32) for q in c.q_list]
    c.k, c.v = c.k.to(torch.int32), c.v.to(torch.int32)
    with pytest.raises(ValueError, match=r"q_list\[0\]: expected dtype float16, bfloat16, float32 or float64, got torch.int32"):
        _call(c)


def test_last_dim_not_contiguous():
    c = _case()
    q = c.q_list[0]
    c.q_list[0] = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(-1) != 1
    assert c.q_list[0].stride(-1) != 1
    with pytest.raises(ValueError, match=r"q_list\[0\]: expected the last dim contiguous"):
        _call(c)
    c = _case()
    c.v = c.v.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match=r"^v: expected the last dim contiguous"):
        _call(c)


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.float32])
def test_cu_seqlens_wrong_dtype(bad_dtype):
    c = _case()
    c.cu_seqlens_k = c.cu_seqlens_k.to(bad_dtype)
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected dtype torch.int32"):
        _call(c)
    c = _case()
    c.cu_seqlens_q_list[1] = c.cu_seqlens_q_list[1].to(bad_dtype)
    with pytest.raises(ValueError, match=r"cu_seqlens_q_list\[1\]: expected dtype torch.int32"):
        _call(c)


def test_seqused_k_wrong_length_and_dtype():
    c = _case(seqused=[None, [3, 3]])
    c.seqused_k_list[1] = c.seqused_k_list[1][:1]
    with pytest.raises(ValueError, match=r"seqused_k_list\[1\]: expected 2 elements"):
        _call(c)
    c = _case(seqused=[None, [3, 3]])
    c.seqused_k_list[1] = c.seqused_k_list[1].long()
    with pytest.raises(ValueError, match=r"seqused_k_list\[1\]: expected dtype torch.int32"):
        _call(c)


@pytest.mark.parametrize("which", ["cu_seqlens_q_list", "max_seqlen_q_list", "seqused_k_list"])
def test_mismatched_list_lengths(which):
    c = _case(G=2)
    if which == "cu_seqlens_q_list":
        c.cu_seqlens_q_list = c.cu_seqlens_q_list[:1]
    elif which == "max_seqlen_q_list":
        c.max_seqlen_q_list = c.max_seqlen_q_list + [3]
    else:
        c.seqused_k_list = [None]
    with pytest.raises(ValueError, match=rf"{which}: expected .*2 entries"):
        _call(c)


def test_negative_softmax_scale():
    c = _case()
    with pytest.raises(ValueError, match=r"softmax_scale: expected a positive"):
        _call(c, softmax_scale=-1.0)


@pytest.mark.parametrize("scale", [1e-50, 1e-40, 1e39, math.inf, math.nan, 0.0, -0.5, "0.5", True],
                         ids=["underflows", "subnormal", "overflows", "inf", "nan", "zero", "negative", "str",
                              "bool"])
def test_softmax_scale_that_float32_cannot_hold_is_rejected(scale):
    # 1e-50 used to become 0.0f in the C struct, which meant "default 1/sqrt(D)": silently.
    c = _case()
    with pytest.raises(ValueError, match=r"^softmax_scale: expected a positive"):
        _call(c, softmax_scale=scale)


@pytest.mark.parametrize("scale", [1e-50, -1.0, math.nan, 1e39])
def test_op_softmax_scale_is_checked_before_narrowing(scale):
    # At the op level 0.0 means the default; any other value must be a usable float32 scale
    # (a negative one used to be taken for the default as well).
    c = _case()
    args = list(c.op_args())
    args[8] = scale
    with pytest.raises(ValueError, match=r"^softmax_scale: expected a positive"):
        rfa_ops.grouped_fwd(*args)


def test_small_but_normal_softmax_scale_is_used_as_given():
    c = _case(G=1)
    tiny = 1e-30  # a normal float32: scores ~1e-30, so every visible key weighs the same
    outs = _call(c, softmax_scale=tiny, causal=False)
    default = _call(c, causal=False)
    assert not torch.equal(outs[0], default[0])
    q0 = c.q_list[0]
    cu_k = c.cu_seqlens_k.tolist()
    for b, (s, e) in enumerate(zip(c.cu_seqlens_q_list[0].tolist(), c.cu_seqlens_q_list[0].tolist()[1:])):
        mean_v = c.v[cu_k[b]:cu_k[b + 1]].mean(0).repeat_interleave(q0.shape[1] // c.v.shape[1], 0)
        torch.testing.assert_close(outs[0][s:e], mean_v.expand(e - s, -1, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [2**32 + 5, 2**31, -1, 3.0, True])
@pytest.mark.parametrize("which", ["max_seqlen_q", "max_seqlen_k"])
def test_max_seqlen_hint_is_checked_before_narrowing(which, value):
    # ctypes wraps modulo 2**32: 2**32 + 5 became 5 and 2**31 became -2147483648.
    c = _case()
    if which == "max_seqlen_q":
        c.max_seqlen_q_list = [value] + c.max_seqlen_q_list[1:]
        name = r"max_seqlen_q_list\[0\]"
    else:
        c.max_seqlen_k = value
        name = "max_seqlen_k"
    with pytest.raises(ValueError, match=rf"^{name}: expected (an int in \[0, 2147483647\]|a Python int)"):
        _call(c)


def test_device_mismatch():
    # A meta tensor stands in for "another device" on a CPU-only machine.
    c = _case()
    c.k = torch.empty(c.k.shape, dtype=c.k.dtype, device="meta")
    with pytest.raises((ValueError, RuntimeError), match=r"k|device"):
        _call(c)


# ---- rejected by the library (its message reaches the user as ValueError) ----------------------


def test_heads_not_divisible():
    c = _case(Hq=6, Hk=4)
    with pytest.raises(ValueError, match=r"num_heads_q: expected a positive multiple of num_heads_k \(4\), got 6"):
        _call(c)


@pytest.mark.parametrize("head_dim", [12, 260])
def test_unsupported_head_dim(head_dim):
    c = _case(D=head_dim)
    with pytest.raises(ValueError, match=rf"head_dim: expected .*got {head_dim}"):
        _call(c)


def test_too_many_groups():
    c = _case(G=_lib.MAX_GROUPS + 1)
    with pytest.raises(ValueError, match=rf"num_groups: expected 1 to 16, got {_lib.MAX_GROUPS + 1}"):
        _call(c)


def test_max_groups_is_accepted():
    c = _case(G=_lib.MAX_GROUPS)
    outs = _call(c)
    assert len(outs) == _lib.MAX_GROUPS
    for o in outs:
        assert torch.all(torch.isfinite(o))


@pytest.mark.parametrize("used, match", [([11, 3], r"seqused_k_list\[1\]\[0\]: .*\(10\), got 11"),
                                         ([3, -1], r"seqused_k_list\[1\]\[1\]: .*got -1")])
def test_seqused_k_out_of_range(used, match):
    c = _case(seqused=[None, used])
    with pytest.raises(ValueError, match=match):
        _call(c)


def test_backward_rejects_bad_metadata():
    args, outs, lses, douts = _backward_call()
    (q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det) = args
    bad_cu_k = torch.tensor([0, 12, 11], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[2\]"):
        rfa_ops.grouped_bwd(douts, q_list, k, v, outs, lses, cu_q, bad_cu_k, seqused, max_q,
                            max_k, scale, causal, det)
    with pytest.raises(ValueError, match=r"dout_list\[1\]: expected shape"):
        rfa_ops.grouped_bwd([douts[0], douts[1][:-1]], q_list, k, v, outs, lses, cu_q, cu_k,
                            seqused, max_q, max_k, scale, causal, det)
    with pytest.raises(ValueError, match=r"lse_list\[0\]: expected shape"):
        rfa_ops.grouped_bwd(douts, q_list, k, v, outs, [lses[0].t(), lses[1]], cu_q, cu_k,
                            seqused, max_q, max_k, scale, causal, det)
    with pytest.raises(ValueError, match=r"lse_list\[1\]: expected dtype torch.float32"):
        rfa_ops.grouped_bwd(douts, q_list, k, v, outs, [lses[0], lses[1].double()], cu_q, cu_k,
                            seqused, max_q, max_k, scale, causal, det)
    with pytest.raises(ValueError, match=r"out_list: expected 2 entries"):
        rfa_ops.grouped_bwd(douts, q_list, k, v, outs[:1], lses, cu_q, cu_k, seqused, max_q,
                            max_k, scale, causal, det)


def test_cuda_request_on_cpu_only_build():
    if _lib.cuda_compiled():
        pytest.skip("this libringattn has CUDA compiled in")
    with pytest.raises(NotImplementedError, match=r"CUDA|cuda"):
        _lib.check_support(_lib.DEVICE_CUDA, 0, _lib.DTYPE_FP16, 128)
    # The same through a full forward call with exec.device_type = CUDA on host pointers: the
    # library refuses before touching memory.
    c = _case()
    outs = [torch.empty_like(q) for q in c.q_list]
    lses = [torch.empty(q.shape[1], q.shape[0]) for q in c.q_list]
    orig = rfa_ops._exec

    def cuda_exec(device):
        ex, _ = orig(device)
        ex.device_type = _lib.DEVICE_CUDA
        return ex, 0

    rfa_ops._exec = cuda_exec
    rfa_ops.clear_plan_caches()  # a cached plan of this shape would not ask _exec again
    try:
        with pytest.raises(NotImplementedError, match=r"exec.device_type"):
            rfa_ops.fwd_into(*c.op_args()[:-3], 0.0, True, outs, lses)
    finally:
        rfa_ops._exec = orig
        rfa_ops.clear_plan_caches()


def test_flash_attn_varlen_func_errors_name_arguments():
    c = _case(G=1)
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected dtype torch.int32"):
        flash_attn_varlen_func(c.q_list[0], c.k, c.v, c.cu_seqlens_q_list[0],
                               c.cu_seqlens_k.long(), 10, 10)


@pytest.mark.parametrize("window_size", [5, "ab", (1, 2, 3), (1.0, -1.0), None], ids=repr)
def test_window_size_that_is_not_a_pair(window_size):
    c = _case(G=1)
    with pytest.raises(ValueError, match=r"^window_size: expected a \(left, right\) pair of ints"):
        flash_attn_varlen_func(c.q_list[0], c.k, c.v, c.cu_seqlens_q_list[0], c.cu_seqlens_k, 10, 10,
                               window_size=window_size)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"^window_size: expected a \(left, right\) pair of ints"):
        ring_flash_attn_func(q, q, q, window_size=window_size)


@pytest.mark.parametrize("func", [ring_flash_attn_func, zigzag_ring_flash_attn_func, stripe_flash_attn_func],
                         ids=lambda f: f.__name__)
def test_batch_of_zero_sequences_names_q(func):
    # It used to fail deep inside with "cu_seqlens_k: expected at least 2 elements", an argument
    # the caller never passed.
    x = torch.randn(0, 8, 2, 16)
    with pytest.raises(ValueError, match=r"^q: expected a batch of at least one sequence \[batch, local_seqlen"):
        func(x, x, x)


def _flash_attn_error(c, **kw):
    args = dict(q=c.q_list[0], k=c.k, v=c.v, cu_seqlens_q=c.cu_seqlens_q_list[0], cu_seqlens_k=c.cu_seqlens_k,
                max_seqlen_q=c.max_seqlen_q_list[0], max_seqlen_k=c.max_seqlen_k)
    args.update(kw)
    with pytest.raises((ValueError, NotImplementedError)) as info:
        flash_attn_varlen_func(**args)
    return str(info.value)


@pytest.mark.parametrize("what, expected", [
    ("q_dtype", r"q: expected dtype float16, bfloat16, float32 or float64, got torch.int32"),
    ("q_ndim", r"q: expected a 3-D tensor"),
    ("k_dtype", r"k: expected dtype torch.float32 \(the dtype of q\), got torch.float16"),
    ("cu_seqlens_q_len", r"cu_seqlens_q: expected 3 elements \(batch_size \+ 1, as cu_seqlens_k\), got 2"),
    ("cu_seqlens_q_value", r"forward: cu_seqlens_q\[2\]: expected <= the number of tokens in the tensor \(17\), got 18"),
    ("max_seqlen_q", r"max_seqlen_q: expected an int in \[0, 2147483647\]"),
    ("q_row_stride", r"q.stride\(0\): expected a row \(token\) stride >= head_dim \(32\) elements, got 16"),
    ("head_dim", r"head_dim: expected a multiple of 8 in \[8, 256\] on CPU, got 12"),
])
def test_flash_attn_varlen_func_errors_name_its_own_arguments(what, expected):
    """flash_attn_varlen_func(q, ...) is the grouped op with one group: its errors name q,
    cu_seqlens_q, max_seqlen_q (not q_list[0], cu_seqlens_q_list[0], C struct fields) and no C
    function (such as ringattn_fwd_workspace_size)."""
    c = _case(G=1)
    kw = {}
    if what == "q_dtype":
        kw["q"] = c.q_list[0].to(torch.int32)
    elif what == "q_ndim":
        kw["q"] = c.q_list[0][0]
    elif what == "k_dtype":
        kw["k"] = c.k.half()
    elif what == "cu_seqlens_q_len":
        kw["cu_seqlens_q"] = c.cu_seqlens_q_list[0][:2]
    elif what == "cu_seqlens_q_value":
        kw["cu_seqlens_q"] = torch.tensor([0, 10, 18], dtype=torch.int32)
    elif what == "max_seqlen_q":
        kw["max_seqlen_q"] = 2**31
    elif what == "q_row_stride":  # rows 16 elements apart, heads of 32: not a valid layout
        q = c.q_list[0]
        kw["q"] = torch.empty(q.numel() * 4).as_strided(q.shape, (16, q.shape[0] * 16 + 32, 1))
    elif what == "head_dim":
        kw.update(q=c.q_list[0][..., :12].contiguous(), k=c.k[..., :12].contiguous(), v=c.v[..., :12].contiguous())
    message = _flash_attn_error(c, **kw)
    assert re.match(expected, message), message
    for internal in ("_list", "ringattn_", "(group", "row_stride", "head_stride"):
        assert internal not in message, message


def test_op_errors_name_the_op_arguments():
    """The library's C field names ("q (group 1)", "cu_seqlens_q[2] (group 1)", "k.row_stride")
    reach the ops' callers as the ops' argument names."""
    c = _case(G=2)
    q = c.q_list[1]
    c.q_list[1] = torch.empty(q.numel() * 4).as_strided(q.shape, (16, q.shape[0] * 16 + 32, 1))
    with pytest.raises(ValueError) as info:
        rfa_ops.grouped_fwd(*c.op_args())
    assert str(info.value).startswith("q_list[1].stride(0): expected a row (token) stride >= head_dim (32)"), info.value
    c = _case(G=2)
    k = c.k
    c.k = torch.empty(k.numel() * 4).as_strided(k.shape, (k.shape[1] * 32, 8, 1))
    c.v = c.k
    with pytest.raises(ValueError) as info:
        rfa_ops.grouped_fwd(*c.op_args())
    assert str(info.value).startswith("k.stride(1): expected a head stride >= head_dim (32)"), info.value


def _backward_call(seqused=None):
    """A forward on a case (causal, seqused_k as given) for the backward tests: (op arguments,
    outs, lses, douts); the op arguments unpack as (q_list, k, v, cu_q, cu_k, seqused, max_q,
    max_k, scale, causal, deterministic)."""
    c = _case(seqused=seqused)
    args = c.op_args(causal=True)
    outs, lses = rfa_ops.grouped_fwd(*args)
    return args, outs, lses, [torch.randn_like(o) for o in outs]


def _filled_gradients(q_list, k, v, value: float):
    """dq per group, dk and dv outputs filled with `value` (SENTINEL: must stay untouched; NaN: must
    be overwritten)."""
    return [torch.full_like(q, value) for q in q_list], torch.full_like(k, value), torch.full_like(v, value)


# ---- overlapping outputs ------------------------------------------------------------------------


def test_backward_rejects_dv_aliasing_dk():
    args, outs, lses, douts = _backward_call(seqused=[None, [3, 3]])
    (q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det) = args
    dqs, dk, dv = _filled_gradients(q_list, k, v, SENTINEL)
    with pytest.raises(ValueError, match=r"^dv: expected an output that shares no memory with the output dk"):
        rfa_ops.bwd_into(douts, q_list, k, v, outs, lses, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det,
                         dqs, dk, dk)
    for t in (*dqs, dk):
        assert torch.all(t == SENTINEL)
    # dq of group 1 over dq of group 0
    with pytest.raises(ValueError, match=r"^dq_list\[1\]: expected an output that shares no memory with the output "
                                         r"dq_list\[0\]"):
        rfa_ops.bwd_into(douts, q_list, k, v, outs, lses, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det,
                         [dqs[0], dqs[0][:q_list[1].shape[0]]], dk, dv)
    for t in (*dqs, dk, dv):
        assert torch.all(t == SENTINEL)


def test_forward_rejects_overlapping_outputs():
    c = _case()
    q0 = c.q_list[0]
    T, H, D = q0.shape
    outs, lses = _prefilled_fwd_outputs(c)
    args = c.op_args()[:-3]
    # Rows and heads on top of each other: row stride D with H heads of D elements.
    buf = torch.full((T * D + H * D,), SENTINEL)
    overlapping = buf.as_strided((T, H, D), (D, D, 1))
    with pytest.raises(ValueError, match=r"^out_list\[0\]: expected an output whose rows and heads do not overlap"):
        rfa_ops.fwd_into(*args, 0.0, True, [overlapping, outs[1]], lses)
    # The output written over the input q.
    with pytest.raises(ValueError, match=r"^out_list\[0\]: expected an output that shares no memory with the input "
                                         r"q_list\[0\]"):
        rfa_ops.fwd_into(*args, 0.0, True, [q0, outs[1]], lses)
    # Both groups' LSE in one tensor.
    with pytest.raises(ValueError, match=r"^lse_list\[1\]: expected an output that shares no memory with the output "
                                         r"lse_list\[0\]"):
        rfa_ops.fwd_into(*args, 0.0, True, outs, [lses[0], lses[0].view(-1)[:lses[1].numel()].view(lses[1].shape)])
    assert torch.all(buf == SENTINEL)
    for t in (*outs, *lses):
        assert torch.all(t == SENTINEL)


def test_packed_gradient_views_are_accepted():
    """dk and dv as the two halves of one [total_k, 2, Hk, D] tensor interleave without sharing
    an element: accepted, same values as separate tensors."""
    args, outs, lses, douts = _backward_call()
    (q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det) = args
    ref_dq, ref_dk, ref_dv = rfa_ops.grouped_bwd(douts, q_list, k, v, outs, lses, cu_q, cu_k, seqused, max_q, max_k,
                                                 scale, causal, det)
    dkv = torch.full((k.shape[0], 2, *k.shape[1:]), SENTINEL)
    dqs = [torch.empty_like(q) for q in q_list]
    rfa_ops.bwd_into(douts, q_list, k, v, outs, lses, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det,
                     dqs, dkv[:, 0], dkv[:, 1])
    torch.testing.assert_close(dkv[:, 0], ref_dk, rtol=0, atol=0)
    torch.testing.assert_close(dkv[:, 1], ref_dv, rtol=0, atol=0)


# ---- a rejected call writes nothing ------------------------------------------------------------

SENTINEL = 12.5


def _prefilled_fwd_outputs(c):
    outs = [torch.full_like(q, SENTINEL) for q in c.q_list]
    lses = [torch.full((q.shape[1], q.shape[0]), SENTINEL) for q in c.q_list]
    return outs, lses


@pytest.mark.parametrize("bad", ["cu_seqlens_k", "cu_seqlens_q", "seqused_k", "heads", "head_dim"])
def test_rejected_forward_writes_nothing(bad):
    c = _case(seqused=[None, [3, 3]], Hq=6 if bad == "heads" else 4, Hk=4 if bad == "heads" else 2,
              D=12 if bad == "head_dim" else 32)
    if bad == "cu_seqlens_k":
        c.cu_seqlens_k = torch.tensor([0, 12, 11], dtype=torch.int32)
    elif bad == "cu_seqlens_q":
        # Group 0 is valid and would be computed first; group 1 is not: nothing may be written.
        c.cu_seqlens_q_list[1] = torch.tensor([0, 6, 99], dtype=torch.int32)
    elif bad == "seqused_k":
        c.seqused_k_list[1] = torch.tensor([3, 8], dtype=torch.int32)
    outs, lses = _prefilled_fwd_outputs(c)
    with pytest.raises(ValueError):
        rfa_ops.fwd_into(*c.op_args()[:-3], 0.0, True, outs, lses)
    for t in (*outs, *lses):
        assert torch.all(t == SENTINEL)


def test_rejected_backward_writes_nothing():
    args, outs, lses, douts = _backward_call(seqused=[None, [3, 3]])
    (q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det) = args
    seqused = [None, torch.tensor([3, 8], dtype=torch.int32)]
    dqs, dk, dv = _filled_gradients(q_list, k, v, SENTINEL)
    with pytest.raises(ValueError, match=r"seqused_k_list\[1\]\[1\]: "):
        rfa_ops.bwd_into(douts, q_list, k, v, outs, lses, cu_q, cu_k, seqused, max_q, max_k,
                         scale, causal, det, dqs, dk, dv)
    for t in (*dqs, dk, dv):
        assert torch.all(t == SENTINEL)


def test_backward_overwrites_poisoned_gradients():
    # dk/dv are written (not accumulated into) everywhere, including keys no query sees.
    args, outs, lses, douts = _backward_call(seqused=[[4, 0], [3, 2]])
    (q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det) = args
    dqs, dk, dv = _filled_gradients(q_list, k, v, math.nan)
    rfa_ops.bwd_into(douts, q_list, k, v, outs, lses, cu_q, cu_k, seqused, max_q, max_k, scale,
                     causal, det, dqs, dk, dv)
    for t in (*dqs, dk, dv):
        assert not torch.isnan(t).any()
    # Keys 4..9 of sequence 0 (tokens 4..9) and 2..6 of sequence 1 (tokens 12..16) are past
    # every group's seqused_k; the keys some group sees get non-zero gradients.
    for rows in (slice(4, 10), slice(12, 17)):
        assert torch.all(dk[rows] == 0) and torch.all(dv[rows] == 0)
    for rows in (slice(0, 4), slice(10, 12)):
        assert torch.all(dv[rows].abs().sum(-1) > 0)


def test_forward_overwrites_poisoned_outputs():
    c = _case()
    outs = [torch.full_like(q, math.nan) for q in c.q_list]
    lses = [torch.full((q.shape[1], q.shape[0]), math.nan) for q in c.q_list]
    rfa_ops.fwd_into(*c.op_args()[:-3], 0.0, True, outs, lses)
    ref_outs, ref_lses = rfa_ops.grouped_fwd(*c.op_args())
    for a, b in zip(outs + lses, ref_outs + ref_lses):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- status mapping ----------------------------------------------------------------------------


def test_check_maps_status_to_exception():
    _lib.get()
    _lib.check(_lib.STATUS_OK)
    with pytest.raises(ValueError):
        _lib.check(_lib.STATUS_INVALID_ARGUMENT)
    with pytest.raises(NotImplementedError):
        _lib.check(_lib.STATUS_UNSUPPORTED)
    with pytest.raises(RuntimeError, match="CUDA_ERROR"):
        _lib.check(_lib.STATUS_CUDA_ERROR)
    with pytest.raises(RuntimeError, match="INTERNAL_ERROR"):
        _lib.check(_lib.STATUS_INTERNAL_ERROR)
