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
from dist_harness import NoHostReads, rel_err, SpawnedCases
from cases import (VARLEN_ARGUMENT_ERRORS, assert_packed_forms_need_4d, assert_single_process_matches, case_maker,
                   cu_seqlens, global_packed_batch, packed_reference, single_process_batch, varlen_call_args)

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 180

_BASE = dict(Hq=4, Hk=2, D=8, hs=1, dtype="float64", causal=True, scale=None, packed=None, no_host_reads=False)


_case = case_maker(_BASE)


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
    Hq = case["Hq"]
    cu, q_full, k_full, v_full, dout_full = global_packed_batch(case, torch.Generator().manual_seed(seed))
    T = int(cu[-1]) // world_size
    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = packed_reference(
        *(t.to(dtype) for t in (q_full, k_full, v_full, dout_full)), cu, case["scale"], case["causal"])

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


_results = SpawnedCases("llama3", CASES, _run_case, _SEED, _SPAWN_TIMEOUT_S, _QUANTITIES, _TOL)


@pytest.mark.parametrize("world_size,case", _results.params())
def test_llama3_matches_full_attention(world_size, case, spawn_root):
    _results.assert_within(world_size, case, spawn_root)


# ---- single process (no initialised group: world size 1) --------------------------------------------


def test_llama3_single_process_matches_reference():
    batch = single_process_batch(_SEED)
    cu, q, k, v, dout = batch
    for causal in (True, False):
        cu_q, cu_k, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal, 0, 1)
        out, lse, _ = rfa.llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 1, ks, causal=causal,
                                                        return_attn_probs=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        assert_single_process_matches(out, lse, grads, batch, causal)


def _args(**over):
    return varlen_call_args(**{"heads_k_stride": 1, "local_k_slice": slice(0, 16), **over})


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(window_size=(4, 1), causal=True), ValueError, r"window_size: expected a right side of -1 or 0"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected a finite float >= 0"),
    (dict(heads_k_stride=3), ValueError, r"heads_k_stride: expected a divisor of the KV heads of k \(2\), got 3"),
    (dict(local_k_slice=(0, 16)), ValueError, r"local_k_slice: expected a slice"),
    (dict(local_k_slice=slice(0, 16, 2)), ValueError, r"local_k_slice: expected a step of 1"),
    (dict(cu_seqlens_q=cu_seqlens([6, 8])), ValueError, r"cu_seqlens_q: expected the last entry to be 16"),
    (dict(local_k_slice=slice(0, 12)), ValueError, r"cu_seqlens_k: expected the last entry to be <= 12"),
] + VARLEN_ARGUMENT_ERRORS)
def test_llama3_errors(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rfa.llama3_flash_attn_varlen_func(**_args(**over))


def test_llama3_packed_shape_errors():
    assert_packed_forms_need_4d(rfa.llama3_flash_attn_varlen_kvpacked_func, rfa.llama3_flash_attn_varlen_qkvpacked_func,
                                1, slice(0, 16))
