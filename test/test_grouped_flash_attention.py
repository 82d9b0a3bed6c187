"""GPU correctness of the grouped varlen attention forward (marker ``gpu``).

Every check compares against an fp32 reference computed on the rounded inputs, with
FlashAttention's rule: max|out - ref_fp32| <= 2 * max|out_lowp - ref_fp32| + floor, where
out_lowp is the same reference math carried out in the test dtype. Inputs are fresh random
normals; the CUDA caching allocator is filled with NaN before each call so an output element the
kernel fails to write shows up as NaN; NaN never passes.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

from cases import cu_seqlens
from reference import grouped_attention_reference

from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func

pytestmark = pytest.mark.gpu

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = 1e-4


def _poison_allocator(device: torch.device, numel: int = 64 << 20) -> None:
    """Fill cached, free blocks with NaN so torch.empty in the op returns NaN-filled memory."""
    blob = torch.full((numel,), float("nan"), dtype=torch.float32, device=device)
    del blob


def _make(seqlens_q: List[List[int]], seqlens_k: List[int], hq: int, hk: int, d: int, dtype, device="cuda"):
    q_list = [torch.randn(sum(lq), hq, d, device=device, dtype=dtype) for lq in seqlens_q]
    k = torch.randn(sum(seqlens_k), hk, d, device=device, dtype=dtype)
    v = torch.randn(sum(seqlens_k), hk, d, device=device, dtype=dtype)
    cu_q = [cu_seqlens(lq, device) for lq in seqlens_q]
    cu_k = cu_seqlens(seqlens_k, device)
    return q_list, k, v, cu_q, cu_k


def _check(name: str, out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor) -> None:
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten element?)"
    err = (out.float() - ref32.float()).abs().max().item()
    base = (ref_lowp.float() - ref32.float()).abs().max().item()
    assert err <= 2 * base + FLOOR, f"{name}: max err {err:.3e} > 2 * {base:.3e} + {FLOOR}"


def _check_lse(name: str, lse: torch.Tensor, ref: torch.Tensor) -> None:
    assert not torch.isnan(lse).any(), f"{name}: NaN in lse"
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(lse), inf_ref), f"{name}: -inf rows differ"
    if (~inf_ref).any():
        err = (lse[~inf_ref] - ref[~inf_ref]).abs().max().item()
        assert err <= 2e-3, f"{name}: lse max err {err:.3e}"


def _run_and_check(seqlens_q, seqlens_k, hq, hk, d, dtype, causal, seqused=None, scale=None):
    q_list, k, v, cu_q, cu_k = _make(seqlens_q, seqlens_k, hq, hk, d, dtype)
    used = None
    if seqused is not None:
        used = [None if u is None else torch.tensor(u, dtype=torch.int32, device="cuda") for u in seqused]
    _poison_allocator(k.device)
    outs, lses = grouped_flash_attn_varlen_func(
        q_list, k, v, cu_q, cu_k, [max(l) for l in seqlens_q], max(seqlens_k),
        seqused_k_list=used, softmax_scale=scale, causal=causal, return_lse=True)
    torch.cuda.synchronize()
    ref32, lse32 = grouped_attention_reference(
        [q.float() for q in q_list], k.float(), v.float(), cu_q, cu_k, used, scale, causal)
    ref_lp, _ = grouped_attention_reference(q_list, k, v, cu_q, cu_k, used, scale, causal)
    for g in range(len(q_list)):
        _check(f"group {g}", outs[g], ref32[g], ref_lp[g])
        _check_lse(f"group {g}", lses[g], lse32[g])
    return q_list, k, v, cu_q, cu_k, used, outs


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_grouped_vs_separate_correctness(dtype, causal, head_dim):
    """Two zigzag groups (early / late chunk) in one call vs one call per group."""
    torch.manual_seed(0)
    c = 256  # chunk; world size 2, rank 0: early chunk sees c keys, late chunk sees 4c - 0*c
    seqlens_k = [4 * c]
    q_list, k, v, cu_q, cu_k, used, outs = _run_and_check(
        [[c], [c]], seqlens_k, 16, 4, head_dim, DTYPES[dtype], causal, seqused=[[c], [4 * c]])
    for g in range(2):
        sep = flash_attn_varlen_func(q_list[g], k[: used[g][0]], v[: used[g][0]], cu_q[g],
                                     cu_seqlens([int(used[g][0])], "cuda"), c, int(used[g][0]), causal=causal)
        diff = (sep.float() - outs[g].float()).abs().max().item()
        assert diff == 0.0 or diff < 1e-2, f"group {g}: grouped vs separate differ by {diff}"


@pytest.mark.parametrize("num_groups", [1, 2, 3, 4])
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (8, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_varlen_groups(dtype, causal, heads, num_groups):
    torch.manual_seed(num_groups)
    hq, hk = heads
    seqlens_k = [203, 1, 512, 64]
    base = [[113, 1, 300, 64], [1, 1, 17, 129], [239, 1, 512, 1], [64, 0, 65, 7]]
    _run_and_check(base[:num_groups], seqlens_k, hq, hk, 128, DTYPES[dtype], causal)


@pytest.mark.parametrize("lengths", [(1, 1), (113, 203), (239, 1), (128, 128), (1, 4096)],
                         ids=lambda x: f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("causal", [True, False])
def test_odd_lengths(lengths, causal):
    torch.manual_seed(7)
    lq, lk = lengths
    _run_and_check([[lq]], [lk], 4, 2, 64, torch.bfloat16, causal)


def test_overlapping_kv_ranges_and_seqused_zero():
    """Groups see different prefixes of one K/V (seqused_k), including none at all."""
    torch.manual_seed(3)
    _run_and_check([[100, 50], [100, 50], [30, 50]], [400, 100], 8, 2, 128, torch.bfloat16, True,
                   seqused=[[100, 100], [400, 0], None])


def test_custom_scale_and_strided_inputs():
    torch.manual_seed(5)
    d, hq, hk = 128, 8, 2
    qkv = torch.randn(300, hq + 2 * hk, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:]
    cu = cu_seqlens([100, 200], "cuda")
    _poison_allocator(q.device)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 200, 200, softmax_scale=0.3, causal=True)
    ref32, _ = grouped_attention_reference([q.float()], k.float(), v.float(), [cu], cu, None, 0.3, True)
    ref_lp, _ = grouped_attention_reference([q], k, v, [cu], cu, None, 0.3, True)
    _check("strided", out, ref32[0], ref_lp[0])


def test_large_logits_do_not_overflow():
    torch.manual_seed(11)
    q_list, k, v, cu_q, cu_k = _make([[256]], [512], 4, 4, 128, torch.float16)
    q_list = [q * 30 for q in q_list]
    out = flash_attn_varlen_func(q_list[0], k, v, cu_q[0], cu_k, 256, 512, causal=True)
    assert torch.isfinite(out).all()
    ref32, _ = grouped_attention_reference([q_list[0].float()], k.float(), v.float(), cu_q, cu_k, None, None, True)
    assert (out.float() - ref32[0]).abs().max().item() < 2e-2


def test_grouped_python_matches_fused():
    from ring_flash_attn.grouped_python import _flash_attn_varlen_forward_grouped

    torch.manual_seed(13)
    q_list, k, v, cu_q, cu_k = _make([[256, 64], [256, 100]], [1024, 100], 32, 8, 128, torch.bfloat16)
    used = [torch.tensor([256, 100], dtype=torch.int32, device="cuda"), None]
    fused, _ = grouped_flash_attn_varlen_func(q_list, k, v, cu_q, cu_k, [256, 100], 1024,
                                              seqused_k_list=used, return_lse=True)
    wrapped, _ = _flash_attn_varlen_forward_grouped(q_list, k, v, cu_q, cu_k, [256, 100], 1024,
                                                    seqused_k_list=used)
    for a, b in zip(fused, wrapped):
        assert (a.float() - b.float()).abs().max().item() < 1e-2


def test_cuda_graph_capture_and_current_stream():
    torch.manual_seed(17)
    q_list, k, v, cu_q, cu_k = _make([[512], [512]], [1024], 8, 2, 128, torch.bfloat16)
    used = [torch.tensor([512], dtype=torch.int32, device="cuda"), None]
    args = (q_list, k, v, cu_q, cu_k, [512, 512], 1024)
    eager = grouped_flash_attn_varlen_func(*args, seqused_k_list=used)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up on the side stream, as graph capture requires
            grouped_flash_attn_varlen_func(*args, seqused_k_list=used)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = grouped_flash_attn_varlen_func(*args, seqused_k_list=used)
    for q in q_list:
        q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    fresh = grouped_flash_attn_varlen_func(*args, seqused_k_list=used)
    for a, b, e in zip(captured, fresh, eager):
        assert torch.equal(a, b), "graph replay differs from an eager call on the same inputs"
        assert not torch.equal(a, e), "replay did not recompute on the new inputs"


def test_opcheck_cuda():
    torch.manual_seed(19)
    q_list, k, v, cu_q, cu_k = _make([[64, 3], [64, 5]], [128, 9], 4, 2, 64, torch.bfloat16)
    used = [None, torch.tensor([100, 9], dtype=torch.int32, device="cuda")]
    args = (q_list, k, v, cu_q, cu_k, used, [64, 5], 128, 0.0, True, False)
    torch.library.opcheck(torch.ops.ring_flash_attn.grouped_fwd.default, args)


# ---- backward ----------------------------------------------------------------------------------


def _grads(fn, inputs, douts):
    for t in inputs:
        t.grad = None
    outs = fn()
    torch.autograd.backward(outs, douts)
    return [t.grad.clone() for t in inputs]


def _backward_case(seqlens_q, seqlens_k, hq, hk, d, dtype, causal, seqused=None, deterministic=False):
    q_list, k, v, cu_q, cu_k = _make(seqlens_q, seqlens_k, hq, hk, d, dtype)
    used = None
    if seqused is not None:
        used = [None if u is None else torch.tensor(u, dtype=torch.int32, device="cuda") for u in seqused]
    leaves = [t.requires_grad_() for t in (*q_list, k, v)]
    douts = [torch.randn_like(q) for q in q_list]
    max_q = [max(l) for l in seqlens_q]

    def ours():
        return grouped_flash_attn_varlen_func(q_list, k, v, cu_q, cu_k, max_q, max(seqlens_k),
                                              seqused_k_list=used, causal=causal, deterministic=deterministic)

    def reference(cast):
        cq = [q.detach().to(cast).requires_grad_() for q in q_list]
        ck, cv = k.detach().to(cast).requires_grad_(), v.detach().to(cast).requires_grad_()
        outs, _ = grouped_attention_reference(cq, ck, cv, cu_q, cu_k, used, None, causal)
        torch.autograd.backward(outs, [g.to(cast) for g in douts])
        return [t.grad for t in (*cq, ck, cv)]

    _poison_allocator(k.device)
    got = _grads(ours, leaves, douts)
    ref32 = reference(torch.float32)
    ref_lp = reference(dtype)
    names = [f"dq[{g}]" for g in range(len(q_list))] + ["dk", "dv"]
    for name, a, r32, rlp in zip(names, got, ref32, ref_lp):
        _check(name, a, r32, rlp)
    return ours, leaves, douts, got


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_backward_grouped_vs_reference(dtype, causal, head_dim):
    """dQ per group, dK/dV summed over groups whose key ranges overlap (zigzag early/late)."""
    torch.manual_seed(head_dim)
    _backward_case([[256, 113], [256, 1]], [1024, 203], 16, 4, head_dim, DTYPES[dtype], causal,
                   seqused=[[256, 150], None])


@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (8, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("num_groups", [1, 3])
def test_backward_varlen_groups(heads, num_groups):
    torch.manual_seed(num_groups)
    base = [[113, 1, 300, 64], [1, 1, 17, 129], [239, 1, 512, 1]]
    _backward_case(base[:num_groups], [203, 1, 512, 64], heads[0], heads[1], 128, torch.bfloat16, True)


def test_backward_seqused_zero_and_single_tokens():
    torch.manual_seed(23)
    _backward_case([[1, 50, 1], [100, 1, 30]], [1, 400, 100], 8, 2, 128, torch.bfloat16, True,
                   seqused=[[1, 0, 100], [0, 400, 3]])


@pytest.mark.parametrize("head_dim", [128, 256])
def test_backward_deterministic_is_bit_identical(head_dim):
    torch.manual_seed(29)
    ours, leaves, douts, first = _backward_case([[512, 64], [512, 300]], [2048, 300], 16, 4, head_dim,
                                                torch.bfloat16, True, seqused=[[512, 64], None],
                                                deterministic=True)
    for _ in range(3):
        again = _grads(ours, leaves, douts)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "deterministic backward differs between runs"


def test_backward_lse_returning_and_compile():
    torch.manual_seed(31)
    q_list, k, v, cu_q, cu_k = _make([[128], [128]], [512], 8, 2, 64, torch.bfloat16)
    used = [torch.tensor([128], dtype=torch.int32, device="cuda"), None]

    def f(q0, q1, k, v):
        outs, lses = grouped_flash_attn_varlen_func([q0, q1], k, v, cu_q, cu_k, [128, 128], 512,
                                                    seqused_k_list=used, return_lse=True)
        return outs[0].float().sum() + (outs[1].float() * 2).sum() + lses[1].sum() * 0.1

    leaves = [t.requires_grad_() for t in (*q_list, k, v)]
    loss = f(*leaves)
    eager = torch.autograd.grad(loss, leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*leaves)
    grads_c = torch.autograd.grad(loss_c, leaves)
    for a, b in zip(eager, grads_c):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2)


# ---- kernel tiers (tier 2 = sm90a TMA + wgmma forward; tier 1 = mma.sync) ----------------------


def _is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("tier", ["sm80", "sm90"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_forced_tier_matches_reference(monkeypatch, tier, head_dim, causal):
    """Each tier on its own: varlen groups, odd lengths, GQA, sequences shorter than one tile."""
    if tier == "sm90" and not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)
    torch.manual_seed(head_dim + causal)
    _run_and_check([[300, 1, 129, 700], [77, 128, 5, 256]], [513, 129, 64, 1000], 16, 4, head_dim,
                   torch.bfloat16, causal, seqused=[None, [400, 0, 64, 999]])


@pytest.mark.parametrize("tier", ["auto", "sm80"])
def test_unused_kv_rows_may_hold_nan(monkeypatch, tier):
    """Keys past seqused_k (and past a sequence's end inside a tile) are never read into the
    output, even when they hold NaN: tier 2 loads whole tiles with TMA and zeroes those V rows."""
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)
    torch.manual_seed(17)
    d = 128
    seqlens_k = [300, 200]
    used = [torch.tensor([130, 77], dtype=torch.int32, device="cuda")]
    q_list, k, v, cu_q, cu_k = _make([[200, 150]], seqlens_k, 8, 2, d, torch.float16)
    k_nan, v_nan = k.clone(), v.clone()
    for b, (start, n_used) in enumerate([(0, 130), (300, 77)]):
        k_nan[start + n_used:start + seqlens_k[b]] = float("nan")
        v_nan[start + n_used:start + seqlens_k[b]] = float("nan")
    for causal in (True, False):
        _poison_allocator(k.device)
        outs = grouped_flash_attn_varlen_func(q_list, k_nan, v_nan, cu_q, cu_k, [200], 300,
                                              seqused_k_list=used, causal=causal)
        ref32, _ = grouped_attention_reference([q_list[0].float()], k.float(), v.float(), cu_q, cu_k, used, None,
                                               causal)
        ref_lp, _ = grouped_attention_reference(q_list, k, v, cu_q, cu_k, used, None, causal)
        _check(f"nan tail causal={causal}", outs[0], ref32[0], ref_lp[0])


@pytest.mark.parametrize("deterministic", [False, True], ids=["dq_default", "deterministic"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("tier", ["sm80", "sm90"])
def test_backward_of_a_partial_tile_ignores_the_rows_after_it(monkeypatch, tier, head_dim, causal, deterministic):
    """Sequence A's gradients are those of A alone when the rows after its last, partial query
    tile get a NaN output gradient (sequence B's rows, and padding rows after the last sequence):
    kernels load whole tiles of those rows (dO, LSE, Di), and must drop them by selection, never
    multiply them in (0 * NaN = NaN)."""
    if tier == "sm90" and not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)
    torch.manual_seed(31 + head_dim + 2 * causal)
    lens_q, lens_k, pad, hq, hk = [100, 70], [130, 90], 30, 8, 2  # A's last tile is partial at 64 and 128 rows
    # (and A's last key block at 64 and 128 keys)
    dtype = torch.bfloat16
    q = torch.randn(sum(lens_q) + pad, hq, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, head_dim, device="cuda", dtype=dtype)
    cu_q = cu_seqlens(lens_q, "cuda")
    cu_k = cu_seqlens(lens_k, "cuda")
    dout = torch.randn_like(q)
    dout[lens_q[0]:] = float("nan")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    _poison_allocator(k.device)
    out = grouped_flash_attn_varlen_func([q], k, v, [cu_q], cu_k, [max(lens_q)], max(lens_k), causal=causal,
                                         deterministic=deterministic)[0]
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    na, nk = lens_q[0], lens_k[0]
    cu_a = cu_seqlens([na], "cuda")
    cu_ka = cu_seqlens([nk], "cuda")

    def reference(cast):
        rq = q.detach()[:na].to(cast).requires_grad_()
        rk, rv = (t.detach()[:nk].to(cast).requires_grad_() for t in (k, v))
        outs, _ = grouped_attention_reference([rq], rk, rv, [cu_a], cu_ka, None, None, causal)
        torch.autograd.backward(outs, [dout[:na].to(cast)])
        return rq.grad, rk.grad, rv.grad

    ref32, ref_lp = reference(torch.float32), reference(dtype)
    for name, got, r32, rlp in zip(("dq of A", "dk of A's keys", "dv of A's keys"), (dq[:na], dk[:nk], dv[:nk]),
                                   ref32, ref_lp):
        _check(name, got, r32, rlp)


@pytest.mark.parametrize("deterministic", [False, True], ids=["dq_default", "deterministic"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("tier", ["sm80", "sm90"])
def test_backward_stats_rows_padded_past_total_q(monkeypatch, tier, head_dim, deterministic):
    """The backward keeps each head's LSE / Di row padded to a multiple of 4 tokens (tier 2's dK/dV
    kernel loads a tile's rows by TMA, which needs 16-byte aligned row strides): groups whose
    total_q is 3, 1, 2 and 1 past a multiple of 4, with a last tile running past total_q (TMA
    fills zeros there), rows that see no key (LSE +inf) and GQA, against the reference at every
    head (a head read at another head's offset would be wrong from the second head on). On tier 2
    head dims 64 and 128 run the dK/dV kernel's key-split main loop, 256 its head-split loop:
    both get the rows from the same producer (bwd_common.cuh)."""
    if tier == "sm90" and not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)
    torch.manual_seed(37 + head_dim + deterministic)
    _backward_case([[61, 2, 0], [130, 1, 6], [5, 197, 0], [0, 0, 1]], [150, 7, 260], 12, 4, head_dim,
                   torch.bfloat16, True, deterministic=deterministic)


@pytest.mark.parametrize("tier", ["sm80", "sm90"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_non_finite_rows_follow_ieee_like_the_cpu_backend(monkeypatch, tier, head_dim):
    """A NaN in one query row makes that row's O and LSE NaN (and only that row's); a row whose
    visible scores are all -inf (every key weighs 0) is empty, O = 0 and LSE = -inf; the backward
    of the NaN row is NaN in its dQ. The CPU backend follows the same rule (GoogleTest NonFinite*)."""
    if tier == "sm90" and not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)
    torch.manual_seed(23 + head_dim)
    lq, lk, hq, hk = 150, 200, 4, 2
    q = torch.randn(lq, hq, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(lk, hk, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(lk, hk, head_dim, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.tensor([0, lq], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, lk], dtype=torch.int32, device="cuda")
    nan_row, minf_row = 77, 120
    q[nan_row, 1, 5] = float("nan")
    k[:, 0, 0] = torch.rand(lk, device="cuda").to(torch.bfloat16) + 1.0  # every key's dim 0 > 0 (KV head 0)
    q[minf_row, 0] = 0.0
    q[minf_row, 0, 0] = float("-inf")  # head 0 of this row: every score -inf
    q.requires_grad_(True)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, lq, lk, causal=True, return_attn_probs=True)
    torch.cuda.synchronize()
    assert torch.isnan(out[nan_row, 1]).all() and torch.isnan(lse[1, nan_row]), "NaN row: O and LSE NaN"
    assert (out[minf_row, 0] == 0).all(), "all -inf row: O = 0"
    assert lse[0, minf_row] == float("-inf"), "all -inf row: LSE = -inf"
    other = torch.ones(lq, hq, dtype=torch.bool, device="cuda")
    other[nan_row, 1] = other[minf_row, 0] = False
    assert not torch.isnan(out.float()).any(dim=-1)[other].any(), "NaN leaked into other rows"
    assert not torch.isnan(lse.t()[other]).any(), "NaN leaked into other rows' LSE"
    out.float().sum().backward()
    assert torch.isnan(q.grad[nan_row, 1]).all(), "dQ of the NaN row is NaN"


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_tier2_forward_many_tiles_per_cta(monkeypatch, head_dim):
    """The persistent tier-2 forward: many more tiles than SMs, so every CTA walks many tiles of
    mixed lengths (its Q and K/V rings wrap across tiles, tiles without keys sit among them via
    seqused_k = 0), two groups, GQA; against the float32 reference."""
    if not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm90")
    torch.manual_seed(29 + head_dim)
    gen = torch.Generator().manual_seed(head_dim)
    lens_q = [[int(x) for x in torch.randint(1, 700, (48,), generator=gen)] for _ in range(2)]
    lens_k = [int(x) for x in torch.randint(1, 900, (48,), generator=gen)]
    seqused = [None, [0 if b % 7 == 0 else n for b, n in enumerate(lens_k)]]
    for causal in (True, False):
        _run_and_check(lens_q, lens_k, 16, 4, head_dim, torch.bfloat16, causal, seqused=seqused)


@pytest.mark.parametrize("section_keys", ["auto", "0", "300", "1"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tier2_forward_list_in_l2_sections(monkeypatch, head_dim, section_keys):
    """The persistent tier-2 forward's list by L2 sections (common/tile_order.h; forced with
    RING_FLASH_ATTN_TILE_SECTION_KEYS: 0 none, 300 keys, 1 as many sections as the list's sort
    holds; auto: the library's choice, a few sections for the causal call and none for the other):
    every tile computed once, whatever the order. Varlen, two groups, GQA, tiles without keys, causal and not, against the
    float32 reference."""
    if not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm90")
    if section_keys == "auto":
        monkeypatch.delenv("RING_FLASH_ATTN_TILE_SECTION_KEYS", raising=False)
    else:
        monkeypatch.setenv("RING_FLASH_ATTN_TILE_SECTION_KEYS", section_keys)
    torch.manual_seed(41 + head_dim)
    gen = torch.Generator().manual_seed(7 * head_dim + len(section_keys))
    lens_q = [[int(x) for x in torch.randint(1, 600, (40,), generator=gen)] for _ in range(2)]
    lens_k = [int(x) for x in torch.randint(1, 800, (40,), generator=gen)]
    seqused = [[0 if b % 9 == 4 else n for b, n in enumerate(lens_k)], None]
    for causal in (True, False):
        _run_and_check(lens_q, lens_k, 16, 4, head_dim, torch.bfloat16, causal, seqused=seqused)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_tier2_forward_sweep_shape_in_l2_sections(monkeypatch, head_dim):
    """The FlashAttention-3 sweep's short causal call (32 sequences of 512, 2048 hidden), whose
    automatic choice on an H100 / H200 (50 MB L2) has several L2 sections of sequences; the same
    call without sections gives the same output bit for bit (each tile's arithmetic does not depend
    on the order tiles run in)."""
    if not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm90")
    monkeypatch.delenv("RING_FLASH_ATTN_TILE_SECTION_KEYS", raising=False)
    torch.manual_seed(53 + head_dim)
    heads = 2048 // head_dim
    q_list, k, v, cu_q, cu_k = _make([[512] * 32], [512] * 32, heads, heads, head_dim, torch.bfloat16)
    outs = {}
    for keys in ("auto", "0"):
        if keys != "auto":
            monkeypatch.setenv("RING_FLASH_ATTN_TILE_SECTION_KEYS", keys)
        _poison_allocator(k.device)
        outs[keys] = flash_attn_varlen_func(q_list[0], k, v, cu_q[0], cu_k, 512, 512, causal=True)
    ref32, _ = grouped_attention_reference([q_list[0].float()], k.float(), v.float(), cu_q, cu_k, None, None, True)
    ref_lp, _ = grouped_attention_reference(q_list, k, v, cu_q, cu_k, None, None, True)
    _check("auto sections", outs["auto"], ref32[0], ref_lp[0])
    assert torch.equal(outs["auto"], outs["0"]), "the list's order changed a result"


def test_tiers_agree_on_a_long_sequence(monkeypatch):
    if not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    torch.manual_seed(19)
    q_list, k, v, cu_q, cu_k = _make([[4096]], [4096], 16, 4, 128, torch.bfloat16)
    outs = {}
    for tier in ("sm80", "sm90"):
        monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)
        outs[tier] = flash_attn_varlen_func(q_list[0], k, v, cu_q[0], cu_k, 4096, 4096, causal=True)
    ref32, _ = grouped_attention_reference([q_list[0].float()], k.float(), v.float(), cu_q, cu_k, None, None, True)
    ref_lp, _ = grouped_attention_reference(q_list, k, v, cu_q, cu_k, None, None, True)
    for tier, out in outs.items():
        _check(f"tier {tier}", out, ref32[0], ref_lp[0])
    assert (outs["sm80"].float() - outs["sm90"].float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("deterministic", [False, True], ids=["dq_default", "deterministic"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_tier2_backward_head_dim_256(monkeypatch, dtype, causal, deterministic):
    """The forced tier-2 backward at head dim 256 (the dK/dV kernel's head-split main loop and, in
    deterministic mode, the dQ kernel with 32-key blocks): two groups, GQA, seqused_k (0 too), odd
    lengths and sequences shorter than one tile, and one long sequence whose key blocks each see
    many query tiles of several heads and groups (the Q/dO stages and the P^T/dS^T buffers wrap
    many times); against the float32 reference, and bit-identical run to run when deterministic."""
    if not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm90")
    torch.manual_seed(37 + causal + 2 * deterministic)
    ours, leaves, douts, first = _backward_case([[1100, 1, 77, 200], [1100, 63, 5, 129]], [1100, 65, 130, 1],
                                                16, 4, 256, DTYPES[dtype], causal,
                                                seqused=[None, [1000, 0, 130, 1]], deterministic=deterministic)
    if deterministic:
        again = _grads(ours, leaves, douts)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "deterministic backward differs between runs"


def test_forced_tier2_runs_the_head_dim_256_backward(monkeypatch):
    """Tier 2 has the backward at every head dim now (it once refused head dim 256): forcing it
    runs the call, and its bits are the automatic tier's on an sm90 card (deterministic mode, so
    that the comparison can fail: tier 1 computes in another order)."""
    if not _is_sm90():
        pytest.skip("tier 2 needs an sm90 card")
    torch.manual_seed(23)
    q_list, k, v, cu_q, cu_k = _make([[256]], [256], 4, 4, 256, torch.bfloat16)
    leaves = [t.requires_grad_() for t in (q_list[0], k, v)]
    dout = torch.randn_like(q_list[0])
    grads = {}
    for tier in ("sm90", "auto"):
        monkeypatch.setenv("RING_FLASH_ATTN_TIER", tier)
        out = flash_attn_varlen_func(*leaves, cu_q[0], cu_k, 256, 256, causal=True, deterministic=True)
        grads[tier] = torch.autograd.grad(out, leaves, dout)
    for a, b in zip(grads["sm90"], grads["auto"]):
        assert torch.equal(a, b), "the automatic tier does not run tier 2's head-dim-256 backward"
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm90")
    _backward_case([[256]], [256], 4, 4, 256, torch.bfloat16, True)
