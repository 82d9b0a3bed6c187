"""GPU local attention (window_size), diagonal shifts, logit softcap and sink logits (marker ``gpu``).

Both kernel tiers (forced with $RING_FLASH_ATTN_TIER) and the automatic choice, against a float64
reference computed on the GPU from the definitions (test/reference.py) on the rounded inputs:
forward out / lse, backward dq / dk / dv through autograd, and the sinks' gradient. Low-precision
results pass FlashAttention's rule (error at most twice that of the same math in fp16 / bf16, plus
one rounding unit); the LSE is fp32 and close in absolute terms. Inputs are fresh random normals,
the caching allocator is filled with NaN before each call (an output element left unwritten shows
up as NaN) and NaN never passes.

Cases: windows (0, 0), (1, 1), (0, wide), small, larger than the sequence, one-sided, asymmetric,
causal with a window (edges on block boundaries too); diagonal shifts (whole query tiles without
keys included, at the start and past the last key); softcap; sinks (rows without keys: out = 0
and lse = the sink exactly); GQA, MQA, varlen, two groups with seqused_k; head dims 64 / 128 /
256; fp16 / bf16; the deterministic backward run to run; key blocks outside every window holding
NaN (they must never be read).

Tier 2 (sm90a) has every variant (fixed masks, kLocal, kLocal with the softcap) at every head
dim, forward and backward (head dim 256: the dK/dV kernel's head-split main loop and a dQ kernel
with 32-key blocks); a call forced onto a tier-2 kernel that does not exist would fail with
NotImplementedError naming why (TIER2_NO_BACKWARD_HEAD_DIMS, now empty). On an sm90 card the
automatic choice runs the feature calls on tier 2 (checked bit for bit against the forced tier),
and long windows walk many key blocks that start far past block 0 (both tier-2 pipelines wrap
several times).
"""

from __future__ import annotations

import math
import zlib
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor

from cases import FeatureInputs as Inputs, FeatureScenario as Scenario  # shared with the CPU feature tests
from cases import assert_pass_rule, cu_seqlens
from reference import grouped_attention_reference

from ring_flash_attn import flash_attn_varlen_func, ops_implementation
from ring_flash_attn import ops as rfa_ops

pytestmark = pytest.mark.gpu

DEVICE = "cuda"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = [64, 128, 256]

# Head dims where tier 2 has no backward (tier 1 runs it): none since the head-dim-256 backward.
TIER2_NO_BACKWARD_HEAD_DIMS: Tuple[int, ...] = ()

# Tier 2's refusal ("exec.tier: RINGATTN_TIER_SM90 requested, but tier 2 cannot run ...").
TIER2_REFUSES_FORWARD = r"tier 2 cannot run this call: no tier-2 kernel compiled for this dtype and head_dim"
TIER2_REFUSES_BACKWARD = r"tier 2 cannot run this backward: no tier-2 kernel compiled for this dtype and head_dim"
# How torch.ops raises libringattn's "unsupported": NotImplementedError from the Python kernels;
# with the C++ kernels (libringattn_torch) its base class RuntimeError, same message (a kernel under
# PyTorch's stable ABI cannot raise NotImplementedError; docs/api.md, "The ops").
OP_REFUSAL = NotImplementedError if ops_implementation("cuda") == "ctypes" else RuntimeError


# ---- cases -------------------------------------------------------------------------------------


