"""Local attention (window_size), diagonal shifts, logit softcap and sink logits on the CPU backend,
against the dense float64 reference written from the definitions (test/reference.py), through the ops and the
public API.

Forward out / lse and backward dq / dk / dv / dsinks on fresh random inputs; float32 and float64
to a tight tolerance, bfloat16 and float16 by FlashAttention's rule (error at most twice that of
the same math in the low-precision dtype); a float64 gradcheck on a tiny case. NaN never passes.
Small shapes: the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import ctypes
import math
import zlib
from typing import Optional, Sequence

import pytest
import torch
from torch import Tensor

from cases import FeatureInputs as Inputs, FeatureScenario as Scenario  # shared with the GPU feature tests
from cases import LOW_PRECISION, assert_lse_close, assert_pass_rule, cu_seqlens, dtype_id
from reference import grouped_attention_reference
from ring_flash_attn import _lib, flash_attn_varlen_func, grouped_flash_attn_varlen_func
from ring_flash_attn import ops as rfa_ops
from ring_flash_attn.grouped_python import _flash_attn_varlen_forward_grouped

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# ---- cases -------------------------------------------------------------------------------------


SCENARIOS = [
    Scenario("window_0_0", [[40]], [50], window=(0, 0)),
    Scenario("window_1_1", [[40]], [50], window=(1, 1)),
    Scenario("window_1_causal", [[45]], [45], causal=True, window=(1, 0)),
    Scenario("window_small_asymmetric_varlen", [[30, 17]], [45, 17], window=(7, 3)),
    Scenario("window_larger_than_sequence", [[30]], [40], window=(500, 400)),
    Scenario("window_larger_than_sequence_causal", [[30]], [40], causal=True, window=(500, 0)),
    Scenario("window_left_only", [[50]], [70], window=(9, -1)),
    Scenario("window_left_only_causal", [[70]], [50], causal=True, window=(9, -1)),  # rows without keys
    Scenario("window_right_only", [[50]], [40], window=(-1, 4)),
    Scenario("shift_window_causal", [[40, 30]], [60, 30], causal=True, window=(12, -1), shifts=[[9, -14]]),
    Scenario("shift_causal_only", [[40, 30]], [60, 30], causal=True, shifts=[[-20, 5]]),
    Scenario("shift_window_two_sided", [[40, 30]], [60, 30], window=(6, 11), shifts=[[-33, 18]]),
    Scenario("softcap_causal", [[50]], [60], causal=True, softcap=3.0, q_amplitude=4.0),
    Scenario("softcap_full_gqa", [[30, 20]], [40, 25], hq=6, hk=2, softcap=10.0, q_amplitude=3.0),
    Scenario("sinks_rows_without_keys", [[60, 10]], [40, 12], causal=True, sinks=True, extra_rows=3,
             has_rows_without_keys=True),
    Scenario("sinks_window_softcap_gqa_varlen", [[33, 7, 20]], [40, 7, 0], hq=6, hk=2, window=(10, 6),
             softcap=4.0, sinks=True, q_amplitude=2.0),
    Scenario("groups2_seqused_shift_all", [[30, 20], [12, 25]], [45, 25], causal=True, window=(8, 0), softcap=5.0,
             sinks=True, seqused=[None, [30, 11]], shifts=[[3, -4], None], extra_rows=2, scale=0.375),
]


def make_inputs(sc: Scenario, dtype: torch.dtype) -> Inputs:
    """Random inputs rounded to `dtype` (so every reference sees the same values)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{sc.name}/{dtype}".encode()) % 100_000)

    def randn(*shape, amplitude=1.0):
        return (amplitude * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    q_list = [randn(sum(lens) + sc.extra_rows, sc.hq, sc.dim, amplitude=sc.q_amplitude) for lens in sc.seqlens_q]
    total_k = sum(sc.seqlens_k)
    k, v = randn(total_k, sc.hk, sc.dim), randn(total_k, sc.hk, sc.dim)
    as_int32 = lambda rows: None if rows is None else [None if r is None else torch.tensor(r, dtype=torch.int32)
                                                       for r in rows]
    sinks = None
    if sc.sinks:
        # Around the scores' scale, one above most of them: the sink takes a visible share.
        sinks = (torch.randn(sc.hq, generator=gen, dtype=torch.float64) + torch.linspace(-1.0, 3.0, sc.hq,
                                                                                         dtype=torch.float64)).float()
    return Inputs(q_list, k, v, [cu_seqlens(lens) for lens in sc.seqlens_q], cu_seqlens(sc.seqlens_k),
                  as_int32(sc.seqused), as_int32(sc.shifts), sinks, [max(lens) for lens in sc.seqlens_q],
                  max(sc.seqlens_k))


def run_op(sc: Scenario, x: Inputs, q_list, k, v, sinks):
    """The grouped op (autograd included) with the scenario's mask, softcap, sinks and shifts."""
    G = len(q_list)
    seqused = list(x.seqused) if x.seqused is not None else [None] * G
    return rfa_ops.grouped_fwd(q_list, k, v, x.cu_q_list, x.cu_k, seqused, x.max_q, x.max_k, sc.scale, sc.causal,
                               False, window_size=list(sc.window), softcap=sc.softcap, sinks=sinks,
                               diagonal_shift_list=x.shifts)


def run_reference(sc: Scenario, x: Inputs, dtype: torch.dtype):
    """The reference in `dtype` on leaves of the (rounded) inputs: (leaves, sinks leaf, outs, lses)."""
    q_list, k, v, _ = x.leaves(dtype)
    sinks = None if x.sinks is None else x.sinks.detach().to(dtype).requires_grad_(True)
    scale = sc.scale if sc.scale > 0 else 1.0 / math.sqrt(sc.dim)
    outs, lses = grouped_attention_reference(q_list, k, v, x.cu_q_list, x.cu_k, x.seqused, scale, sc.causal,
                                             sc.window, sc.softcap, sinks, x.shifts)
    return (q_list, k, v), sinks, outs, lses


def loss_of(outs: Sequence[Tensor], douts: Sequence[Tensor]) -> Tensor:
    return sum((o.double() * d).sum() for o, d in zip(outs, douts))


def assert_sink_gradient(name: str, got: Tensor, ref_hi: Tensor, ref_lp: Optional[Tensor], dtype: torch.dtype):
    """dsinks is float32 whatever the input dtype: a tight bound for float32 / float64 inputs
    (the LSE it is computed from is float32), FlashAttention's rule for the low-precision ones."""
    assert got is not None and got.dtype == torch.float32 and got.shape == ref_hi.shape, name
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got.double() - ref_hi.double()).abs().max().item()
    scale = max(1.0, ref_hi.abs().max().item())
    if dtype in LOW_PRECISION:
        base = (ref_lp.double() - ref_hi.double()).abs().max().item()
        bound = 2.0 * base + torch.finfo(dtype).eps * scale
    else:
        bound = 2e-5 * scale
    assert err <= bound, f"{name} ({dtype}): max|dsinks - ref| = {err:.3e} > {bound:.3e}"


