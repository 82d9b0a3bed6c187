"""Ring-style variants (``ring_*``, ``zigzag_ring_*``, ``stripe_*``, batched and varlen) on the CPU
backend: gloo process groups of 2 and 4 ranks.

Every distributed case draws a random global batch [B, N L, H, D] (the same on every rank),
computes single-process full attention on it with the pure-PyTorch reference (test/reference.py,
float64, autograd for the gradients), shards it into the variant's layout, runs the variant on
every rank and checks the rank's out, LSE, dQ, dK and dV against the matching shard of the
reference. One ``torch.multiprocessing`` spawn per world size runs all of its cases; each case is
reported by its own pytest test. Argument errors and the single-process (no process group) path
are tested without spawning.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List

import pytest
import torch

import ring_flash_attn as rfa
from dist_harness import record_check, rel_err, SpawnedCases
from reference import grouped_attention_reference
from cases import case_dict

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 180

_FUNCS = {
    "ring": (rfa.ring_flash_attn_func, rfa.ring_flash_attn_kvpacked_func, rfa.ring_flash_attn_qkvpacked_func),
    "zigzag": (rfa.zigzag_ring_flash_attn_func, rfa.zigzag_ring_flash_attn_kvpacked_func,
               rfa.zigzag_ring_flash_attn_qkvpacked_func),
    "stripe": (rfa.stripe_flash_attn_func, rfa.stripe_flash_attn_kvpacked_func,
               rfa.stripe_flash_attn_qkvpacked_func),
}

_BASE = dict(B=2, Hq=4, Hk=2, D=8, dtype="float64", causal=True, scale=None, packed=None, deterministic=False,
             varlen=None)


def _case(case_id, layout, L, **kw):
    """L: local tokens per rank (global length N L)."""
    return case_dict(_BASE, kw, id=f"{layout}-{case_id}", layout=layout, L=L)


def _cases() -> List[dict]:
    return [
        _case("gqa-causal-odd", "ring", 3),
        _case("gqa-noncausal-fp32-scale", "ring", 4, causal=False, dtype="float32", scale=0.3),
        _case("kvpacked-mqa", "ring", 5, Hq=4, Hk=1, packed="kv", B=1),
        _case("qkvpacked-deterministic", "ring", 4, Hq=2, Hk=2, packed="qkv", deterministic=True),
        _case("gqa-causal-odd-chunks", "zigzag", 6),
        _case("gqa-noncausal", "zigzag", 4, causal=False),
        _case("kvpacked-fp32", "zigzag", 2, packed="kv", dtype="float32", B=3),
        _case("qkvpacked", "zigzag", 6, Hq=2, Hk=2, packed="qkv"),
        _case("gqa-causal-odd", "stripe", 5),
        _case("gqa-noncausal", "stripe", 3, causal=False),
        _case("qkvpacked-fp32", "stripe", 4, Hq=2, Hk=2, packed="qkv", dtype="float32"),
        _case("kvpacked-len1", "stripe", 1, packed="kv"),
        # varlen forms: global sequence lengths (multiples of N, resp. 2N, times `lens` units)
        _case("varlen-gqa-causal", "ring", None, varlen=[3, 1, 4]),
        _case("varlen-mqa-noncausal-fp32", "ring", None, varlen=[2, 5], Hk=1, causal=False, dtype="float32"),
        _case("varlen-kvpacked-empty-seq", "ring", None, varlen=[2, 0, 3], packed="kv"),
        _case("varlen-qkvpacked", "ring", None, varlen=[1, 3], Hq=2, Hk=2, packed="qkv"),
        _case("varlen-gqa-causal", "zigzag", None, varlen=[3, 1, 2]),
        _case("varlen-gqa-causal-fp32-scale", "zigzag", None, varlen=[2, 3], dtype="float32", scale=0.4),
        _case("varlen-kvpacked-empty-seq", "zigzag", None, varlen=[1, 0, 2], packed="kv"),
        _case("varlen-qkvpacked-noncausal", "zigzag", None, varlen=[2, 1], Hq=2, Hk=2, packed="qkv",
              causal=False),
    ]


CASES: Dict[int, List[dict]] = {2: _cases(), 4: _cases()}

# max |error| allowed, relative to max(1, max |reference|). The LSE the kernels return is float32,
# so the merge of the partial outputs (and the backward's P = exp(S - lse)) is accurate to float32
# even for float64 inputs.
_TOL = {"float64": 2e-6, "float32": 5e-5}
_QUANTITIES = ("out", "lse", "dq", "dk", "dv")


def _shard_errors(got, ref, shard: Callable, lse_dim: int) -> Dict[str, float]:
    """rel_err of each of out, lse, dq, dk, dv (got) against this rank's shard of its full
    reference (ref, same order): shard(t) selects the rank's tokens, shard(t, lse_dim) the lse's."""
    return {name: rel_err(x, shard(r, lse_dim) if name == "lse" else shard(r))
            for name, x, r in zip(_QUANTITIES, got, ref)}


def _layout_index(layout: str, r: int, N: int, L: int) -> torch.Tensor:
    """Global token indices held by rank r (local order)."""
    if layout == "ring":
        return torch.arange(r * L, (r + 1) * L)
    if layout == "zigzag":
        c = L // 2
        return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * N - 1 - r) * c, (2 * N - r) * c)])
    return torch.arange(L) * N + r  # stripe



def _reference(q, k, v, dout, scale, causal):
    """Full attention on [B, S, H, D] float64 tensors: (out, lse [B, H, S], dq, dk, dv)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32)
    (out,), (lse,) = grouped_attention_reference(
        [ins[0].reshape(B * S, Hq, D)], ins[1].reshape(B * S, Hk, D), ins[2].reshape(B * S, Hk, D), [cu], cu,
        None, scale, causal)
    out = out.view(B, S, Hq, D)
    grads = torch.autograd.grad(out, ins, dout)
    return (out.detach(), lse.view(Hq, B, S).permute(1, 0, 2)) + tuple(grads)