SCENARIOS = [
    Scenario("window_0_0", [[300]], [300], window=(0, 0)),
    Scenario("window_1_1_gqa", [[257]], [300], hq=8, hk=2, window=(1, 1)),
    Scenario("window_small_causal_long", [[700, 130]], [700, 130], causal=True, window=(64, -1)),
    Scenario("window_asymmetric_varlen", [[500, 77, 1]], [450, 100, 1], window=(129, 17)),
    Scenario("window_larger_than_sequence", [[200, 64]], [260, 64], window=(1000, 900)),
    Scenario("window_larger_than_sequence_causal", [[200]], [260], causal=True, window=(1000, -1)),
    # Lq > Lk with causal: the first rows, whole query tiles among them, see no key.
    Scenario("window_left_rows_without_keys", [[400]], [100], causal=True, window=(9, -1),
             has_rows_without_keys=True),
    Scenario("window_right_only", [[300]], [200], window=(-1, 40)),
    # Tier 2's kLocal kernels mask a block by each row's key run (common/mask.h key_run_from):
    # a left side of 0 with a wide right one; a window edge on block boundaries (rows see 129
    # keys, 128-key blocks); rows whose window starts past the sequence's last key (their run's
    # start lies beyond its end, which the sequence's length caps).
    Scenario("window_left_0_right_wide", [[260]], [390], window=(0, 100)),
    Scenario("window_block_aligned_causal", [[512]], [512], causal=True, window=(128, -1)),
    Scenario("window_rows_past_last_key", [[300]], [300], window=(20, 5), shifts=[[150]],
             has_rows_without_keys=True),
    # Sides near INT32_MAX (a common spelling of "unbounded"): row + diagonal + side must not wrap
    # in the kernels' int32 arithmetic (it did: such rows got O = 0, LSE = -inf).
    Scenario("window_int32_max_right", [[300, 90]], [260, 90], window=(64, 2**31 - 1)),
    Scenario("window_int32_max_both_shift", [[256]], [384], window=(2**31 - 1, 2**31 - 1), shifts=[[100]]),
    Scenario("shift_causal", [[300, 90]], [400, 90], causal=True, shifts=[[-150, 40]]),
    Scenario("shift_window_two_sided_mqa", [[256, 64]], [512, 64], hq=4, hk=1, window=(30, 70), shifts=[[200, -10]]),
    Scenario("softcap_causal", [[384]], [384], causal=True, softcap=5.0, q_amplitude=4.0),
    Scenario("softcap_no_mask_gqa", [[200, 77]], [260, 90], hq=8, hk=2, softcap=20.0, q_amplitude=4.0),
    Scenario("sinks_causal_rows_without_keys", [[300, 40]], [100, 50], causal=True, sinks=True,
             has_rows_without_keys=True),
    Scenario("sinks_no_mask", [[200]], [333], sinks=True),
    # A shift that leaves the first query tiles without keys (their LSE is the sink).
    Scenario("sinks_shift_empty_tiles", [[512]], [512], causal=True, window=(16, -1), sinks=True, shifts=[[-300]],
             has_rows_without_keys=True),
    Scenario("groups_seqused_everything", [[300, 120], [64, 250]], [380, 250], hq=8, hk=2, causal=True,
             window=(40, -1), softcap=8.0, sinks=True, seqused=[None, [300, 100]], shifts=[[5, -7], None],
             q_amplitude=2.0, scale=0.09),
]
SCENARIO_IDS = [sc.name for sc in SCENARIOS]


def _is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _use_tier(monkeypatch, tier: str) -> None:
    if tier == "sm90" and not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)


def _tier2_runs(sc: Scenario, head_dim: int, forward: bool) -> bool:
    """Whether tier 2 has the kernel of the call (every variant; no backward at some head dims)."""
    return forward or head_dim not in TIER2_NO_BACKWARD_HEAD_DIMS


def _poison_allocator(device: torch.device, numel: int = 64 << 20) -> None:
    """Fill cached, free blocks with NaN so torch.empty in the op returns NaN-filled memory."""
    blob = torch.full((numel,), float("nan"), dtype=torch.float32, device=device)
    del blob