# ---- forward and backward against the reference ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_forward_backward_against_reference(sc: Scenario, dtype: torch.dtype):
    x = make_inputs(sc, dtype)
    q_list, k, v, sinks = x.leaves(dtype)
    outs, lses = run_op(sc, x, q_list, k, v, sinks)

    ref_hi_leaves, sinks_hi, ref_hi, lse_hi = run_reference(sc, x, torch.float64)
    ref_lp_leaves, sinks_lp, ref_lp, _ = run_reference(sc, x, dtype)
    G = len(q_list)
    rows_without_keys = 0
    for g in range(G):
        assert_pass_rule(f"out[{g}]", outs[g], ref_hi[g], ref_lp[g])
        assert_lse_close(f"lse[{g}]", lses[g], lse_hi[g], tol=1e-5 if dtype == torch.float64 else 1e-4)
        if sinks is not None:
            # A row of a sequence without keys: lse is its head's sink exactly and out is 0.
            ninf_free = ~torch.isneginf(lse_hi[g])
            empty = (ref_hi[g].detach().abs().sum(-1).t() == 0) & ninf_free  # [Hq, total_q]
            heads, rows = torch.nonzero(empty, as_tuple=True)
            rows_without_keys += len(rows)
            assert torch.equal(lses[g][heads, rows], x.sinks[heads]), f"lse[{g}] of rows without keys"
            assert torch.all(outs[g][rows, heads] == 0)
    if sc.has_rows_without_keys:
        assert rows_without_keys > 0  # the scenario has them (causal, Lq > Lk)

    gen = torch.Generator().manual_seed(7)
    douts = [torch.randn(q.shape, generator=gen, dtype=torch.float64) for q in q_list]
    grads = torch.autograd.grad(loss_of(outs, douts), [*q_list, k, v] + ([sinks] if sinks is not None else []))
    refs_hi = torch.autograd.grad(loss_of(ref_hi, douts), [*ref_hi_leaves[0], *ref_hi_leaves[1:]]
                                  + ([sinks_hi] if sinks_hi is not None else []))
    refs_lp = torch.autograd.grad(loss_of(ref_lp, douts), [*ref_lp_leaves[0], *ref_lp_leaves[1:]]
                                  + ([sinks_lp] if sinks_lp is not None else []))
    names = [f"dq[{g}]" for g in range(G)] + ["dk", "dv"]
    for i, name in enumerate(names):
        assert_pass_rule(name, grads[i], refs_hi[i], refs_lp[i])
    if sinks is not None:
        assert_sink_gradient("dsinks", grads[-1], refs_hi[-1], refs_lp[-1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_backward_through_lse_with_window_softcap_sinks(dtype):
    """A loss that uses the LSE too (as when partial results are merged by their LSE): its
    gradient reaches q, k and the sinks through the softcap's derivative and the window."""
    sc = next(s for s in SCENARIOS if s.name == "groups2_seqused_shift_all")
    x = make_inputs(sc, dtype)
    q_list, k, v, sinks = x.leaves(dtype)
    outs, lses = run_op(sc, x, q_list, k, v, sinks)
    ref_leaves, sinks_hi, ref_outs, ref_lses = run_reference(sc, x, torch.float64)
    gen = torch.Generator().manual_seed(8)
    douts = [torch.randn(q.shape, generator=gen, dtype=torch.float64) for q in q_list]
    weights = [torch.randn(l.shape, generator=gen, dtype=torch.float64) for l in lses]

    def loss(outs, lses):
        lse_term = sum((torch.where(torch.isfinite(l.double()), l.double(), 0.0) * w).sum()
                       for l, w in zip(lses, weights))
        return loss_of(outs, douts) + lse_term

    got = torch.autograd.grad(loss(outs, lses), [*q_list, k, v, sinks])
    want = torch.autograd.grad(loss(ref_outs, ref_lses), [*ref_leaves[0], *ref_leaves[1:], sinks_hi])
    for name, a, b in zip(["dq[0]", "dq[1]", "dk", "dv"], got, want):
        assert_pass_rule(name, a, b, None)
    assert_sink_gradient("dsinks", got[-1], want[-1], None, dtype)


def test_gradcheck_float64():
    """torch.autograd.gradcheck of q, k, v on a tiny case with every feature (sinks fixed), and a
    central difference of the sinks' gradient (sinks are float32: steps of 2**-10 are exact)."""
    sc = Scenario("tiny", [[4, 3], [2, 3]], [5, 3], hq=2, hk=1, dim=8, causal=True, window=(2, -1), softcap=1.5,
                  sinks=True, seqused=[None, [4, 1]], shifts=[[1, 0], [0, -1]], scale=0.5)
    x = make_inputs(sc, torch.float64)
    q_list, k, v, _ = x.leaves(torch.float64)
    sinks = (torch.round(x.sinks * 64) / 64).float()  # multiples of 2**-6

    def fn(q0, q1, k, v):
        outs, _ = run_op(sc, x, [q0, q1], k, v, sinks)  # the LSE is float32: too coarse for gradcheck
        return tuple(outs)

    assert torch.autograd.gradcheck(fn, (*q_list, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)

    s = sinks.clone().requires_grad_(True)
    outs, _ = run_op(sc, x, q_list, k, v, s)
    gen = torch.Generator().manual_seed(9)
    douts = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    (dsinks,) = torch.autograd.grad(loss_of(outs, douts), [s])
    step = 2.0 ** -10
    for h in range(sc.hq):
        plus, minus = sinks.clone(), sinks.clone()
        plus[h] += step
        minus[h] -= step
        with torch.no_grad():
            f_plus = loss_of(run_op(sc, x, q_list, k, v, plus)[0], douts).item()
            f_minus = loss_of(run_op(sc, x, q_list, k, v, minus)[0], douts).item()
        numeric = (f_plus - f_minus) / (2 * step)
        assert abs(dsinks[h].item() - numeric) <= 1e-4 * max(1.0, abs(numeric)), (h, dsinks[h].item(), numeric)


# ---- the public API ------------------------------------------------------------------------------


def test_public_api_matches_the_op_and_the_reference():
    """flash_attn_varlen_func and grouped_flash_attn_varlen_func hand window_size, softcap and
    sinks to the op (same bits), which matches the reference; sinks.grad is filled."""
    sc = Scenario("public", [[40, 25]], [50, 25], hq=4, hk=2, causal=True, window=(10, 0), softcap=6.0, sinks=True)
    x = make_inputs(sc, torch.float32)
    q_list, k, v, sinks = x.leaves(torch.float32)
    out, lse, _ = flash_attn_varlen_func(q_list[0], k, v, x.cu_q_list[0], x.cu_k, x.max_q[0], x.max_k, causal=True,
                                         window_size=(10, 0), softcap=6.0, sinks=sinks, return_attn_probs=True)
    outs, lses = grouped_flash_attn_varlen_func(q_list, k, v, x.cu_q_list, x.cu_k, x.max_q, x.max_k, causal=True,
                                                window_size=(10, -1), softcap=6.0, sinks=sinks, return_lse=True)
    op_outs, op_lses = run_op(sc, x, q_list, k, v, sinks)
    assert torch.equal(out, op_outs[0]) and torch.equal(lse, op_lses[0])
    assert torch.equal(outs[0], op_outs[0]) and torch.equal(lses[0], op_lses[0])
    _, _, ref_outs, ref_lses = run_reference(sc, x, torch.float64)
    assert_pass_rule("out", out, ref_outs[0], None)
    assert_lse_close("lse", lse, ref_lses[0])
    (out.square().sum() + lse.sum()).backward()
    assert sinks.grad is not None and sinks.grad.shape == (4,) and torch.all(torch.isfinite(sinks.grad))
    assert sinks.grad.abs().sum() > 0


def test_grouped_python_matches_the_fused_kernel():
    """The G = 1 rewrite (K/V copied per group, tail sequences without keys) gives the fused op's
    results with a window, softcap and sinks too; tail rows keep lse = -inf, not the sink."""
    sc = next(s for s in SCENARIOS if s.name == "groups2_seqused_shift_all")
    x = make_inputs(sc, torch.float32)
    q_list, k, v, sinks = x.leaves(torch.float32)
    kw = dict(seqused_k_list=x.seqused, softmax_scale=sc.scale, causal=True, window_size=(8, 0), softcap=5.0,
              sinks=sinks)
    fused_outs, fused_lses = grouped_flash_attn_varlen_func(q_list, k, v, x.cu_q_list, x.cu_k, x.max_q, x.max_k,
                                                            return_lse=True, **kw)
    outs, lses = _flash_attn_varlen_forward_grouped(q_list, k, v, x.cu_q_list, x.cu_k, x.max_q, x.max_k, **kw)
    for g in range(2):
        torch.testing.assert_close(outs[g], fused_outs[g], rtol=0, atol=2e-6)
        assert torch.equal(torch.isneginf(lses[g]), torch.isneginf(fused_lses[g]))
        assert torch.isneginf(lses[g][:, -sc.extra_rows:]).all()
        finite = torch.isfinite(fused_lses[g])
        torch.testing.assert_close(lses[g][finite], fused_lses[g][finite], rtol=0, atol=2e-6)


def test_outputs_are_all_written():
    """fwd_into / bwd_into on NaN-poisoned outputs: every element written, the same bits as the op."""
    sc = next(s for s in SCENARIOS if s.name == "groups2_seqused_shift_all")
    x = make_inputs(sc, torch.float32)
    G = 2
    seqused = list(x.seqused)
    kw = dict(window_size=sc.window, softcap=sc.softcap, sinks=x.sinks, diagonal_shift_list=x.shifts)
    outs = [torch.full_like(q, math.nan) for q in x.q_list]
    lses = [torch.full((sc.hq, q.shape[0]), math.nan) for q in x.q_list]
    rfa_ops.fwd_into(x.q_list, x.k, x.v, x.cu_q_list, x.cu_k, seqused, x.max_q, x.max_k, sc.scale, True, outs, lses,
                     **kw)
    op_outs, op_lses = run_op(sc, x, x.q_list, x.k, x.v, x.sinks)
    for g in range(G):
        assert torch.equal(outs[g], op_outs[g]) and torch.equal(lses[g], op_lses[g])
    douts = [torch.randn_like(o) for o in outs]
    dqs = [torch.full_like(q, math.nan) for q in x.q_list]
    dk, dv = torch.full_like(x.k, math.nan), torch.full_like(x.v, math.nan)
    rfa_ops.bwd_into(douts, x.q_list, x.k, x.v, outs, lses, x.cu_q_list, x.cu_k, seqused, x.max_q, x.max_k, sc.scale,
                     True, False, dqs, dk, dv, **kw)
    for t in (*dqs, dk, dv):
        assert not torch.isnan(t).any()
    op_dqs, op_dk, op_dv = rfa_ops.grouped_bwd(douts, x.q_list, x.k, x.v, outs, lses, x.cu_q_list, x.cu_k, seqused,
                                               x.max_q, x.max_k, sc.scale, True, False, **{**kw, "window_size": [8, 0]})
    assert all(torch.equal(a, b) for a, b in zip(dqs, op_dqs)) and torch.equal(dk, op_dk) and torch.equal(dv, op_dv)


# ---- torch.library ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sinks_grad", [False, True], ids=["sinks", "sinks_grad"])
def test_opcheck_with_window_softcap_sinks_shift(sinks_grad):
    sc = next(s for s in SCENARIOS if s.name == "groups2_seqused_shift_all")
    x = make_inputs(sc, torch.float32)
    q_list, k, v, _ = x.leaves(torch.float32)
    sinks = x.sinks.clone().requires_grad_(sinks_grad)
    args = (q_list, k, v, x.cu_q_list, x.cu_k, list(x.seqused), x.max_q, x.max_k, sc.scale, True, False)
    kwargs = dict(window_size=[8, 0], softcap=5.0, sinks=sinks, diagonal_shift_list=x.shifts)
    torch.library.opcheck(rfa_ops.grouped_fwd, args, kwargs)
    outs, lses = rfa_ops.grouped_fwd(*args, **kwargs)
    douts = [torch.randn_like(o) for o in outs]
    bwd_args = (douts, [q.detach() for q in q_list], k.detach(), v.detach(), [o.detach() for o in outs],
                [l.detach() for l in lses], *args[3:])
    torch.library.opcheck(rfa_ops.grouped_bwd, bwd_args, {**kwargs, "sinks": sinks.detach()})


# ---- errors ----------------------------------------------------------------------------------------


def _small():
    sc = Scenario("errors", [[6]], [8], hq=4, hk=2, dim=16, causal=True)
    return sc, make_inputs(sc, torch.float32)


@pytest.mark.parametrize("window_size, causal, message", [
    ((-2, 0), False, r"^window_size: expected each side -1 \(unbounded\) or >= 0, got \(-2, 0\)"),
    ((3, -7), False, r"^window_size: expected each side -1 \(unbounded\) or >= 0, got \(3, -7\)"),
    ((4, 2), True, r"^window_size: expected a right side of -1 or 0 with causal=True .*got \(4, 2\)"),
    ((1.0, 0), False, r"^window_size: expected a \(left, right\) pair of ints"),
], ids=["left_minus2", "right_minus7", "causal_right2", "float"])
def test_bad_window_size(window_size, causal, message):
    _, x = _small()
    for call in (
        lambda: flash_attn_varlen_func(x.q_list[0], x.k, x.v, x.cu_q_list[0], x.cu_k, 6, 8, causal=causal,
                                       window_size=window_size),
        lambda: grouped_flash_attn_varlen_func(x.q_list, x.k, x.v, x.cu_q_list, x.cu_k, x.max_q, x.max_k,
                                               causal=causal, window_size=window_size),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("softcap, message", [
    (-1.0, r"^softcap: expected a finite float >= 0 \(0 = off\), got -1.0"),
    (math.nan, r"^softcap: expected a finite float >= 0 \(0 = off\), got nan"),
    (math.inf, r"^softcap: expected a finite float >= 0 \(0 = off\), got inf"),
    ("30", r"^softcap: expected a float >= 0 \(0 = off\), got '30'"),
    (1e-50, r"^softcap: expected a positive finite float whose float32 value is a normal number .*got 1e-50"),
], ids=["negative", "nan", "inf", "str", "float32_zero"])
def test_bad_softcap(softcap, message):
    _, x = _small()
    with pytest.raises(ValueError, match=message):
        flash_attn_varlen_func(x.q_list[0], x.k, x.v, x.cu_q_list[0], x.cu_k, 6, 8, softcap=softcap)


@pytest.mark.parametrize("make_sinks, message", [
    (lambda: torch.zeros(4, dtype=torch.float16), r"^sinks: expected dtype torch.float32, got torch.float16"),
    (lambda: torch.zeros(3), r"^sinks: expected shape \(4,\) \(\[num_heads_q\], the heads of q\), got \(3,\)"),
    (lambda: torch.zeros(1, 4), r"^sinks: expected shape \(4,\) .*got \(1, 4\)"),
    (lambda: torch.zeros(8)[::2], r"^sinks: expected a contiguous tensor, got stride 2"),
    (lambda: [0.0] * 4, r"^sinks: expected None or a float32 Tensor \[num_heads_q\], got list"),
    (lambda: torch.zeros(4, device="meta"), r"^sinks: expected a tensor on cpu .*got meta"),
], ids=["fp16", "short", "2d", "strided", "list", "device"])
def test_bad_sinks(make_sinks, message):
    _, x = _small()
    with pytest.raises(ValueError, match=message):
        flash_attn_varlen_func(x.q_list[0], x.k, x.v, x.cu_q_list[0], x.cu_k, 6, 8, sinks=make_sinks())


def test_refused_calls_write_nothing():
    """Bad values caught by the ops or by the library leave the outputs as they were; the messages
    name the ops' arguments (window_size[i], diagonal_shift_list[g])."""
    sc, x = _small()
    sentinel = 123.0
    outs = [torch.full_like(x.q_list[0], sentinel)]
    lses = [torch.full((4, 6), sentinel)]

    def fwd(**kw):
        rfa_ops.fwd_into(x.q_list, x.k, x.v, x.cu_q_list, x.cu_k, [None], x.max_q, x.max_k, 0.0, True, outs, lses,
                         **kw)

    cases = [
        (dict(window_size=(-3, 0)), r"^window_size\[0\]: expected an int in \[-1, 2147483647\] .*got -3"),
        (dict(window_size=(2, 2**31)), r"^window_size\[1\]: expected an int in \[-1, 2147483647\] .*got 2147483648"),
        (dict(window_size=(2, 5)), r"^window_size\[1\]: expected -1 or 0 with causal = 1 .*got 5"),
        (dict(window_size=(2,)), r"^window_size: expected a \(left, right\) pair of ints"),
        (dict(softcap=-2.0), r"^softcap: expected a positive finite float"),
        (dict(diagonal_shift_list=[None, None]), r"^diagonal_shift_list: expected 1 entries"),
        (dict(diagonal_shift_list=[torch.zeros(1, dtype=torch.int64)]),
         r"^diagonal_shift_list\[0\]: expected dtype torch.int32, got torch.int64"),
        (dict(diagonal_shift_list=[torch.zeros(2, dtype=torch.int32)]),
         r"^diagonal_shift_list\[0\]: expected 1 elements \(batch_size, one less than cu_seqlens_k\), got 2"),
        (dict(sinks=lses[0][0, :4]), r"^lse_list\[0\]: expected an output that shares no memory with the input sinks"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            fwd(**kw)
        assert torch.all(outs[0] == sentinel) and torch.all(lses[0] == sentinel), kw


def test_cuda_accepts_each_feature():
    """Both GPU tiers implement windows, softcap, sinks and diagonal shifts (capability flags in
    csrc/common/backends.h), so the CUDA workspace-size query, which needs no GPU, accepts each. A library built without CUDA refuses every CUDA call
    before reading these fields, so there is nothing to check then (the GoogleTest
    WindowSoftcapSinksValidation.CudaRefusesWhatItsKernelsLack covers CUDA builds as well)."""
    if not _lib.cuda_compiled():
        pytest.skip("libringattn built without CUDA: every CUDA call is refused before its fields are read")
    lib = _lib.get()
    q = torch.zeros(64, 2, 64, dtype=torch.bfloat16)
    kv = torch.zeros(64, 1, 64, dtype=torch.bfloat16)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    sinks = torch.zeros(2)
    shift = torch.zeros(1, dtype=torch.int32)

    def params(edit):
        p = _lib.FwdParams()
        p.exec.device_type = _lib.DEVICE_CUDA
        pr = p.problem
        pr.dtype, pr.batch_size, pr.num_heads_q, pr.num_heads_k = _lib.DTYPE_BF16, 1, 2, 1
        pr.head_dim, pr.num_groups, pr.default_softmax_scale, pr.causal = 64, 1, 1, 1
        pr.total_k, pr.max_seqlen_k, pr.cu_seqlens_k = 64, 64, cu.data_ptr()
        p.kv.k, p.kv.k_row_stride, p.kv.k_head_stride = kv.data_ptr(), 64, 64
        p.kv.v, p.kv.v_row_stride, p.kv.v_head_stride = kv.data_ptr(), 64, 64
        groups = (_lib.FwdGroup * 1)()
        g = groups[0]
        g.q, g.q_row_stride, g.q_head_stride = q.data_ptr(), 128, 64
        g.out_row_stride, g.out_head_stride = 128, 64  # the output's layout (its pointer may be NULL here)
        g.cu_seqlens_q, g.total_q, g.max_seqlen_q = cu.data_ptr(), 64, 64
        p.groups = groups
        edit(p, groups)
        return p, groups

    def window(p, g):
        p.problem.has_window, p.problem.window_left = 1, 16

    def softcap(p, g):
        p.problem.softcap = 30.0

    def with_sinks(p, g):
        p.problem.sinks = sinks.data_ptr()

    def with_shift(p, g):
        g[0].diagonal_shift = shift.data_ptr()

    for edit, field_name in ((window, "window_left/window_right"), (softcap, "softcap"), (with_sinks, "sinks"),
                             (with_shift, "diagonal_shift (group 0)")):
        p, groups = params(edit)
        size = ctypes.c_size_t(0)
        status = lib.ringattn_fwd_workspace_size(ctypes.byref(p), ctypes.byref(size))
        message = _lib.last_error()
        assert status == _lib.STATUS_OK, (field_name, status, message)