_VARLEN_FUNCS = {
    "ring": (rfa.ring_flash_attn_varlen_func, rfa.ring_flash_attn_varlen_kvpacked_func,
             rfa.ring_flash_attn_varlen_qkvpacked_func),
    "zigzag": (rfa.zigzag_ring_flash_attn_varlen_func, rfa.zigzag_ring_flash_attn_varlen_kvpacked_func,
               rfa.zigzag_ring_flash_attn_varlen_qkvpacked_func),
}


def _varlen_index(layout: str, lens: List[int], r: int, N: int) -> torch.Tensor:
    """Global rows held by rank r (local order) of packed sequences of global lengths `lens`."""
    parts, start = [], 0
    for L in lens:
        if layout == "ring":
            n = L // N
            parts.append(torch.arange(start + r * n, start + (r + 1) * n))
        else:
            c = L // (2 * N)
            parts += [torch.arange(start + r * c, start + (r + 1) * c),
                      torch.arange(start + (2 * N - 1 - r) * c, start + (2 * N - r) * c)]
        start += L
    return torch.cat(parts)


def _run_varlen_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    dtype = getattr(torch, case["dtype"])
    Hq, Hk, D = case["Hq"], case["Hk"], case["D"]
    unit = world_size if case["layout"] == "ring" else 2 * world_size
    lens = [unit * m for m in case["varlen"]]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    total = int(cu[-1])
    gen = torch.Generator().manual_seed(seed)
    q_full, dout_full = (torch.randn(total, Hq, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k_full, v_full = (torch.randn(total, Hk, D, generator=gen, dtype=torch.float64) for _ in range(2))
    q_full, k_full, v_full, dout_full = (t.to(dtype).double() for t in (q_full, k_full, v_full, dout_full))
    ins = [t.clone().requires_grad_(True) for t in (q_full, k_full, v_full)]
    (ref_out,), (ref_lse,) = grouped_attention_reference([ins[0]], ins[1], ins[2], [cu], cu, None, case["scale"],
                                                         case["causal"])
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, ins, dout_full)
    idx = _varlen_index(case["layout"], lens, rank, world_size)
    cu_local = torch.div(cu, world_size, rounding_mode="floor").to(torch.int32)
    max_local = max(lens) // world_size

    def shard(t, dim=0):
        return t.index_select(dim, idx)

    func, kvpacked, qkvpacked = _VARLEN_FUNCS[case["layout"]]
    kw = dict(softmax_scale=case["scale"], causal=case["causal"], return_attn_probs=True)
    q, k, v, dout = (shard(t).to(dtype) for t in (q_full, k_full, v_full, dout_full))
    if case["packed"] == "kv":
        q.requires_grad_(True)
        kv = torch.stack([k, v], dim=1).requires_grad_(True)
        out, lse, none = kvpacked(q, kv, cu_local, max_local, **kw)
        dq, dkv = torch.autograd.grad(out, (q, kv), dout)
        dk, dv = dkv[:, 0], dkv[:, 1]
    elif case["packed"] == "qkv":
        qkv = torch.stack([q, k, v], dim=1).requires_grad_(True)
        out, lse, none = qkvpacked(qkv, cu_local, max_local, **kw)
        (dqkv,) = torch.autograd.grad(out, (qkv,), dout)
        dq, dk, dv = dqkv.unbind(1)
    else:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        out, lse, none = func(q, k, v, cu_local, max_local, **kw)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert none is None
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (Hq, q.shape[0])
    return _shard_errors((out, lse, dq, dk, dv), (ref_out, ref_lse, ref_dq, ref_dk, ref_dv), shard, lse_dim=1)


def _run_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    if case["varlen"] is not None:
        return _run_varlen_case(case, seed, rank, world_size)
    dtype = getattr(torch, case["dtype"])
    B, Hq, Hk, D, L = case["B"], case["Hq"], case["Hk"], case["D"], case["L"]
    S = world_size * L
    gen = torch.Generator().manual_seed(seed)
    q_full, dout_full = (torch.randn(B, S, Hq, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k_full, v_full = (torch.randn(B, S, Hk, D, generator=gen, dtype=torch.float64) for _ in range(2))
    if case["packed"] == "qkv":
        k_full, v_full = (torch.randn(B, S, Hq, D, generator=gen, dtype=torch.float64) for _ in range(2))
    q_full, k_full, v_full, dout_full = (t.to(dtype).double() for t in (q_full, k_full, v_full, dout_full))
    ref = _reference(q_full, k_full, v_full, dout_full, case["scale"], case["causal"])
    idx = _layout_index(case["layout"], rank, world_size, L)

    def shard(t, dim=1):
        return t.index_select(dim, idx)

    func, kvpacked, qkvpacked = _FUNCS[case["layout"]]
    kw = dict(softmax_scale=case["scale"], causal=case["causal"], deterministic=case["deterministic"],
              return_attn_probs=True)
    q, k, v, dout = (shard(t).to(dtype) for t in (q_full, k_full, v_full, dout_full))
    if case["packed"] == "kv":
        q.requires_grad_(True)
        kv = torch.stack([k, v], dim=2).requires_grad_(True)
        out, lse, none = kvpacked(q, kv, **kw)
        dq, dkv = torch.autograd.grad(out, (q, kv), dout)
        dk, dv = dkv[:, :, 0], dkv[:, :, 1]
    elif case["packed"] == "qkv":
        qkv = torch.stack([q, k, v], dim=2).requires_grad_(True)
        out, lse, none = qkvpacked(qkv, **kw)
        (dqkv,) = torch.autograd.grad(out, (qkv,), dout)
        dq, dk, dv = dqkv.unbind(2)
        if case["deterministic"]:  # bit-identical run to run
            (again,) = torch.autograd.grad(qkvpacked(qkv, **kw)[0], (qkv,), dout)
            assert torch.equal(again, dqkv)
    else:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        out, lse, none = func(q, k, v, **kw)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        # return_attn_probs=False gives the output alone, the same values
        out2 = func(q.detach(), k.detach(), v.detach(), softmax_scale=case["scale"], causal=case["causal"])
        assert isinstance(out2, torch.Tensor) and torch.equal(out2, out.detach())
    assert none is None
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    return _shard_errors((out, lse, dq, dk, dv), ref, shard, lse_dim=2)


def _overlap_check(rank: int, world_size: int) -> List[str]:
    """Order of P2P posts, waits and kernels in one causal ring forward + backward."""
    import torch.distributed as dist

    from ring_flash_attn import ops
    from ring_flash_attn.cp.ring_comm import RingComm

    events: List[str] = []
    saved = (dist.batch_isend_irecv, ops.grouped_fwd, ops.grouped_bwd, RingComm.wait)

    def post(p2p):
        events.append(f"post{p2p[0].tag}")
        return saved[0](p2p)

    def kernel(fn, tag):
        def wrapped(*args, **kwargs):
            events.append(tag)
            return fn(*args, **kwargs)
        return wrapped

    def wait(pending):
        events.append("wait")
        return saved[3](pending)

    dist.batch_isend_irecv = post
    ops.grouped_fwd = kernel(saved[1], "fwd")
    ops.grouped_bwd = kernel(saved[2], "bwd")
    RingComm.wait = staticmethod(wait)
    try:
        q = torch.randn(1, 4, 2, 8, dtype=torch.float32, requires_grad=True)  # fp64 adds LSE forwards
        out = rfa.ring_flash_attn_func(q, q, q, causal=False)
        events.append("|")
        torch.autograd.grad(out, (q,), torch.ones_like(out))
    finally:
        dist.batch_isend_irecv = saved[0]
        ops.grouped_fwd, ops.grouped_bwd = saved[1], saved[2]
        RingComm.wait = staticmethod(saved[3])
    return events


# N = 2, non-causal: the next block's K/V transfer (tag 11) is posted before the current block's
# kernel; the dK/dV transfer (tag 12) of a block is waited for after the next block's kernel.
EXPECTED_ORDER_2 = "post11 fwd wait fwd | post11 bwd post12 wait bwd wait post12 wait"


def _subgroup_check(seed: int) -> str:
    """A sub-group (here of the whole world) is used through its group ranks: the same results as
    the default group ("" or what differs)."""
    import torch.distributed as dist

    sub = dist.new_group([0, 1])
    x = torch.randn(1, 4, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    a = rfa.zigzag_ring_flash_attn_func(x, x, x, causal=True, group=sub)
    b = rfa.zigzag_ring_flash_attn_func(x, x, x, causal=True)
    return "" if torch.equal(a, b) else "results differ"


def _two_rank_checks(rank: int, world_size: int, seed: int, results: dict) -> None:
    """With two ranks: the overlap order and a sub-group call, into results["order"] / ["subgroup"]
    ("" or the failure)."""
    if world_size != 2:
        return
    record_check(results, "order", lambda: " ".join(_overlap_check(rank, world_size)))
    record_check(results, "subgroup", lambda: _subgroup_check(seed))


_results = SpawnedCases("ring", CASES, _run_case, _SEED, _SPAWN_TIMEOUT_S, _QUANTITIES, _TOL, _two_rank_checks)


@pytest.mark.parametrize("world_size,case", _results.params())
def test_ring_variant_matches_full_attention(world_size, case, spawn_root):
    _results.assert_within(world_size, case, spawn_root)


def test_ring_overlap_order_two_ranks(spawn_root):
    _results.assert_each_rank(2, spawn_root, "order", EXPECTED_ORDER_2)


def test_ring_subgroup_two_ranks(spawn_root):
    _results.assert_each_rank(2, spawn_root, "subgroup", "")


# ---- single process (no process group: world size 1) ---------------------------------------------


def _no_default_group():
    if __import__("torch.distributed").distributed.is_initialized():
        pytest.skip("a default process group is initialised in this process")


@pytest.mark.parametrize("layout", ["ring", "zigzag", "stripe"])
@pytest.mark.parametrize("causal", [True, False])
def test_single_process_matches_full_attention(layout, causal):
    _no_default_group()
    gen = torch.Generator().manual_seed(_SEED)
    q, dout = (torch.randn(2, 6, 4, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 6, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = _reference(q, k, v, dout, None, causal)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse, none = _FUNCS[layout][0](q, k, v, causal=causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert none is None
    for name, x, r in zip(_QUANTITIES, (out, lse) + grads, ref):
        assert rel_err(x, r) <= 1e-12, name


@pytest.mark.parametrize("layout", ["ring", "zigzag", "stripe"])
def test_errors(layout):
    _no_default_group()
    func, kvpacked, qkvpacked = _FUNCS[layout]
    q = torch.randn(1, 4, 4, 8)
    k = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"window_size: expected a right side of -1 or 0 with causal=True"):
        func(q, k, k, causal=True, window_size=(2, 1))
    with pytest.raises(NotImplementedError, match=r"alibi_slopes"):
        func(q, k, k, alibi_slopes=torch.ones(4))
    with pytest.raises(NotImplementedError, match=r"dropout_p"):
        func(q, k, k, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"k: expected dtype torch.float32 \(the dtype of q\), got torch.float64"):
        func(q, k.double(), k)
    with pytest.raises(ValueError, match=r"q: expected a number of heads divisible by the KV heads of k \(3\)"):
        func(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match=r"k: expected batch 1 and local_seqlen 4"):
        func(q, k[:, :2], k[:, :2])
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor"):
        func(q[0], k[0], k[0])
    with pytest.raises(ValueError, match=r"kv: expected a 5-D tensor"):
        kvpacked(q, k)
    with pytest.raises(ValueError, match=r"qkv: expected a 5-D tensor"):
        qkvpacked(q)
    if layout == "zigzag":
        with pytest.raises(ValueError, match=r"q: expected an even local_seqlen"):
            func(q[:, :3], k[:, :3], k[:, :3])


@pytest.mark.parametrize("layout", ["ring", "zigzag"])
@pytest.mark.parametrize("causal", [True, False])
def test_single_process_varlen_matches_full_attention(layout, causal):
    _no_default_group()
    gen = torch.Generator().manual_seed(_SEED)
    cu = torch.tensor([0, 4, 4, 10, 12], dtype=torch.int32)  # an empty sequence; lengths even
    q, dout = (torch.randn(12, 4, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(12, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    (ref,), (ref_lse,) = grouped_attention_reference([ins[0]], ins[1], ins[2], [cu], cu, None, None, causal)
    ref_grads = torch.autograd.grad(ref, ins, dout)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse, none = _VARLEN_FUNCS[layout][0](q, k, v, cu, 6, causal=causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert none is None
    for name, x, r in zip(_QUANTITIES, (out, lse) + grads, (ref, ref_lse) + ref_grads):
        assert rel_err(x, r) <= 1e-12, name


@pytest.mark.parametrize("layout", ["ring", "zigzag"])
def test_varlen_errors(layout):
    _no_default_group()
    func, kvpacked, qkvpacked = _VARLEN_FUNCS[layout]
    q = torch.randn(8, 4, 8)
    k = torch.randn(8, 2, 8)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"window_size: expected each side -1 \(unbounded\) or >= 0"):
        func(q, k, k, cu, 4, window_size=(0, -3))
    with pytest.raises(NotImplementedError, match=r"alibi_slopes"):
        func(q, k, k, cu, 4, alibi_slopes=torch.ones(4))
    with pytest.raises(NotImplementedError, match=r"dropout_p"):
        func(q, k, k, cu, 4, dropout_p=0.5)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected dtype torch.int32"):
        func(q, k, k, cu.long(), 4)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected the last entry to be 8"):
        func(q, k, k, torch.tensor([0, 4, 6], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing"):
        func(q, k, k, torch.tensor([0, 6, 4, 8], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match=r"max_seqlen: expected a Python int"):
        func(q, k, k, cu, torch.tensor(4))
    with pytest.raises(ValueError, match=r"k: expected 8 local tokens"):
        func(q, k[:6], k[:6], cu, 4)
    with pytest.raises(ValueError, match=r"q: expected a 3-D tensor"):
        func(q[None], k, k, cu, 4)
    with pytest.raises(ValueError, match=r"kv: expected a 4-D tensor"):
        kvpacked(q, k, cu, 4)
    with pytest.raises(ValueError, match=r"qkv: expected a 4-D tensor"):
        qkvpacked(q, cu, 4)
    odd = torch.tensor([0, 3, 8], dtype=torch.int32)
    if layout == "zigzag":
        with pytest.raises(ValueError, match=r"cu_seqlens: local sequence 0 has length 3, expected an even length"):
            func(q, k, k, odd, 5)
    else:
        func(q, k, k, odd, 5)  # any lengths


def test_exports():
    names = [f"{p}{s}" for p in ("ring_flash_attn", "zigzag_ring_flash_attn", "stripe_flash_attn",
                                 "ring_flash_attn_varlen", "zigzag_ring_flash_attn_varlen")
             for s in ("_func", "_kvpacked_func", "_qkvpacked_func")]
    for n in names:
        assert n in rfa.__all__ and getattr(rfa, n).__name__ == n


@pytest.mark.parametrize("layout", ["ring", "zigzag"])
def test_single_process_accepts_any_kv_layout_in_backward(layout):
    """K/V whose last dim is not contiguous: the forward works on a stacked copy, and so must the
    backward (world size 1 takes its own path there)."""
    _no_default_group()
    gen = torch.Generator().manual_seed(_SEED + 1)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    q, dout = (torch.randn(10, 4, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(10, 8, 2, generator=gen, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    assert k.stride(-1) != 1
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    (ref,), _ = grouped_attention_reference([ins[0]], ins[1], ins[2], [cu], cu, None, None, True)
    ref_grads = torch.autograd.grad(ref, ins, dout)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = _VARLEN_FUNCS[layout][0](q, k, v, cu, 6, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert rel_err(out, ref) <= 1e-12
    for name, x, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(x, r) <= 1e-12, name
