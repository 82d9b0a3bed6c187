"""libringattn_torch, the ops' C++ kernels over PyTorch's stable ABI (CPU backend).

When the library is built (CMake builds it whenever the Python it is configured with imports
torch >= 2.10) the ops run its C++ kernels; RING_FLASH_ATTN_TORCH_SHIM=0 keeps the Python kernels
(libringattn through ctypes). Here: the C++ kernels compute the same bits as the Python kernels
on random inputs (shapes, groups, GQA, dtypes, strided inputs, window / softcap / sinks /
diagonal shifts), raise the same errors, pass opcheck and run inside torch.compile'd graphs.
Run with RING_FLASH_ATTN_TORCH_SHIM=0 only the first test applies (it checks the fallback).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import pytest
import torch

from cases import make_case
import ring_flash_attn as rfa
from ring_flash_attn import _torch_shim, grouped_flash_attn_varlen_func
from ring_flash_attn import ops as rfa_ops

SHIM_DISABLED = os.environ.get(_torch_shim.ENV_TORCH_SHIM) == "0"
TORCH_TOO_OLD = torch.__version__ < _torch_shim.MIN_TORCH

needs_shim = pytest.mark.skipif(SHIM_DISABLED or TORCH_TOO_OLD,
                                reason="the ops use the Python kernels here (test_the_expected_kernels_are_active)")


def test_the_expected_kernels_are_active():
    """The C++ kernels are active unless disabled or unusable with this torch; a build that
    fails to produce or load them fails here instead of silently testing the fallback twice."""
    if SHIM_DISABLED or TORCH_TOO_OLD:
        assert rfa.ops_implementation("cpu") == "ctypes", _torch_shim.details()
        assert _torch_shim.counts() == (0, 0)
    else:
        assert rfa.ops_implementation("cpu") == "torch_shim", _torch_shim.details()
        assert "libringattn_torch" in _torch_shim.details()


# ---- inputs --------------------------------------------------------------------------------------


def _strided(t: torch.Tensor, how: str, seed: int) -> torch.Tensor:
    """`t` with the same values in another layout: a slice of a wider tensor ("heads": head
    stride past the head dim; "rows": every other row) or as is ("dense")."""
    if how == "dense" or t.shape[0] == 0:
        return t
    gen = torch.Generator().manual_seed(seed)
    if how == "heads":
        wide = torch.randn(t.shape[0], t.shape[1], t.shape[2] + 8, generator=gen).to(t.dtype)
        wide[:, :, : t.shape[2]] = t
        return wide[:, :, : t.shape[2]]
    tall = torch.randn(2 * t.shape[0], t.shape[1], t.shape[2], generator=gen).to(t.dtype)
    tall[::2] = t
    return tall[::2]


# (seqlens_q per group, seqlens_k, Hq, Hk, D): groups 1-3, GQA 1x/2x/6x, an empty group.
SHAPES = [
    ([[9, 4]], [9, 6], 2, 2, 16),
    ([[7, 5], [4, 9]], [9, 12], 4, 2, 32),
    ([[3, 8, 1], [0, 0, 0], [5, 2, 6]], [4, 8, 6], 6, 1, 8),
]
FEATURES = {
    "plain": dict(causal=False),
    "causal": dict(causal=True),
    "window": dict(causal=True, window_size=[4, 0]),
    "window_both_sides_softcap": dict(causal=False, window_size=[2, 3], softcap=5.0),
    "sinks_softcap": dict(causal=True, sinks=True, softcap=3.0),
    "shift_seqused": dict(causal=True, shifts=True, seqused=True),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _call_args(shape_index: int, feature: str, dtype: torch.dtype, layout: str, seed: int):
    """(positional op arguments, keyword arguments) of a forward call."""
    seqlens_q, seqlens_k, Hq, Hk, D = SHAPES[shape_index]
    f = FEATURES[feature]
    seqused = None
    if f.get("seqused"):
        seqused = [None] + [[max(n - 1, 0) for n in seqlens_k]] * (len(seqlens_q) - 1)
    c = make_case(seqlens_q, seqlens_k, Hq, Hk, D, dtype, seqused_k=seqused, seed=seed)
    q_list = [_strided(q, layout, seed + g) for g, q in enumerate(c.q_list)]
    k, v = _strided(c.k, layout, seed + 10), _strided(c.v, layout, seed + 11)
    scale = 0.0 if seed % 2 else 0.3
    G = len(q_list)
    args = (q_list, k, v, c.cu_seqlens_q_list, c.cu_seqlens_k, c.seqused_k_list or [None] * G,
            c.max_seqlen_q_list, c.max_seqlen_k, scale, f["causal"], False)
    kwargs = {}
    if "window_size" in f:
        kwargs["window_size"] = f["window_size"]
    if "softcap" in f:
        kwargs["softcap"] = f["softcap"]
    gen = torch.Generator().manual_seed(seed + 20)
    if f.get("sinks"):
        kwargs["sinks"] = torch.randn(Hq, generator=gen)
    if f.get("shifts"):
        B = len(seqlens_k)
        kwargs["diagonal_shift_list"] = [torch.randint(-2, 3, (B,), generator=gen, dtype=torch.int32)] + [None] * (G - 1)
    return args, kwargs


def _counted(fn):
    """fn()'s result and how many kernel calls (C++, handed to Python) it made."""
    before = _torch_shim.counts()
    result = fn()
    after = _torch_shim.counts()
    return result, (after[0] - before[0], after[1] - before[1])