def make_inputs(sc: Scenario, head_dim: int, dtype: torch.dtype, seed_extra: str = "") -> Inputs:
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(f"{sc.name}/{head_dim}/{dtype}{seed_extra}".encode()))

    def randn(*shape, amplitude=1.0):
        return (amplitude * torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32)).to(dtype)

    q_list = [randn(sum(lens), sc.hq, head_dim, amplitude=sc.q_amplitude) for lens in sc.seqlens_q]
    total_k = sum(sc.seqlens_k)
    k, v = randn(total_k, sc.hk, head_dim), randn(total_k, sc.hk, head_dim)
    douts = [randn(*q.shape) for q in q_list]

    def as_int32(rows):
        if rows is None:
            return None
        return [None if r is None else torch.tensor(r, dtype=torch.int32, device=DEVICE) for r in rows]

    sinks = None
    if sc.sinks:
        # Around the scores' scale, most heads' sink above most scores: the sink takes a visible share.
        sinks = torch.randn(sc.hq, generator=gen, device=DEVICE) + torch.linspace(-1.0, 3.0, sc.hq, device=DEVICE)
    return Inputs(q_list, k, v, [cu_seqlens(lens, DEVICE) for lens in sc.seqlens_q], cu_seqlens(sc.seqlens_k, DEVICE),
                  as_int32(sc.seqused), as_int32(sc.shifts), sinks, [max(lens) for lens in sc.seqlens_q],
                  max(sc.seqlens_k), douts)


def run_op(sc: Scenario, x: Inputs, q_list, k, v, sinks, deterministic: bool = False):
    """The grouped op (autograd included) with the scenario's mask, softcap, sinks and shifts."""
    seqused = list(x.seqused) if x.seqused is not None else [None] * len(q_list)
    return rfa_ops.grouped_fwd(q_list, k, v, x.cu_q_list, x.cu_k, seqused, x.max_q, x.max_k, sc.scale, sc.causal,
                               deterministic, window_size=list(sc.window), softcap=sc.softcap, sinks=sinks,
                               diagonal_shift_list=x.shifts)


def run_reference(sc: Scenario, x: Inputs, dtype: torch.dtype, head_dim: int):
    """(leaves, sinks leaf, outs, lses) of the reference in `dtype` on the rounded inputs."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (*x.q_list, x.k, x.v)]
    sinks = None if x.sinks is None else x.sinks.detach().to(dtype).requires_grad_()
    scale = sc.scale if sc.scale > 0 else 1.0 / math.sqrt(head_dim)
    G = len(x.q_list)
    outs, lses = grouped_attention_reference(leaves[:G], leaves[G], leaves[G + 1], x.cu_q_list, x.cu_k, x.seqused,
                                             scale, sc.causal, sc.window, sc.softcap, sinks, x.shifts)
    return leaves, sinks, outs, lses


def references(sc: Scenario, x: Inputs, dtype: torch.dtype, head_dim: int):
    """run_reference in float64 (the reference) and in the test dtype (the same math in low
    precision, for the pass rule)."""
    return run_reference(sc, x, torch.float64, head_dim), run_reference(sc, x, dtype, head_dim)


def fresh_leaves(x: Inputs) -> Tuple[List[Tensor], Optional[Tensor]]:
    """Copies of q per group, k and v (one list) and of the sinks (None without) that require grad."""
    leaves = [t.clone().requires_grad_() for t in (*x.q_list, x.k, x.v)]
    sinks = None if x.sinks is None else x.sinks.clone().requires_grad_()
    return leaves, sinks


def run_op_on(sc: Scenario, x: Inputs, leaves: List[Tensor], sinks: Optional[Tensor], deterministic: bool = False):
    """run_op on fresh_leaves' list (q per group, k, v), the allocator refilled with NaN first."""
    G = len(x.q_list)
    _poison_allocator(x.k.device)
    return run_op(sc, x, leaves[:G], leaves[G], leaves[G + 1], sinks, deterministic)


def assert_lse_close(name: str, lse: Tensor, ref: Tensor, softcap: float) -> None:
    """fp32 LSE: -inf exactly where the reference has it; elsewhere within 1e-4 * max(1, |ref|),
    plus, with a softcap, the error of the hardware tanh the kernels use (relative error about
    2^-11 of each capped logit, at most softcap * 2^-11)."""
    assert lse.dtype == torch.float32 and lse.shape == ref.shape, name
    assert not torch.isnan(lse).any(), f"{name}: NaN"
    ref = ref.detach().float()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), f"{name}: rows with lse = -inf differ"
    finite = torch.isfinite(ref)
    if finite.any():
        err = (lse[finite].double() - ref[finite].double()).abs().max().item()
        bound = 1e-4 * max(1.0, ref[finite].abs().max().item()) + softcap * 2.0 ** -10
        assert err <= bound, f"{name}: max|lse - ref| = {err:.3e} > {bound:.3e}"


