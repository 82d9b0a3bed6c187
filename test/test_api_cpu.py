"""The Python API and custom ops on the CPU backend, against the PyTorch reference.

Small shapes: the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from cases import (
    DTYPES,
    assert_lse_close,
    assert_pass_rule,
    dtype_id,
    make_case,
    reference,
)
from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func
from ring_flash_attn import ops as rfa_ops

HEAD_DIMS = [32, 64, 128]
GQA = {"mha": (4, 4), "gqa4": (8, 2), "mqa": (4, 1)}  # name -> (Hq, Hk)


def _seed(*params) -> int:
    """A fresh but reproducible seed per parametrization (str hashes are salted per process)."""
    return zlib.crc32(repr(params).encode()) % 100_000


def _group_seqlens(G, base_q):
    """Query lengths per group: group g drops a few tokens of each sequence (keeping >= 1), so
    groups differ; with causal bottom-right masks, shorter groups see their keys' suffix."""
    return [[max(1, n - 5 * g) for n in base_q] for g in range(G)]


def _check_forward(case, dtype, causal, softmax_scale=None, **kw):
    outs, lses = grouped_flash_attn_varlen_func(
        *case.api_args(), seqused_k_list=case.seqused_k_list, softmax_scale=softmax_scale,
        causal=causal, return_lse=True, **kw)
    _, ref_hi, lse_hi = reference(case, torch.float64, softmax_scale, causal)
    _, ref_lp, _ = reference(case, dtype, softmax_scale, causal)
    assert len(outs) == len(lses) == case.num_groups
    for g in range(case.num_groups):
        assert outs[g].dtype == dtype and outs[g].shape == case.q_list[g].shape
        assert_pass_rule(f"out[{g}]", outs[g], ref_hi[g], ref_lp[g])
        assert_lse_close(f"lse[{g}]", lses[g], lse_hi[g])
    return outs, lses


def _check_backward(case, dtype, causal, softmax_scale=None, seed=1, deterministic=False):
    G = case.num_groups
    gen = torch.Generator().manual_seed(seed)
    douts = [torch.randn(q.shape, generator=gen).to(dtype) for q in case.q_list]

    c = case.to(dtype, requires_grad=True)
    outs = grouped_flash_attn_varlen_func(
        *c.api_args(), seqused_k_list=c.seqused_k_list, softmax_scale=softmax_scale,
        causal=causal, deterministic=deterministic)
    grads = torch.autograd.grad(outs, [*c.q_list, c.k, c.v], douts)

    refs = {}
    for name, rdtype in (("hi", torch.float64), ("lp", dtype)):
        rc, routs, _ = reference(case, rdtype, softmax_scale, causal, requires_grad=True)
        refs[name] = torch.autograd.grad(
            routs, [*rc.q_list, rc.k, rc.v], [d.to(rdtype) for d in douts], allow_unused=True)
    names = [f"dq[{g}]" for g in range(G)] + ["dk", "dv"]
    for i, name in enumerate(names):
        hi = refs["hi"][i]
        lp = refs["lp"][i]
        if hi is None:  # no path in the reference (e.g. nothing attends): gradient is 0
            hi = torch.zeros_like(grads[i], dtype=torch.float64)
            lp = torch.zeros_like(grads[i])
        assert grads[i].dtype == dtype
        assert_pass_rule(name, grads[i], hi, lp)
    return grads