def _assert_same_bits(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
        assert not a.isnan().any()
        assert torch.equal(a, b), f"max |diff| {(a.double() - b.double()).abs().max().item()}"


# ---- forward: same bits as the Python kernel ------------------------------------------------------


@needs_shim
@pytest.mark.parametrize("layout", ["dense", "heads", "rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape_index", range(len(SHAPES)))
def test_forward_matches_the_python_kernel(shape_index, feature, dtype, layout):
    seed = 100 * shape_index + 7 * list(FEATURES).index(feature) + DTYPES.index(dtype)
    args, kwargs = _call_args(shape_index, feature, dtype, layout, seed)
    (outs, lses), calls = _counted(lambda: rfa_ops.grouped_fwd(*args, **kwargs))
    assert calls == (1, 0)  # the C++ kernel ran the call itself
    expected_outs, expected_lses = rfa_ops._grouped_fwd_kernel(*args, **kwargs)
    _assert_same_bits([*outs, *lses], [*expected_outs, *expected_lses])
    assert all(o.is_contiguous() for o in [*outs, *lses])


# ---- backward: same bits as the Python kernel -----------------------------------------------------


def _bwd_args(fwd_args, fwd_kwargs, layout: str, deterministic: bool, seed: int):
    """(positional, keyword) arguments of grouped_bwd for a forward call's arguments, with the
    forward's outputs and random output gradients in `layout`."""
    outs, lses = rfa_ops._grouped_fwd_kernel(*fwd_args, **fwd_kwargs)
    gen = torch.Generator().manual_seed(seed)
    douts = [_strided(torch.randn(o.shape, generator=gen).to(o.dtype), layout, seed + 30 + g)
             for g, o in enumerate(outs)]
    outs = [_strided(o, layout, seed + 40 + g) for g, o in enumerate(outs)]
    (q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, _) = fwd_args
    args = (douts, q_list, k, v, outs, lses, cu_q, cu_k, seqused, max_q, max_k, scale, causal, deterministic)
    return args, dict(fwd_kwargs)


@needs_shim
@pytest.mark.parametrize("deterministic", [False, True], ids=["any_order", "deterministic"])
@pytest.mark.parametrize("layout", ["dense", "heads", "rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("shape_index", range(len(SHAPES)))
def test_backward_matches_the_python_kernel(shape_index, feature, dtype, layout, deterministic):
    seed = 100 * shape_index + 7 * list(FEATURES).index(feature) + DTYPES.index(dtype) + 50
    fwd_args, fwd_kwargs = _call_args(shape_index, feature, dtype, layout, seed)
    args, kwargs = _bwd_args(fwd_args, fwd_kwargs, layout, deterministic, seed)
    (dq_list, dk, dv), calls = _counted(lambda: rfa_ops.grouped_bwd(*args, **kwargs))
    assert calls == (1, 0)
    expected_dq, expected_dk, expected_dv = rfa_ops._grouped_bwd_kernel(*args, **kwargs)
    _assert_same_bits([*dq_list, dk, dv], [*expected_dq, expected_dk, expected_dv])
    assert all(t.is_contiguous() for t in [*dq_list, dk, dv])


@needs_shim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("feature", ["causal", "sinks_softcap", "shift_seqused"])
def test_autograd_through_the_ops_matches_the_python_kernels(feature, dtype, monkeypatch):
    """Forward and backward through torch.ops (register_autograd's wrapper around the C++
    kernels; a loss on the outputs and the LSEs, so the backward runs twice) against the same
    autograd formulas over the Python kernels."""
    fwd_args, fwd_kwargs = _call_args(1, feature, dtype, "heads", seed=61)

    def run(fwd):
        leaves = [t.detach().clone().requires_grad_() for t in (*fwd_args[0], fwd_args[1], fwd_args[2])]
        q_list, k, v = leaves[:-2], leaves[-2], leaves[-1]
        kwargs = dict(fwd_kwargs)
        if "sinks" in kwargs:
            kwargs["sinks"] = kwargs["sinks"].detach().clone().requires_grad_()
            leaves.append(kwargs["sinks"])
        outs, lses = fwd(q_list, k, v, *fwd_args[3:], **kwargs)
        gen = torch.Generator().manual_seed(7)
        loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
        loss = loss + sum((torch.where(torch.isfinite(x), x, 0.0).double()
                           * torch.randn(x.shape, generator=gen, dtype=torch.float64)).sum() for x in lses)
        return [*outs, *lses, *torch.autograd.grad(loss, leaves)]

    through_ops, calls = _counted(lambda: run(rfa_ops.grouped_fwd))
    assert calls == (3, 0)  # forward, backward, and the backward of the LSE term, all in C++
    # The registered autograd's formulas (_save_attention_context, _attention_grads) over the
    # Python kernels.
    monkeypatch.setattr(rfa_ops, "_call_bwd", lambda eager, dout_list, q_list, k, v, out_list, lse_list, meta,
                        features: rfa_ops._grouped_bwd_kernel(dout_list, q_list, k, v, out_list, lse_list, *meta,
                                                              **(features or {})))
    python_kernels, calls = _counted(lambda: run(_python_fwd_with_autograd))
    assert calls == (0, 0)
    _assert_same_bits(through_ops, python_kernels)


class _PythonForward(torch.autograd.Function):
    """grouped_fwd's Python kernel with the registered autograd's context and backward."""

    @staticmethod
    def forward(ctx, args, kwargs, *leaves):
        out_list, lse_list = rfa_ops._grouped_fwd_kernel(*args, **kwargs)
        (q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det) = args
        rfa_ops._save_attention_context(ctx, q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det,
                                        kwargs.get("window_size", (-1, -1)), kwargs.get("softcap", 0.0),
                                        kwargs.get("sinks"), kwargs.get("diagonal_shift_list"), out_list, lse_list)
        return (*out_list, *lse_list)

    @staticmethod
    def backward(ctx, *grads):
        G = ctx.num_groups
        grad_out = None if all(g is None for g in grads[:G]) else grads[:G]
        dq_list, dk, dv, dsinks = rfa_ops._attention_grads(ctx, grad_out, grads[G:], ctx.has_sinks, eager=False)
        return (None, None, *dq_list, dk, dv, *([dsinks] if ctx.has_sinks else []))


def _python_fwd_with_autograd(q_list, k, v, *rest, **kwargs):
    args = (q_list, k, v, *rest)
    leaves = [*q_list, k, v] + ([kwargs["sinks"]] if "sinks" in kwargs else [])
    outputs = _PythonForward.apply(args, kwargs, *leaves)
    G = len(q_list)
    return list(outputs[:G]), list(outputs[G:])


# ---- errors: the Python path's, raised again ------------------------------------------------------


def _fwd_case():
    c = make_case([[7, 5], [4, 9]], [9, 12], 4, 2, 32, torch.float32, seqused_k=[None, [6, 10]], seed=3)
    return list(c.op_args(softmax_scale=0.0, causal=True)), {}


def _mutated(name):
    args, kwargs = _fwd_case()
    q_list, k = args[0], args[1]
    if name == "k_dtype":
        args[1] = k.double()
    elif name == "q_not_3d":
        args[0] = [q_list[0], q_list[1].flatten(1)]
    elif name == "q_last_dim_strided":
        args[0] = [q_list[0].transpose(1, 2).contiguous().transpose(1, 2), q_list[1]]
    elif name == "q_heads":
        args[0] = [q_list[0], q_list[1][:, :2]]
    elif name == "cu_seqlens_k_int64":
        args[4] = args[4].long()
    elif name == "cu_seqlens_q_length":
        args[3] = [args[3][0], args[3][1][:-1]]
    elif name == "cu_seqlens_q_decreasing":
        args[3] = [args[3][0], torch.tensor([0, 9, 4], dtype=torch.int32)]
    elif name == "cu_seqlens_k_past_end":
        args[4] = torch.tensor([0, 9, 30], dtype=torch.int32)
    elif name == "seqused_length":
        args[5] = [None, torch.tensor([6], dtype=torch.int32)]
    elif name == "seqused_entries":
        args[5] = [None]
    elif name == "max_seqlen_k_negative":
        args[7] = -1
    elif name == "max_seqlen_q_too_large":
        args[6] = [7, 2**31]
    elif name == "scale_subnormal":
        args[8] = 1e-40
    elif name == "scale_negative":
        args[8] = -0.5
    elif name == "window":
        kwargs["window_size"] = [-2, 0]
    elif name == "window_length":
        kwargs["window_size"] = [1, 0, 2]
    elif name == "softcap":
        kwargs["softcap"] = float("inf")
    elif name == "sinks_shape":
        kwargs["sinks"] = torch.zeros(3)
    elif name == "sinks_dtype":
        kwargs["sinks"] = torch.zeros(4, dtype=torch.float64)
    elif name == "shift_entries":
        kwargs["diagonal_shift_list"] = [None]
    elif name == "shift_dtype":
        kwargs["diagonal_shift_list"] = [None, torch.zeros(2, dtype=torch.int64)]
    elif name == "head_dim":
        args[0] = [q[..., :12] for q in q_list]
        args[1], args[2] = k[..., :12], args[2][..., :12]
    elif name == "k_rows_expanded":
        args[1] = k[:1].expand(k.shape)
    elif name == "too_many_groups":
        args[0] = [q_list[0]] * 17
        args[3] = [args[3][0]] * 17
        args[5] = [None] * 17
        args[6] = [7] * 17
    else:
        raise AssertionError(name)
    return args, kwargs


BAD_CALLS = ["k_dtype", "q_not_3d", "q_last_dim_strided", "q_heads", "cu_seqlens_k_int64", "cu_seqlens_q_length",
             "cu_seqlens_q_decreasing", "cu_seqlens_k_past_end", "seqused_length", "seqused_entries",
             "max_seqlen_k_negative", "max_seqlen_q_too_large", "scale_subnormal", "scale_negative", "window",
             "window_length", "softcap", "sinks_shape", "sinks_dtype", "shift_entries", "shift_dtype", "head_dim",
             "k_rows_expanded", "too_many_groups"]


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # the type and message are what is compared
        return type(e), str(e)
    return None


def _bwd_mutated(name):
    fwd_args, fwd_kwargs = _fwd_case()
    args, kwargs = _bwd_args(tuple(fwd_args), fwd_kwargs, "dense", False, seed=4)
    args = list(args)
    douts, outs, lses = args[0], args[4], args[5]
    if name == "dout_shape":
        args[0] = [douts[0], douts[1][:-1]]
    elif name == "dout_dtype":
        args[0] = [douts[0].double(), douts[1]]
    elif name == "out_entries":
        args[4] = outs[:1]
    elif name == "out_last_dim_strided":
        args[4] = [outs[0], outs[1].transpose(1, 2).contiguous().transpose(1, 2)]
    elif name == "lse_transposed":
        args[5] = [lses[0].t().contiguous().t(), lses[1]]
    elif name == "lse_dtype":
        args[5] = [lses[0], lses[1].double()]
    elif name == "lse_shape":
        args[5] = [lses[0][:, :-1], lses[1]]
    elif name == "cu_seqlens_k_past_end":
        args[7] = torch.tensor([0, 9, 30], dtype=torch.int32)
    else:
        raise AssertionError(name)
    return args, kwargs


BWD_BAD_CALLS = ["dout_shape", "dout_dtype", "out_entries", "out_last_dim_strided", "lse_transposed", "lse_dtype",
                 "lse_shape", "cu_seqlens_k_past_end"]


@needs_shim
@pytest.mark.parametrize("pass_name, name", [("forward", n) for n in BAD_CALLS] + [("backward", n) for n in BWD_BAD_CALLS])
def test_errors_are_the_python_kernels(pass_name, name):
    if pass_name == "forward":
        mutated, op, python_kernel = _mutated, rfa_ops.grouped_fwd, rfa_ops._grouped_fwd_kernel
    else:
        mutated, op, python_kernel = _bwd_mutated, rfa_ops.grouped_bwd, rfa_ops._grouped_bwd_kernel
    args, kwargs = mutated(name)
    expected = _error_of(lambda: python_kernel(*args, **kwargs))
    assert expected is not None and expected[0] is ValueError, expected
    got, calls = _counted(lambda: _error_of(lambda: op(*args, **kwargs)))
    assert got == expected
    assert calls == (0, 1)  # handed to the Python kernel, which named the error


@needs_shim
@pytest.mark.parametrize("feature", ["causal", "sinks_softcap", "shift_seqused"])
def test_calls_handed_to_the_python_kernels_return_their_outputs(feature):
    """The Python path behind the C++ kernels (taken e.g. by the first call on a CUDA device)
    hands back the Python kernels' outputs: forward's two lists, backward's dq list, dk and dv
    (which its op returns as one list)."""
    fwd_args, fwd_kwargs = _call_args(2, feature, torch.bfloat16, "rows", seed=71)
    bwd_args, bwd_kwargs = _bwd_args(fwd_args, fwd_kwargs, "rows", True, seed=71)
    with _torch_shim.python_path_forced():
        (outs, lses), fwd_calls = _counted(lambda: rfa_ops.grouped_fwd(*fwd_args, **fwd_kwargs))
        (dq_list, dk, dv), bwd_calls = _counted(lambda: rfa_ops.grouped_bwd(*bwd_args, **bwd_kwargs))
    assert fwd_calls == (0, 1) and bwd_calls == (0, 1)
    expected_outs, expected_lses = rfa_ops._grouped_fwd_kernel(*fwd_args, **fwd_kwargs)
    expected_dq, expected_dk, expected_dv = rfa_ops._grouped_bwd_kernel(*bwd_args, **bwd_kwargs)
    _assert_same_bits([*outs, *lses, *dq_list, dk, dv],
                      [*expected_outs, *expected_lses, *expected_dq, expected_dk, expected_dv])
    assert _counted(lambda: rfa_ops.grouped_fwd(*fwd_args, **fwd_kwargs))[1] == (1, 0)  # back to C++


@needs_shim
def test_other_exceptions_arrive_as_runtime_error_with_their_message(monkeypatch):
    # A kernel under the stable ABI can raise ValueError (std::invalid_argument) but not
    # NotImplementedError: the Python kernel's NotImplementedError reaches a torch.ops caller
    # as a RuntimeError (its base class) with the same message.
    def refuse(*args, **kwargs):
        raise NotImplementedError("refused by the test")

    args, kwargs = _mutated("cu_seqlens_q_decreasing")  # a call the C++ kernel hands over
    monkeypatch.setattr(rfa_ops, "_run_fwd", refuse)
    with pytest.raises(RuntimeError, match="^refused by the test$") as info:
        rfa_ops.grouped_fwd(*args, **kwargs)
    assert type(info.value) is RuntimeError


# ---- the eager path of the public functions --------------------------------------------------------


def _public_case():
    args, kwargs = _call_args(1, "sinks_softcap", torch.float32, "heads", seed=81)
    return args, kwargs


@needs_shim
def test_public_call_without_grad_runs_the_cpp_kernel():
    args, kwargs = _public_case()
    q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, _ = args
    with torch.no_grad():
        (outs, lses), calls = _counted(lambda: grouped_flash_attn_varlen_func(
            q_list, k, v, cu_q, cu_k, max_q, max_k, seqused_k_list=seqused, softmax_scale=scale or None,
            causal=causal, return_lse=True, **kwargs))
    assert calls == (1, 0)
    expected_outs, expected_lses = rfa_ops._grouped_fwd_kernel(*args, **kwargs)
    _assert_same_bits([*outs, *lses], [*expected_outs, *expected_lses])


@needs_shim
def test_public_call_with_grad_runs_the_cpp_kernels_forward_and_backward(monkeypatch):
    args, kwargs = _public_case()
    q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, _ = args
    leaves = [t.detach().clone().requires_grad_() for t in (*q_list, k, v, kwargs["sinks"])]
    features = dict(kwargs, sinks=leaves[-1])

    def run():
        outs, lses = grouped_flash_attn_varlen_func(leaves[:-3], leaves[-3], leaves[-2], cu_q, cu_k, max_q, max_k,
                                                    seqused_k_list=seqused, softmax_scale=scale or None,
                                                    causal=causal, return_lse=True, **features)
        loss = sum((o * o.detach()).sum() for o in outs) + sum(torch.where(torch.isfinite(x), x, 0.0).sum()
                                                               for x in lses)
        return [*outs, *lses, *torch.autograd.grad(loss, leaves)]

    eager, calls = _counted(run)
    assert calls == (3, 0)  # forward, backward, the LSE term's backward
    monkeypatch.setattr(rfa_ops, "eager_call_ok", lambda *a: False)  # the same call through torch.ops
    through_ops, calls = _counted(run)
    assert calls == (3, 0)
    _assert_same_bits(eager, through_ops)


@needs_shim
def test_public_call_errors_keep_their_exact_type(monkeypatch):
    """A refused eager call runs again on the Python path, so even a NotImplementedError (which
    the C++ kernels cannot raise) reaches the caller as itself."""
    args, kwargs = _mutated("cu_seqlens_q_decreasing")
    q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, _ = args

    def call():
        with torch.no_grad():
            grouped_flash_attn_varlen_func(q_list, k, v, cu_q, cu_k, max_q, max_k, seqused_k_list=seqused,
                                           causal=causal)

    error, calls = _counted(lambda: _error_of(call))
    assert error == _error_of(lambda: rfa_ops._grouped_fwd_kernel(*args, **kwargs))
    assert error[0] is ValueError and "cu_seqlens_q_list[1]" in error[1]
    assert calls == (0, 1)

    def refuse(*a, **kw):
        raise NotImplementedError("refused by the test")

    monkeypatch.setattr(rfa_ops, "_run_fwd", refuse)
    with pytest.raises(NotImplementedError, match="^refused by the test$"):
        call()


# ---- opcheck and torch.compile --------------------------------------------------------------------


@needs_shim
@pytest.mark.parametrize("feature", ["causal", "window_both_sides_softcap", "sinks_softcap", "shift_seqused"])
def test_opcheck_forward(feature):
    args, kwargs = _call_args(1, feature, torch.float32, "heads", seed=5)
    torch.library.opcheck(rfa_ops.grouped_fwd, args, kwargs)


@needs_shim
@pytest.mark.parametrize("feature", ["causal", "window_both_sides_softcap", "sinks_softcap", "shift_seqused"])
def test_opcheck_backward(feature):
    fwd_args, fwd_kwargs = _call_args(1, feature, torch.float32, "heads", seed=6)
    args, kwargs = _bwd_args(fwd_args, fwd_kwargs, "heads", True, seed=6)
    torch.library.opcheck(rfa_ops.grouped_bwd, args, kwargs)


@needs_shim
def test_opcheck_forward_with_gradients():
    fwd_args, fwd_kwargs = _call_args(1, "sinks_softcap", torch.float64, "dense", seed=8)
    q_list = [q.requires_grad_() for q in fwd_args[0]]
    fwd_args = (q_list, fwd_args[1].requires_grad_(), fwd_args[2].requires_grad_(), *fwd_args[3:])
    fwd_kwargs["sinks"].requires_grad_()
    torch.library.opcheck(rfa_ops.grouped_fwd, fwd_args, fwd_kwargs)


def _compiled_fn(q0, q1, k, v, cu_q0, cu_q1, cu_k):
    outs, lses = grouped_flash_attn_varlen_func([q0, q1], k, v, [cu_q0, cu_q1], cu_k, [7, 9], 12, causal=True,
                                                return_lse=True, window_size=(5, 0))
    return outs[0] * 2 + 1, outs[1], lses[1] - 1


@needs_shim
def test_compile_fullgraph_inductor_runs_the_cpp_kernel():
    args, _ = _call_args(1, "causal", torch.float32, "dense", seed=9)
    q_list, k, v, cu_q, cu_k = args[0], args[1], args[2], args[3], args[4]
    inputs = (*q_list, k, v, *cu_q, cu_k)
    expected = _compiled_fn(*inputs)
    torch._dynamo.reset()
    compiled = torch.compile(_compiled_fn, fullgraph=True, backend="inductor")
    compiled(*inputs)  # compiles
    got, calls = _counted(lambda: compiled(*inputs))
    assert calls == (1, 0)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_shim
def test_compile_fullgraph_inductor_forward_backward_runs_the_cpp_kernels():
    args, _ = _call_args(1, "causal", torch.float32, "dense", seed=10)
    leaves = [t.detach().clone().requires_grad_() for t in (*args[0], args[1], args[2])]
    cu_q, cu_k = args[3], args[4]

    def loss_fn(q0, q1, k, v):
        out0, out1, lse1 = _compiled_fn(q0, q1, k, v, *cu_q, cu_k)
        return out0.square().sum() + (out1 * out1.detach()).sum() + lse1.sum()

    expected = torch.autograd.grad(loss_fn(*leaves), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    torch.autograd.grad(compiled(*leaves), leaves)  # compiles
    got, calls = _counted(lambda: torch.autograd.grad(compiled(*leaves), leaves))
    assert calls == (3, 0)  # forward, backward, the LSE term's backward
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- loading ----------------------------------------------------------------------------------------


def _implementation_in_subprocess(setting: Optional[str], device_type: str = "cpu"):
    env = dict(os.environ)
    env.pop(_torch_shim.ENV_TORCH_SHIM, None)
    if setting is not None:
        env[_torch_shim.ENV_TORCH_SHIM] = setting
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import ring_flash_attn, ring_flash_attn._torch_shim as s\n"
            f"print(s.implementation({device_type!r})); print(s.details())")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines(), run.stderr


def test_setting_zero_keeps_the_python_kernels():
    (implementation, details), _ = _implementation_in_subprocess("0")
    assert implementation == "ctypes"
    assert f"{_torch_shim.ENV_TORCH_SHIM}=0" in details


@needs_shim
@pytest.mark.parametrize("setting, cuda_kernels", [(None, "ctypes"), ("1", "torch_shim")])
def test_cuda_uses_the_cpp_kernels_only_when_opted_in(setting, cuda_kernels):
    """By default the C++ kernels serve CPU tensors only (their CUDA path has not run on a GPU
    under this project's tests yet); RING_FLASH_ATTN_TORCH_SHIM=1 registers them for CUDA too."""
    (cpu, details), _ = _implementation_in_subprocess(setting, "cpu")
    assert cpu == "torch_shim", details
    (cuda, details), _ = _implementation_in_subprocess(setting, "cuda")
    assert cuda == cuda_kernels, details
    assert ("CPU and CUDA" in details) == (cuda_kernels == "torch_shim"), details


def test_a_path_that_is_not_a_library_falls_back_with_a_warning(tmp_path):
    bogus = tmp_path / "libringattn_torch.so"
    bogus.write_text("not a shared object")
    (implementation, details), stderr = _implementation_in_subprocess(str(bogus))
    assert implementation == "ctypes"
    assert str(bogus) in details and "cannot be loaded" in details
    assert "RuntimeWarning" in stderr and "ctypes path" in stderr