def assert_sink_gradient(name: str, got: Tensor, ref_hi: Tensor, ref_lp: Tensor) -> None:
    """dsinks (fp32, computed by the op's autograd from out, dout and lse) by the pass rule."""
    assert got is not None and got.dtype == torch.float32 and got.shape == ref_hi.shape, name
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got.double() - ref_hi.double()).abs().max().item()
    base = (ref_lp.double() - ref_hi.double()).abs().max().item()
    bound = 2.0 * base + torch.finfo(ref_lp.dtype).eps * max(1.0, ref_hi.abs().max().item())
    assert err <= bound, f"{name}: max|dsinks - ref| = {err:.3e} > {bound:.3e}"


def check_forward(sc: Scenario, x: Inputs, outs, lses, hi, lp) -> None:
    """out by the pass rule, lse close (hi, lp: the references' results); rows without keys:
    out = 0 and lse = the head's sink exactly (or -inf without sinks, which assert_lse_close
    checks)."""
    _, _, ref_hi, lse_hi = hi
    ref_lp = lp[2]
    rows_without_keys = 0
    for g in range(len(outs)):
        assert_pass_rule(f"out[{g}]", outs[g], ref_hi[g], ref_lp[g])
        assert_lse_close(f"lse[{g}]", lses[g], lse_hi[g], sc.softcap)
        empty = ref_hi[g].detach().abs().sum(-1).t() == 0  # [Hq, total_q]: the reference's rows without keys
        heads, rows = torch.nonzero(empty, as_tuple=True)
        rows_without_keys += len(rows)
        assert torch.all(outs[g][rows, heads] == 0), f"out[{g}] of rows without keys"
        if x.sinks is not None:
            assert torch.equal(lses[g][heads, rows], x.sinks[heads]), f"lse[{g}] of rows without keys"
    if sc.has_rows_without_keys:
        assert rows_without_keys > 0, f"{sc.name}: the case has no row without keys"


def assert_gradients(x: Inputs, grads: Sequence[Tensor], hi, lp) -> None:
    """The op's gradients (dq per group, dk, dv, then dsinks if given) by the pass rule against
    autograd through the references (hi, lp: the references' leaves, sinks and outputs)."""
    G = len(x.q_list)
    with_sinks = len(grads) > G + 2
    hi_leaves, hi_sinks, ref_hi, _ = hi
    lp_leaves, lp_sinks, ref_lp, _ = lp
    want_hi = torch.autograd.grad(ref_hi, hi_leaves + ([hi_sinks] if with_sinks else []),
                                  [d.double() for d in x.douts])
    want_lp = torch.autograd.grad(ref_lp, lp_leaves + ([lp_sinks] if with_sinks else []), x.douts)
    for i, name in enumerate([f"dq[{g}]" for g in range(G)] + ["dk", "dv"]):
        assert_pass_rule(name, grads[i], want_hi[i], want_lp[i])
    if with_sinks:
        assert_sink_gradient("dsinks", grads[-1], want_hi[-1], want_lp[-1])


# ---- forward and backward against the reference, per tier ----------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("sc", SCENARIOS, ids=SCENARIO_IDS)
@pytest.mark.parametrize("tier", ["sm80", "sm90"])
def test_forward_backward_against_reference(monkeypatch, tier: str, sc: Scenario, head_dim: int, dtype: str):
    _use_tier(monkeypatch, tier)
    dt = DTYPES[dtype]
    x = make_inputs(sc, head_dim, dt)
    leaves, sinks = fresh_leaves(x)
    if tier == "sm90" and not _tier2_runs(sc, head_dim, forward=True):
        with pytest.raises(OP_REFUSAL, match=TIER2_REFUSES_FORWARD):
            run_op_on(sc, x, leaves, sinks)
        return
    outs, lses = run_op_on(sc, x, leaves, sinks)
    hi, lp = references(sc, x, dt, head_dim)
    check_forward(sc, x, outs, lses, hi, lp)

    inputs = leaves + ([sinks] if sinks is not None else [])
    if tier == "sm90" and not _tier2_runs(sc, head_dim, forward=False):
        with pytest.raises(OP_REFUSAL, match=TIER2_REFUSES_BACKWARD):
            torch.autograd.grad(outs, inputs, x.douts)
        return
    _poison_allocator(x.k.device)
    assert_gradients(x, torch.autograd.grad(outs, inputs, x.douts), hi, lp)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("sc", [s for s in SCENARIOS if s.name in ("window_small_causal_long", "softcap_causal",
                                                                   "groups_seqused_everything")],
                         ids=lambda s: s.name)