# ---- forward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(GQA), ids=list(GQA))
@pytest.mark.parametrize("num_groups", [1, 2, 3])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_matrix(dtype, head_dim, num_groups, heads, causal):
    Hq, Hk = GQA[heads]
    seqlens_k = [37, 1, 24]
    case = make_case(_group_seqlens(num_groups, [37, 1, 20]), seqlens_k, Hq, Hk, head_dim, dtype,
                     seed=_seed(dtype, head_dim, num_groups, heads, causal))
    _check_forward(case, dtype, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_forward_odd_lengths(dtype, causal):
    # (q, k) pairs (1, 1), (113, 203), (239, 1), (203, 113): Lq > Lk under a causal mask leaves
    # rows with no key (out 0, lse -inf).
    seqlens_k = [1, 203, 1, 113]
    base_q = [1, 113, 239, 203]
    case = make_case([base_q, [1, 100, 7, 113]], seqlens_k, 4, 2, 64, dtype, seed=3)
    _check_forward(case, dtype, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_forward_seqused_k(dtype):
    # Three groups over one K/V stream, each with its own key prefix per sequence, one of them 0.
    seqlens_k = [64, 33, 50]
    seqlens_q = [[16, 33, 10], [32, 20, 10], [64, 5, 50]]
    seqused = [[16, 0, 10], None, [64, 33, 25]]
    case = make_case(seqlens_q, seqlens_k, 4, 2, 32, dtype, seqused_k=seqused, seed=5)
    outs, lses = _check_forward(case, dtype, causal=True)
    # Group 0, sequence 1 sees no key: out 0 and lse -inf for all its rows.
    rows = slice(16, 16 + 33)
    assert torch.all(outs[0][rows] == 0)
    assert torch.all(torch.isneginf(lses[0][:, rows]))


def test_forward_lse_neg_inf_rows():
    # Causal with more queries than keys: the first Lq - Lk queries see nothing.
    case = make_case([[10]], [4], 2, 2, 32, torch.float32, seed=7)
    outs, lses = _check_forward(case, torch.float32, causal=True)
    assert torch.all(outs[0][:6] == 0)
    assert torch.all(torch.isneginf(lses[0][:, :6]))
    assert torch.all(torch.isfinite(lses[0][:, 6:]))


def test_forward_softmax_scale():
    case = make_case([[20, 9]], [20, 13], 4, 2, 64, torch.float32, seed=8)
    _check_forward(case, torch.float32, causal=True, softmax_scale=0.37)
    _check_forward(case, torch.float32, causal=False, softmax_scale=2.0)


def test_forward_strided_inputs():
    # q, k, v as head slices of one packed qkv tensor (token stride 8 heads * D): no copies.
    Hq, Hk, D = 4, 2, 32
    lens = [17, 30]
    T = sum(lens)
    qkv = torch.randn(T, Hq + 2 * Hk, D, dtype=torch.float32)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hk], qkv[:, Hq + Hk:]
    assert not q.is_contiguous()
    case = make_case([lens], lens, Hq, Hk, D, torch.float32)
    case.q_list, case.k, case.v = [q], k, v
    _check_forward(case, torch.float32, causal=True)
    # Head-major layout (heads outer, tokens inner) via a transposed view.
    qt = torch.randn(Hq, T, D).transpose(0, 1)
    case.q_list = [qt]
    _check_forward(case, torch.float32, causal=False)


def test_forward_fp64_default_scale_matches_library():
    # float64 (CPU backend only) against the float64 reference, tight.
    case = make_case([[13, 21], [5, 21]], [13, 21], 4, 1, 64, torch.float64, seed=9)
    _check_forward(case, torch.float64, causal=True)


def test_empty_group_and_empty_keys():
    # A group with no queries at all, and a batch whose only sequence has no keys.
    case = make_case([[0, 0], [5, 2]], [4, 3], 2, 2, 32, torch.float32, seed=22)
    c = case.to(torch.float32, requires_grad=True)
    outs, lses = _check_forward(case, torch.float32, causal=True)
    assert outs[0].shape == (0, 2, 32) and lses[0].shape == (2, 0)
    outs = grouped_flash_attn_varlen_func(*c.api_args())
    sum(o.sum() for o in outs).backward()  # the empty group's gradient is expanded and empty
    assert c.q_list[0].grad.shape == (0, 2, 32)
    assert torch.all(torch.isfinite(c.k.grad)) and c.k.grad.abs().sum() > 0

    case = make_case([[3]], [0], 2, 2, 32, torch.float32, seed=23)
    outs, lses = _check_forward(case, torch.float32, causal=False)
    assert torch.all(outs[0] == 0) and torch.all(torch.isneginf(lses[0]))


# ---- backward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", list(GQA), ids=list(GQA))
@pytest.mark.parametrize("num_groups", [1, 3])
@pytest.mark.parametrize("head_dim", [32, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_backward_matrix(dtype, head_dim, num_groups, heads, causal):
    Hq, Hk = GQA[heads]
    case = make_case(_group_seqlens(num_groups, [29, 1, 16]), [29, 1, 21], Hq, Hk, head_dim, dtype,
                     seed=_seed(dtype, head_dim, num_groups, heads, causal, "bwd"))
    _check_backward(case, dtype, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_backward_seqused_and_empty_rows(dtype):
    # Keys past every group's seqused_k get dk = dv = 0; rows without keys get dq = 0.
    seqlens_k = [40, 24]
    seqlens_q = [[12, 30], [40, 24], [8, 3]]
    seqused = [[12, 0], [40, 24], [30, 3]]
    case = make_case(seqlens_q, seqlens_k, 4, 2, 32, dtype, seqused_k=seqused, seed=11)
    grads = _check_backward(case, dtype, causal=True)
    dq0 = grads[0]
    assert torch.all(dq0[12:] == 0), "group 0, sequence 1 sees no key: dq must be 0"


def test_backward_odd_lengths():
    seqlens_k = [1, 203, 1]
    case = make_case([[1, 113, 239]], seqlens_k, 2, 1, 64, torch.bfloat16, seed=12)
    _check_backward(case, torch.bfloat16, causal=True)


def test_backward_deterministic_bitwise():
    case = make_case([[30, 17], [12, 17]], [30, 17], 8, 2, 64, torch.float32, seed=13)
    g1 = _check_backward(case, torch.float32, causal=True, deterministic=True)
    g2 = _check_backward(case, torch.float32, causal=True, deterministic=True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_backward_unused_group_output():
    # Only group 0 contributes to the loss: group 1 gets a zero output gradient.
    case = make_case([[9, 7], [9, 7]], [9, 7], 2, 2, 32, torch.float32, seed=14).to(
        torch.float32, requires_grad=True)
    outs = grouped_flash_attn_varlen_func(*case.api_args())
    outs[0].sum().backward()  # an expanded (stride-0) gradient for group 0
    assert torch.all(case.q_list[1].grad == 0)
    assert torch.all(torch.isfinite(case.q_list[0].grad)) and case.q_list[0].grad.abs().sum() > 0
    assert case.k.grad is not None and torch.all(torch.isfinite(case.k.grad))


@pytest.mark.parametrize("use_out", [True, False], ids=["out+lse", "lse_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_backward_through_lse(dtype, use_out):
    # A loss that uses LSE (as when partial results are merged by their LSE) gets its gradient
    # through it too; rows without keys (lse = -inf) are masked out of the loss.
    seqlens_k = [20, 9]
    seqlens_q = [[20, 12], [6, 9]]
    case = make_case(seqlens_q, seqlens_k, 4, 2, 32, dtype, seqused_k=[None, [6, 0]], seed=20)
    gen = torch.Generator().manual_seed(21)
    w = [torch.randn(q.shape, generator=gen, dtype=torch.float64) for q in case.q_list]
    u = [torch.randn(q.shape[1], q.shape[0], generator=gen, dtype=torch.float64) for q in case.q_list]

    def loss_fn(outs, lses):
        total = 0.0
        for g in range(len(outs)):
            lse = lses[g].double()
            total = total + (torch.where(torch.isfinite(lse), lse, 0.0) * u[g]).sum()
            if use_out:
                total = total + (outs[g].double() * w[g]).sum()
        return total

    c = case.to(dtype, requires_grad=True)
    outs, lses = grouped_flash_attn_varlen_func(
        *c.api_args(), seqused_k_list=c.seqused_k_list, causal=True, return_lse=True)
    assert lses[0].requires_grad
    got = torch.autograd.grad(loss_fn(outs, lses), [*c.q_list, c.k, c.v], allow_unused=True)
    refs = {}
    for name, rdtype in (("hi", torch.float64), ("lp", dtype)):
        rc, routs, rlses = reference(case, rdtype, None, True, requires_grad=True)
        refs[name] = torch.autograd.grad(loss_fn(routs, rlses), [*rc.q_list, rc.k, rc.v],
                                         allow_unused=True)
    for i, name in enumerate(["dq[0]", "dq[1]", "dk", "dv"]):
        if refs["hi"][i] is None:  # v does not reach LSE
            assert got[i] is None or torch.all(got[i] == 0)
            continue
        assert_pass_rule(name, got[i], refs["hi"][i], refs["lp"][i])


def test_unused_lse_costs_nothing_extra(monkeypatch):
    # The LSE gradient path (one extra forward and backward) runs only when LSE is used.
    case = make_case([[9]], [9], 2, 2, 32, torch.float32).to(torch.float32, requires_grad=True)
    calls = []
    orig = rfa_ops._add_lse_gradient
    monkeypatch.setattr(rfa_ops, "_add_lse_gradient", lambda *a: calls.append(1) or orig(*a))
    outs, lses = grouped_flash_attn_varlen_func(*case.api_args(), return_lse=True)
    outs[0].sum().backward()
    assert not calls
    outs, lses = grouped_flash_attn_varlen_func(*case.api_args(), return_lse=True)
    (outs[0].sum() + lses[0].sum()).backward()
    assert calls


def test_gradcheck_float64():
    case = make_case([[3, 2], [2, 1]], [3, 2], 2, 1, 8, torch.float64, seed=15)
    seqused = [None, torch.tensor([2, 1], dtype=torch.int32)]
    c = case.to(torch.float64, requires_grad=True)

    def fn(q0, q1, k, v):
        outs = grouped_flash_attn_varlen_func(
            [q0, q1], k, v, c.cu_seqlens_q_list, c.cu_seqlens_k, c.max_seqlen_q_list,
            c.max_seqlen_k, seqused_k_list=seqused, softmax_scale=0.5, causal=True)
        return tuple(outs)

    assert torch.autograd.gradcheck(fn, (*c.q_list, c.k, c.v), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---- torch.library: opcheck, torch.compile ------------------------------------------------------


def _opcheck_case(requires_grad):
    case = make_case([[5, 3], [4, 2]], [5, 3], 4, 2, 16, torch.float32, seed=16,
                     seqused_k=[None, [4, 2]])
    return case.to(torch.float32, requires_grad=requires_grad)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_grouped_fwd(requires_grad):
    c = _opcheck_case(requires_grad)
    torch.library.opcheck(rfa_ops.grouped_fwd, c.op_args(softmax_scale=0.0, causal=True))


def test_opcheck_grouped_fwd_no_seqused():
    c = _opcheck_case(True)
    c.seqused_k_list = None
    torch.library.opcheck(rfa_ops.grouped_fwd, c.op_args(softmax_scale=0.25, causal=False))


def test_opcheck_grouped_bwd():
    c = _opcheck_case(False)
    args = c.op_args(causal=True)
    outs, lses = rfa_ops.grouped_fwd(*args)
    douts = [torch.randn_like(o) for o in outs]
    (q_list, k, v, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det) = args
    torch.library.opcheck(
        rfa_ops.grouped_bwd,
        (douts, q_list, k, v, outs, lses, cu_q, cu_k, seqused, max_q, max_k, scale, causal, det))


def _compile_fn(q0, q1, k, v, cu_q0, cu_q1, cu_k, seqused1):
    outs, lses = grouped_flash_attn_varlen_func(
        [q0, q1], k, v, [cu_q0, cu_q1], cu_k, [5, 4], 5, seqused_k_list=[None, seqused1],
        causal=True, return_lse=True)
    return outs[0] * 2 + 1, outs[1].sum(), lses[1]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_forward(backend):
    c = _opcheck_case(False)
    args = (*c.q_list, c.k, c.v, *c.cu_seqlens_q_list, c.cu_seqlens_k, c.seqused_k_list[1])
    expected = _compile_fn(*args)
    torch._dynamo.reset()
    compiled = torch.compile(_compile_fn, fullgraph=True, backend=backend)
    got = compiled(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_fullgraph_forward_backward():
    c = _opcheck_case(True)
    args = (*c.q_list, c.k, c.v, *c.cu_seqlens_q_list, c.cu_seqlens_k, c.seqused_k_list[1])

    def loss_fn(*a):
        o0, s1, _ = _compile_fn(*a)
        return o0.square().sum() + s1

    expected = torch.autograd.grad(loss_fn(*args), [*c.q_list, c.k, c.v])
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), [*c.q_list, c.k, c.v])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- flash_attn_varlen_func --------------------------------------------------------------------


def test_flash_attn_varlen_func_matches_grouped_and_returns_like_flash_attn():
    case = make_case([[11, 6]], [11, 9], 4, 2, 64, torch.bfloat16, seed=17)
    q, k, v = case.q_list[0], case.k, case.v
    cu_q, cu_k = case.cu_seqlens_q_list[0], case.cu_seqlens_k
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 11, causal=True)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype
    res = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 11, causal=True, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 3
    out2, lse, s_dmask = res
    assert s_dmask is None
    assert lse.dtype == torch.float32 and lse.shape == (4, q.shape[0])
    assert torch.equal(out, out2)
    outs, lses = grouped_flash_attn_varlen_func([q], k, v, [cu_q], cu_k, [11], 11, causal=True,
                                                return_lse=True)
    assert torch.equal(out, outs[0]) and torch.equal(lse, lses[0])
    # flash-attn's default is causal=False.
    full = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 11, 11)
    _, ref_hi, _ = reference(case, torch.float64, causal=False)
    _, ref_lp, _ = reference(case, torch.bfloat16, causal=False)
    assert_pass_rule("out", full, ref_hi[0], ref_lp[0])


def test_flash_attn_varlen_func_backward():
    case = make_case([[11, 6]], [11, 9], 4, 4, 32, torch.float32, seed=18).to(
        torch.float32, requires_grad=True)
    q, k, v = case.q_list[0], case.k, case.v
    out = flash_attn_varlen_func(q, k, v, case.cu_seqlens_q_list[0], case.cu_seqlens_k, 11, 11,
                                 causal=True)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], dout)
    rc, routs, _ = reference(case, torch.float64, causal=True, requires_grad=True)
    exp = torch.autograd.grad(routs[0], [rc.q_list[0], rc.k, rc.v], dout.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, exp):
        assert_pass_rule(name, a, b, None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropout_p": 0.1}, "dropout_p"),
        ({"alibi_slopes": torch.ones(4)}, "alibi_slopes"),
        ({"block_table": torch.zeros(1, 1, dtype=torch.int32)}, "block_table"),
    ],
    ids=["dropout", "alibi", "block_table"],
)
def test_flash_attn_varlen_func_unsupported_features(kwargs, match):
    case = make_case([[8]], [8], 4, 2, 32, torch.float32)
    with pytest.raises(NotImplementedError, match=match):
        flash_attn_varlen_func(case.q_list[0], case.k, case.v, case.cu_seqlens_q_list[0],
                               case.cu_seqlens_k, 8, 8, **kwargs)


def test_threads_follow_torch():
    # The CPU backend runs on torch.get_num_threads() threads; results do not depend on it.
    case = make_case([[40, 23]], [40, 23], 4, 2, 64, torch.float32, seed=19)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = grouped_flash_attn_varlen_func(*case.api_args())[0]
        torch.set_num_threads(2)
        b = grouped_flash_attn_varlen_func(*case.api_args())[0]
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(a, b, rtol=0, atol=0)



@pytest.mark.parametrize("value, expected", [(None, 0), ("auto", 0), ("", 0), ("sm80", 80), ("SM90", 90), (" sm90 ", 90)])
def test_kernel_tier_from_environment(monkeypatch, value, expected):
    """RING_FLASH_ATTN_TIER picks ringattn_exec.tier for GPU calls (read at every call)."""
    from ring_flash_attn import ops

    if value is None:
        monkeypatch.delenv("RING_FLASH_ATTN_TIER", raising=False)
    else:
        monkeypatch.setenv("RING_FLASH_ATTN_TIER", value)
    assert ops._kernel_tier() == expected


def test_kernel_tier_rejects_unknown_names(monkeypatch):
    from ring_flash_attn import ops

    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm75")
    with pytest.raises(ValueError, match=r"RING_FLASH_ATTN_TIER: expected one of \['auto', 'sm80', 'sm90'\], got 'sm75'"):
        ops._kernel_tier()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_nan_in_one_query_reaches_its_row_and_the_gradients(dtype):
    """A NaN in one element of q makes that row's out and lse NaN and, through autograd, its dq
    and the dk, dv of every key it sees; rows and keys it does not touch keep their values
    (as on the GPU: a NaN is never mistaken for "this row sees no key")."""
    case = make_case([[9, 12]], [9, 14], 4, 2, 32, torch.float32, seed=31)
    clean = case.to(dtype, requires_grad=True)
    poisoned = case.to(dtype, requires_grad=True)
    with torch.no_grad():
        poisoned.q_list[0][4, 3, 7] = float("nan")  # sequence 0, row 4, head 3 (KV head 1)
    results = []
    for c in (clean, poisoned):
        (out,), (lse,) = grouped_flash_attn_varlen_func(*c.api_args(), causal=True, return_lse=True)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        results.append((out, lse, *torch.autograd.grad(out, [c.q_list[0], c.k, c.v], dout)))
    (out_c, lse_c, dq_c, dk_c, dv_c), (out, lse, dq, dk, dv) = results
    assert torch.isnan(out[4, 3]).all() and torch.isnan(lse[3, 4])
    assert torch.isnan(dq[4, 3]).all()
    # Causal bottom-right in sequence 0 (Lq 9, Lk 9): row 4 sees keys 0 .. 4, of KV head 1.
    assert torch.isnan(dk[:5, 1]).all() and torch.isnan(dv[:5, 1]).all()
    nan_rows = torch.zeros(out.shape[:2], dtype=torch.bool)
    nan_rows[4, 3] = True
    torch.testing.assert_close(out[~nan_rows], out_c[~nan_rows], rtol=0, atol=0)
    torch.testing.assert_close(dq[~nan_rows], dq_c[~nan_rows], rtol=0, atol=0)
    nan_keys = torch.zeros(dk.shape[:2], dtype=torch.bool)
    nan_keys[:5, 1] = True
    torch.testing.assert_close(dk[~nan_keys], dk_c[~nan_keys], rtol=0, atol=0)
    torch.testing.assert_close(dv[~nan_keys], dv_c[~nan_keys], rtol=0, atol=0)
    lse_mask = torch.ones_like(lse, dtype=torch.bool)
    lse_mask[3, 4] = False
    torch.testing.assert_close(lse[lse_mask], lse_c[lse_mask], rtol=0, atol=0)


def test_overflowing_fp32_scores_are_not_zeros():
    """fp32 q and k of 1e20 overflow q.k to +inf: out is NaN (inf - inf), as IEEE arithmetic
    gives, never the zeros of a row that sees no key."""
    case = make_case([[6]], [6], 2, 2, 16, torch.float32, seed=32)
    q = case.q_list[0].abs() * 1e20
    k = case.k.abs() * 1e20
    out, lse, _ = flash_attn_varlen_func(q, k, case.v, case.cu_seqlens_q_list[0], case.cu_seqlens_k,
                                         6, 6, return_attn_probs=True)
    assert torch.isnan(out).all() and torch.isnan(lse).all()
