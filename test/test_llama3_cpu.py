"""Llama3 context parallelism in the contiguous layout (``llama3_flash_attn_varlen_func``) on the
CPU backend: gloo process groups of 2 and 4 ranks (one spawn each, all cases in it).

Every case draws a random global batch (the same on every rank), computes single-process full
attention on the unsharded batch with test/reference.py (float64, autograd for the gradients),
gives rank r its contiguous piece ``[r T, (r+1) T)`` with ``llama3_flash_attn_prepare_cu_seqlens``'s
metadata, and checks the rank's out, LSE, dQ, dK and dV against the matching rows of the
reference. Error paths are checked single-process (they raise before any collective).
"""

from __future__ import annotations

import random
from typing import Dict, List

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn.cp import llama3
from dist_harness import (assert_case_within, CachedSpawns, case_params, CaseWorker, NoHostReads, rel_err,
                          spawn_root_fixture)
from reference import grouped_attention_reference
from cases import case_dict, cu_seqlens

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 180

_BASE = dict(Hq=4, Hk=2, D=8, hs=1, dtype="float64", causal=True, scale=None, packed=None, no_host_reads=False)


def _case(case_id, lens, **kw):
    return case_dict(_BASE, kw, id=case_id, lens=list(lens))


# Totals divisible by N; sequences of any length, crossing rank boundaries or not.
CASES: Dict[int, List[dict]] = {
    2: [
        _case("gqa-hs1-causal", [5, 11, 3, 13]),
        _case("gqa-hs1-noncausal", [5, 11, 3, 13], causal=False),
        _case("gqa-hs2-fp32-scale", [9, 1, 14], hs=2, dtype="float32", scale=0.3),
        _case("mqa-noncausal-fp32", [7, 9], Hq=4, Hk=1, causal=False, dtype="float32"),
        _case("kvpacked-causal", [6, 10, 4], packed="kv"),
        _case("qkvpacked-mha-noncausal", [3, 17], Hq=2, Hk=2, hs=2, causal=False, packed="qkv"),
        _case("single-seq-no-host-reads", [20], no_host_reads=True),
        _case("aligned-boundary-gqa3", [8, 8], Hq=6, Hk=3),
    ],
    4: [
        _case("gqa-hs1-causal", [7, 13, 2, 10]),
        _case("gqa-hk4-hs2-noncausal", [7, 13, 2, 10], Hq=8, Hk=4, hs=2, causal=False),
        _case("mqa-fp32-causal", [9, 23], Hq=4, Hk=1, dtype="float32"),
        _case("aligned-boundaries", [8, 8, 16], no_host_reads=True),
    ],
}

_TOL = {"float64": 1e-10, "float32": 3e-5}
_QUANTITIES = ("out", "lse", "dq", "dk", "dv")




def _run_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    dtype = getattr(torch, case["dtype"])
    Hq, Hk, D = case["Hq"], case["Hk"], case["D"]
    cu = cu_seqlens(case["lens"])
    total = int(cu[-1])
    T = total // world_size
    gen = torch.Generator().manual_seed(seed)
    q_full, dout_full = (torch.randn(total, Hq, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k_full, v_full = (torch.randn(total, Hk, D, generator=gen, dtype=torch.float64) for _ in range(2))

    ref_in = [t.to(dtype).double().requires_grad_(True) for t in (q_full, k_full, v_full)]
    (ref_out,), (ref_lse,) = grouped_attention_reference(
        [ref_in[0]], ref_in[1], ref_in[2], [cu], cu, None, case["scale"], case["causal"])
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, ref_in, dout_full.to(dtype).double())

    rows = slice(rank * T, (rank + 1) * T)
    cu_q, cu_k, max_q, max_k, local_k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(
        cu, causal=case["causal"], rank=rank, world_size=world_size)
    kw = dict(softmax_scale=case["scale"], causal=case["causal"], return_attn_probs=True)
    q, k, v, dout = (t[rows].to(dtype) for t in (q_full, k_full, v_full, dout_full))
    if case["packed"] == "kv":
        q.requires_grad_(True)
        kv = torch.stack([k, v], dim=1).requires_grad_(True)
        out, lse, none = rfa.llama3_flash_attn_varlen_kvpacked_func(
            q, kv, cu_q, cu_k, max_q, max_k, case["hs"], local_k_slice, **kw)
        dq, dkv = torch.autograd.grad(out, (q, kv), dout)
        dk, dv = dkv[:, 0], dkv[:, 1]
    elif case["packed"] == "qkv":
        qkv = torch.stack([q, k, v], dim=1).requires_grad_(True)
        out, lse, none = rfa.llama3_flash_attn_varlen_qkvpacked_func(
            qkv, cu_q, cu_k, max_q, max_k, case["hs"], local_k_slice, **kw)
        (dqkv,) = torch.autograd.grad(out, (qkv,), dout)
        dq, dk, dv = dqkv.unbind(1)
    else:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        if case["no_host_reads"]:
            with NoHostReads(llama3):
                out, lse, none = rfa.llama3_flash_attn_varlen_func(
                    q, k, v, cu_q, cu_k, max_q, max_k, case["hs"], local_k_slice, **kw)
                dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
        else:
            out, lse, none = rfa.llama3_flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, max_q, max_k, case["hs"], local_k_slice, **kw)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
            # without return_attn_probs: the output alone, the same values
            out_only = rfa.llama3_flash_attn_varlen_func(
                q.detach(), k.detach(), v.detach(), cu_q, cu_k, max_q, max_k, case["hs"], local_k_slice,
                softmax_scale=case["scale"], causal=case["causal"])
            assert isinstance(out_only, torch.Tensor) and torch.equal(out_only, out.detach())
    assert none is None
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (Hq, T)
    return {
        "out": rel_err(out, ref_out[rows]),
        "lse": rel_err(lse, ref_lse[:, rows]),
        "dq": rel_err(dq, ref_dq[rows]),
        "dk": rel_err(dk, ref_dk[rows]),
        "dv": rel_err(dv, ref_dv[rows]),
    }