def test_automatic_tier_matches_reference(monkeypatch, sc: Scenario, head_dim: int):
    """The default tier choice runs every feature call (tier 1 where tier 2 lacks the kernel)."""
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "auto")
    dt = torch.bfloat16
    x = make_inputs(sc, head_dim, dt, "/auto")
    leaves, sinks = fresh_leaves(x)
    outs, lses = run_op_on(sc, x, leaves, sinks)
    hi, lp = references(sc, x, dt, head_dim)
    check_forward(sc, x, outs, lses, hi, lp)
    inputs = leaves + ([sinks] if sinks is not None else [])
    assert_gradients(x, torch.autograd.grad(outs, inputs, x.douts), hi, lp)


# ---- deterministic backward ------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tier", ["sm80", "sm90"])
def test_deterministic_backward_is_bit_identical(monkeypatch, tier: str, head_dim: int):
    """Window, shifts, softcap, sinks, two groups: the deterministic backward gives the same bits
    on every run (and matches the reference)."""
    _use_tier(monkeypatch, tier)
    sc = next(s for s in SCENARIOS if s.name == "groups_seqused_everything")
    if tier == "sm90" and not (_tier2_runs(sc, head_dim, forward=True) and _tier2_runs(sc, head_dim, forward=False)):
        pytest.skip("tier 2 has no backward at this head dim (test_forward_backward_against_reference checks "
                    "that it refuses it)")
    dt = torch.bfloat16
    x = make_inputs(sc, head_dim, dt, "/deterministic")
    G = len(x.q_list)
    leaves, sinks = fresh_leaves(x)
    runs = []
    for _ in range(3):
        outs, _ = run_op_on(sc, x, leaves, sinks, deterministic=True)
        runs.append(torch.autograd.grad(outs, leaves + [sinks], x.douts))
    for again in runs[1:]:
        for name, a, b in zip([f"dq[{g}]" for g in range(G)] + ["dk", "dv", "dsinks"], runs[0], again):
            assert torch.equal(a, b), f"{name}: the deterministic backward differs between runs"
    assert_gradients(x, runs[0], *references(sc, x, dt, head_dim))


# ---- key blocks outside every window are skipped --------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["dq_default", "deterministic"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tier", ["sm80", "sm90"])
def test_key_blocks_outside_the_window_are_never_read(monkeypatch, tier: str, head_dim: int, deterministic: bool):
    """128 query rows whose windows (16 keys left of the diagonal, causal) cover only keys
    [880, 1024) of 1024: keys [0, 700) lie in key blocks (of at most 128 keys, either tier) that no
    query tile needs. They hold NaN, which any read would spread (0 * NaN); every output must stay
    finite, match the reference on the clean keys, and dK = dV = 0 there."""
    _use_tier(monkeypatch, tier)
    sc = Scenario("skip", [[128]], [1024], hq=4, hk=2, causal=True, window=(16, -1))
    if tier == "sm90" and not _tier2_runs(sc, head_dim, forward=True):
        pytest.skip("tier 2 has no backward at this head dim (test_forward_backward_against_reference checks "
                    "that it refuses it)")
    dt = torch.bfloat16
    x = make_inputs(sc, head_dim, dt, "/skip")
    k_nan, v_nan = x.k.clone(), x.v.clone()
    k_nan[:700] = float("nan")
    v_nan[:700] = float("nan")
    leaves = [x.q_list[0].clone().requires_grad_(), k_nan.requires_grad_(), v_nan.requires_grad_()]
    outs, lses = run_op_on(sc, x, leaves, None, deterministic=deterministic)
    hi, lp = references(sc, x, dt, head_dim)
    check_forward(sc, x, outs, lses, hi, lp)
    if tier == "sm90" and not _tier2_runs(sc, head_dim, forward=False):
        return  # the forward is what tier 2 runs here
    grads = torch.autograd.grad(outs, leaves, x.douts)
    assert_gradients(x, grads, hi, lp)
    assert torch.all(grads[1][:700] == 0) and torch.all(grads[2][:700] == 0)


# ---- the public API ---------------------------------------------------------------------------------


def test_public_api_on_the_gpu():
    """flash_attn_varlen_func with window_size, softcap and sinks: the op's bits, the reference's
    values, and sinks.grad filled."""
    sc = Scenario("public", [[300, 77]], [260, 100], hq=8, hk=2, causal=True, window=(50, 0), softcap=6.0,
                  sinks=True, q_amplitude=2.0)
    dt = torch.bfloat16
    x = make_inputs(sc, 128, dt, "/public")
    q, k, v = (t.clone().requires_grad_() for t in (x.q_list[0], x.k, x.v))
    sinks = x.sinks.clone().requires_grad_()
    out, lse, _ = flash_attn_varlen_func(q, k, v, x.cu_q_list[0], x.cu_k, x.max_q[0], x.max_k, causal=True,
                                         window_size=(50, 0), softcap=6.0, sinks=sinks, return_attn_probs=True)
    op_outs, op_lses = run_op(sc, x, [q], k, v, sinks)
    assert torch.equal(out, op_outs[0]) and torch.equal(lse, op_lses[0])
    check_forward(sc, x, [out], [lse], *references(sc, x, dt, 128))
    (out.float() * x.douts[0].float()).sum().backward()
    assert sinks.grad is not None and torch.all(torch.isfinite(sinks.grad)) and sinks.grad.abs().sum() > 0
    assert all(t.grad is not None and torch.all(torch.isfinite(t.grad)) for t in (q, k, v))


# ---- tier 2: the automatic choice and long walks --------------------------------------------------


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("sc", [s for s in SCENARIOS if s.name in ("window_asymmetric_varlen", "softcap_causal",
                                                                   "sinks_shift_empty_tiles",
                                                                   "groups_seqused_everything")],
                         ids=lambda s: s.name)
def test_automatic_tier_runs_tier2_on_sm90(monkeypatch, sc: Scenario, head_dim: int):
    """On an sm90 card the automatic choice runs the feature calls on tier 2: its forward and its
    deterministic backward give the bits of the forced tier-2 call (tier 1 computes in another
    order and would not)."""
    if not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    dt = torch.bfloat16
    x = make_inputs(sc, head_dim, dt, "/auto_is_tier2")
    results = {}
    for tier in ("auto", "sm90", "sm80"):
        monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)
        leaves, sinks = fresh_leaves(x)
        outs, lses = run_op_on(sc, x, leaves, sinks, deterministic=True)
        grads = torch.autograd.grad(outs, leaves + ([sinks] if sinks is not None else []), x.douts)
        results[tier] = (list(outs), list(lses), list(grads))
    for part, name in enumerate(("out", "lse", "grad")):
        for a, b in zip(results["auto"][part], results["sm90"][part]):
            assert torch.equal(a, b), f"{sc.name}: the automatic tier's {name} differs from tier 2's"
    # The check can fail: tier 1 gives other bits for the same call.
    assert any(not torch.equal(a, b) for a, b in zip(results["sm80"][0], results["sm90"][0])), \
        f"{sc.name}: tier 1 and tier 2 outputs are bit-identical, the comparison shows nothing"