_results = CachedSpawns(CaseWorker(CASES, _run_case), _SEED, "llama3", _SPAWN_TIMEOUT_S)
spawn_root = spawn_root_fixture("llama3_dist")


@pytest.mark.parametrize("world_size,case", case_params(CASES))
def test_llama3_matches_full_attention(world_size, case, spawn_root):
    assert_case_within(_results(world_size, spawn_root), case, _QUANTITIES, _TOL[case["dtype"]], _SEED)


# ---- single process (no initialised group: world size 1) --------------------------------------------


def test_llama3_single_process_matches_reference():
    gen = torch.Generator().manual_seed(_SEED)
    cu = cu_seqlens([5, 7, 4])
    q = torch.randn(16, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(16, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(16, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(16, 4, 8, generator=gen, dtype=torch.float64)
    for causal in (True, False):
        cu_q, cu_k, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal, 0, 1)
        out, lse, _ = rfa.llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 1, ks, causal=causal,
                                                        return_attn_probs=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        (ref_out,), (ref_lse,) = grouped_attention_reference([q], k, v, [cu], cu, None, None, causal)
        ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
        assert rel_err(out, ref_out) <= 1e-10
        assert rel_err(lse, ref_lse) <= 1e-10
        for g, rg in zip(grads, ref_grads):
            assert rel_err(g, rg) <= 1e-10


def _args(**over):
    cu = cu_seqlens([6, 10])
    a = dict(q=torch.randn(16, 4, 8, dtype=torch.float64), k=torch.randn(16, 2, 8, dtype=torch.float64),
             v=torch.randn(16, 2, 8, dtype=torch.float64), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=10,
             max_seqlen_k=10, heads_k_stride=1, local_k_slice=slice(0, 16))
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(window_size=(4, 1), causal=True), ValueError, r"window_size: expected a right side of -1 or 0"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected a finite float >= 0"),
    (dict(alibi_slopes=torch.zeros(4)), NotImplementedError, r"alibi_slopes"),
    (dict(dropout_p=0.1), NotImplementedError, r"dropout_p"),
    (dict(heads_k_stride=3), ValueError, r"heads_k_stride: expected a divisor of the KV heads of k \(2\), got 3"),
    (dict(cu_seqlens_k=cu_seqlens([6, 10]).long()), ValueError, r"cu_seqlens_k: expected dtype torch.int32"),
    (dict(cu_seqlens_q=cu_seqlens([16])), ValueError, r"cu_seqlens_q: expected 3 entries"),
    (dict(k=torch.randn(16, 2, 8)), ValueError, r"k: expected dtype torch.float64"),
    (dict(k=torch.randn(14, 2, 8, dtype=torch.float64), v=torch.randn(14, 2, 8, dtype=torch.float64)),
     ValueError, r"k: expected 16 local tokens"),
    (dict(q=torch.randn(16, 3, 8, dtype=torch.float64)), ValueError, r"q: expected a number of heads divisible"),
    (dict(max_seqlen_q=torch.tensor(10)), ValueError, r"max_seqlen_q: expected a Python int"),
    (dict(local_k_slice=(0, 16)), ValueError, r"local_k_slice: expected a slice"),
    (dict(local_k_slice=slice(0, 16, 2)), ValueError, r"local_k_slice: expected a step of 1"),
    (dict(cu_seqlens_q=cu_seqlens([6, 8])), ValueError, r"cu_seqlens_q: expected the last entry to be 16"),
    (dict(local_k_slice=slice(0, 12)), ValueError, r"cu_seqlens_k: expected the last entry to be <= 12"),
])
def test_llama3_errors(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rfa.llama3_flash_attn_varlen_func(**_args(**over))


def test_llama3_packed_shape_errors():
    a = _args()
    with pytest.raises(ValueError, match=r"kv: expected a 4-D tensor"):
        rfa.llama3_flash_attn_varlen_kvpacked_func(a["q"], a["k"], a["cu_seqlens_q"], a["cu_seqlens_k"], 10, 10, 1,
                                                   slice(0, 16))
    with pytest.raises(ValueError, match=r"qkv: expected a 4-D tensor"):
        rfa.llama3_flash_attn_varlen_qkvpacked_func(a["q"], a["cu_seqlens_q"], a["cu_seqlens_k"], 10, 10, 1,
                                                    slice(0, 16))