LONG_SCENARIOS = [
    # Many key blocks per query tile, the first one past block 0, so both pipelines wrap several
    # times from a tile's first block (forward: 2 stages, dQ kernel: 3); a shift on top.
    Scenario("long_window_causal_shift", [[2048]], [2560], hq=4, hk=1, causal=True, window=(700, -1),
             shifts=[[-100]]),
    # Two-sided window with softcap and sinks over long rows.
    Scenario("long_window_two_sided_softcap_sinks", [[1536, 300]], [1536, 500], hq=4, hk=2, window=(400, 250),
             softcap=10.0, sinks=True, q_amplitude=2.0),
    # The benchmark's window row, (4096, 0): tiles of 4096 + 128 keys (33 key blocks), which the
    # forward runs on its persistent kernel (cuda/fwd_grid_choice.h) when there are more tiles
    # than SMs: 48 x 4 = 192 here, against 132 SMs on an H100 / H200.
    Scenario("long_window_4096_causal_persistent", [[6144]], [6144], hq=4, hk=2, causal=True, window=(4096, -1)),
]


def _varlen_lengths(seed: int, count: int, high: int) -> List[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(1, high, (count,), generator=gen)]


# The persistent forward's list by L2 sections (common/tile_order.h): window calls with many more
# tiles than SMs (40 sequences, 16 query heads), costs varying inside each sequence.
SECTION_SCENARIOS = [
    Scenario("sections_causal_window_shift_sinks", [_varlen_lengths(1, 40, 600), _varlen_lengths(2, 40, 600)],
             _varlen_lengths(3, 40, 700), hq=16, hk=4, causal=True, window=(200, -1), sinks=True,
             shifts=[None, [(b % 5) * 37 - 60 for b in range(40)]]),
    Scenario("sections_two_sided_softcap", [_varlen_lengths(4, 40, 500)], _varlen_lengths(5, 40, 500), hq=16, hk=2,
             window=(130, 70), softcap=12.0, seqused=[[0 if b % 8 == 3 else n for b, n in
                                                       enumerate(_varlen_lengths(5, 40, 500))]]),
]


@pytest.mark.parametrize("section_keys", ["auto", "1", "257"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("sc", SECTION_SCENARIOS, ids=lambda s: s.name)
def test_tier2_forward_list_in_l2_sections(monkeypatch, sc: Scenario, head_dim: int, section_keys: str):
    """Window calls on the persistent tier-2 forward with its list in L2 sections (auto: the
    library's choice; forced with RING_FLASH_ATTN_TILE_SECTION_KEYS: 1 key asks for as many sections
    as the list's sort holds, 257 for sections of a few sequences): the forward against the
    reference."""
    _use_tier(monkeypatch, "sm90")
    if section_keys == "auto":
        monkeypatch.delenv("RING_FLASH_ATTN_TILE_SECTION_KEYS", raising=False)
    else:
        monkeypatch.setenv("RING_FLASH_ATTN_TILE_SECTION_KEYS", section_keys)
    dt = torch.bfloat16
    x = make_inputs(sc, head_dim, dt, "/sections" + section_keys)
    leaves, sinks = fresh_leaves(x)
    with torch.no_grad():
        outs, lses = run_op_on(sc, x, leaves, sinks)
    hi, lp = references(sc, x, dt, head_dim)
    check_forward(sc, x, outs, lses, hi, lp)


@pytest.mark.parametrize("deterministic", [False, True], ids=["dq_default", "deterministic"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("sc", LONG_SCENARIOS, ids=lambda s: s.name)
def test_tier2_long_windows(monkeypatch, sc: Scenario, head_dim: int, deterministic: bool):
    """Tier 2 on windows that start many blocks past key 0 and span many blocks: forward and
    backward (both dQ paths) against the reference."""
    _use_tier(monkeypatch, "sm90")
    dt = torch.float16
    x = make_inputs(sc, head_dim, dt, "/long")
    leaves, sinks = fresh_leaves(x)
    outs, lses = run_op_on(sc, x, leaves, sinks, deterministic=deterministic)
    hi, lp = references(sc, x, dt, head_dim)
    check_forward(sc, x, outs, lses, hi, lp)
    inputs = leaves + ([sinks] if sinks is not None else [])
    _poison_allocator(x.k.device)
    assert_gradients(x, torch.autograd.grad(outs, inputs, x.douts), hi, lp)
