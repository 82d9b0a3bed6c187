"""Local attention (window_size), logit softcap and sink logits through every context-parallel
scheme on the CPU backend: gloo process groups of 2 and 4 ranks (one spawn each, all cases in it)
and one representative case on 8 ranks.

Every case draws a random packed global batch (the same on every rank), computes single-process
attention on it with the library's own ``flash_attn_varlen_func`` in float64 with the same
window, softcap and sinks (itself checked against a dense float64 reference in
test_window_softcap_sinks_cpu.py), shards it into the scheme's layout, runs the scheme on every
rank and checks the rank's out, LSE, dQ, dK and dV against the matching rows of the reference,
and the sinks' gradient summed over the ranks (each rank returns its rows' share) against the
reference's. Windows: 0, small, larger than the sequence, one-sided, asymmetric, causal and not.
Which ring steps are skipped under a window (no kernel call) and the all-gather schemes' key range
are checked too; argument errors single-process.
"""

from __future__ import annotations

import random
from typing import Dict, List

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn.cp import ring_engine
from ring_flash_attn.cp.window import contiguous_key_range, effective_window, ring_calls
from dist_harness import NoHostReads, record_check, rel_err, SpawnedCases
from cases import case_dict, cu_seqlens, global_packed_batch

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 240

_BASE = dict(form="varlen", Hq=4, Hk=2, D=8, dtype="float64", causal=True, window=(-1, -1), softcap=0.0,
             sinks=False, scale=None, hs=1, impl=None, no_host_reads=False)


def _case(case_id, scheme, lens, **kw):
    """lens: GLOBAL sequence lengths (batched forms: all equal)."""
    return case_dict(_BASE, kw, id=f"{scheme}-{case_id}", scheme=scheme, lens=list(lens))


def _cases_2() -> List[dict]:
    return [
        # ring, contiguous pieces (batched: 2 sequences of 12)
        _case("causal-w3", "ring", [12, 12], form="batched", window=(3, 0)),
        _case("noncausal-w2x5-softcap-sinks", "ring", [12, 12], form="batched", causal=False, window=(2, 5),
              softcap=2.0, sinks=True),
        _case("causal-w0-sinks", "ring", [12, 12], form="batched", window=(0, 0), sinks=True),
        _case("noncausal-wide-softcap", "ring", [12, 12], form="batched", causal=False, window=(100, 100),
              softcap=1.5),
        _case("noncausal-right-only-fp32", "ring", [12, 12], form="batched", causal=False, window=(-1, 1),
              dtype="float32"),
        _case("varlen-causal-w4-sinks", "ring", [6, 2, 10], window=(4, -1), sinks=True),
        _case("varlen-kv-noncausal-w1x2-softcap", "ring", [6, 0, 8], form="kv", causal=False, window=(1, 2),
              softcap=3.0),
        _case("varlen-qkv-causal-sinks", "ring", [4, 10], form="qkv", Hq=2, Hk=2, sinks=True),
        # zigzag ring (chunks r and 2N-1-r)
        _case("causal-w5-sinks", "zigzag", [16, 16], form="batched", window=(5, 0), sinks=True),
        _case("noncausal-w3x2-softcap", "zigzag", [16, 16], form="batched", causal=False, window=(3, 2),
              softcap=2.0),
        _case("causal-w0", "zigzag", [16, 16], form="batched", window=(0, -1)),
        _case("noncausal-w0-sinks", "zigzag", [16, 16], form="batched", causal=False, window=(0, 0), sinks=True),
        _case("varlen-causal-w6-softcap-sinks", "zigzag", [8, 4, 12], window=(6, 0), softcap=2.5, sinks=True),
        _case("varlen-kv-noncausal-left-open", "zigzag", [12, 8], form="kv", causal=False, window=(-1, 3)),
        _case("varlen-causal-w2-no-host-reads", "zigzag", [16, 4, 8], window=(2, 0), sinks=True,
              no_host_reads=True),
        # stripe (local token i is global i N + r; batched forms only)
        _case("causal-w3", "stripe", [10, 10], form="batched", window=(3, 0)),
        _case("noncausal-w2x5-softcap-sinks", "stripe", [10, 10], form="batched", causal=False, window=(2, 5),
              softcap=2.0, sinks=True),
        _case("causal-w0-sinks", "stripe", [10, 10], form="batched", window=(0, 0), sinks=True),
        _case("noncausal-w0", "stripe", [10, 10], form="batched", causal=False, window=(0, 0)),
        _case("qkv-noncausal-left-open-fp32", "stripe", [8, 8], form="qkv-batched", Hq=2, Hk=2, causal=False,
              window=(-1, 2), dtype="float32"),
        # llama3, contiguous layout (any lengths; sequences cross the rank boundary)
        _case("causal-w4-sinks", "llama3", [5, 12, 2, 13], window=(4, 0), sinks=True),
        _case("noncausal-w3x2-softcap", "llama3", [5, 12, 2, 13], causal=False, window=(3, 2), softcap=2.0),
        _case("noncausal-right-open-sinks", "llama3", [9, 14, 9], causal=False, window=(2, -1), sinks=True),
        _case("noncausal-left-open", "llama3", [9, 14, 9], causal=False, window=(-1, 3)),
        _case("causal-w0-fp32", "llama3", [7, 9], window=(0, 0), dtype="float32"),
        _case("kv-hs2-noncausal-w6-sinks", "llama3", [6, 10, 4], form="kv", Hq=4, Hk=2, hs=2, causal=False,
              window=(6, 6), sinks=True),
        _case("single-seq-noncausal-w1", "llama3", [20], causal=False, window=(1, 1), softcap=1.0),
        _case("causal-softcap-sinks-no-window", "llama3", [5, 11, 3, 13], softcap=2.0, sinks=True),
        # zigzag llama3, the three implementations
        _case("baseline-causal-w5-sinks", "zigzag_llama3", [16, 8, 12], window=(5, 0), sinks=True),
        _case("fused-noncausal-w3x2-softcap-sinks", "zigzag_llama3", [16, 8, 12], causal=False, window=(3, 2),
              softcap=2.0, sinks=True, impl="fused"),
        _case("grouped-noncausal-w2-left-only-sinks", "zigzag_llama3", [16, 8], causal=False, window=(2, -1),
              sinks=True, impl="grouped"),
        _case("grouped-causal-w3-softcap", "zigzag_llama3", [16, 8], window=(3, 0), softcap=2.0, impl="grouped"),
        _case("baseline-hs2-noncausal-w0", "zigzag_llama3", [12, 4], Hq=4, Hk=2, hs=2, causal=False,
              window=(0, 0)),
        _case("fused-causal-w0-fp32", "zigzag_llama3", [8, 8], window=(0, 0), impl="fused", dtype="float32"),
        _case("grouped-noncausal-softcap-no-window", "zigzag_llama3", [12, 4], causal=False, softcap=1.5,
              sinks=True, impl="grouped"),
    ]


def _cases_4() -> List[dict]:
    return [
        _case("causal-w5-sinks", "ring", [16, 16], form="batched", window=(5, 0), sinks=True),
        _case("varlen-noncausal-w3x6-softcap", "ring", [8, 12], causal=False, window=(3, 6), softcap=2.0),
        _case("causal-w9-softcap-sinks", "zigzag", [32, 32], form="batched", window=(9, 0), softcap=2.0,
              sinks=True),
        _case("varlen-noncausal-w4x1-sinks", "zigzag", [16, 8], causal=False, window=(4, 1), sinks=True),
        _case("causal-w6-sinks", "stripe", [12, 12], form="batched", window=(6, 0), sinks=True),
        _case("noncausal-w5x2-softcap", "stripe", [12, 12], form="batched", causal=False, window=(5, 2),
              softcap=2.0),
        _case("causal-w7-softcap-sinks", "llama3", [7, 13, 2, 10], window=(7, 0), softcap=2.0, sinks=True),
        _case("noncausal-w3x9-sinks", "llama3", [7, 13, 2, 10], causal=False, window=(3, 9), sinks=True),
        _case("fused-causal-w6-sinks", "zigzag_llama3", [16, 8, 24], window=(6, 0), sinks=True, impl="fused"),
        _case("baseline-noncausal-w2x7-softcap", "zigzag_llama3", [16, 8], causal=False, window=(2, 7),
              softcap=2.0),
    ]


CASES: Dict[int, List[dict]] = {
    2: _cases_2(),
    4: _cases_4(),
    8: [_case("causal-w11-softcap-sinks", "zigzag", [48, 32], window=(11, 0), softcap=2.0, sinks=True)],
}

# max |error| / max(1, max |reference|). The ring merge goes through the kernels' float32 LSE
# (so does the sinks' fold), so float64 inputs are accurate to about float32.
_TOL = {"float64": 2e-6, "float32": 5e-5}
_QUANTITIES = ("out", "lse", "dq", "dk", "dv", "dsinks")

_RING_FUNCS = {
    "ring": (rfa.ring_flash_attn_func, rfa.ring_flash_attn_kvpacked_func, rfa.ring_flash_attn_qkvpacked_func,
             rfa.ring_flash_attn_varlen_func, rfa.ring_flash_attn_varlen_kvpacked_func,
             rfa.ring_flash_attn_varlen_qkvpacked_func),
    "zigzag": (rfa.zigzag_ring_flash_attn_func, rfa.zigzag_ring_flash_attn_kvpacked_func,
               rfa.zigzag_ring_flash_attn_qkvpacked_func, rfa.zigzag_ring_flash_attn_varlen_func,
               rfa.zigzag_ring_flash_attn_varlen_kvpacked_func, rfa.zigzag_ring_flash_attn_varlen_qkvpacked_func),
    "stripe": (rfa.stripe_flash_attn_func, rfa.stripe_flash_attn_kvpacked_func, rfa.stripe_flash_attn_qkvpacked_func,
               None, None, None),
}
_ALL_GATHER_FUNCS = {
    "llama3": (rfa.llama3_flash_attn_varlen_func, rfa.llama3_flash_attn_varlen_kvpacked_func,
               rfa.llama3_flash_attn_varlen_qkvpacked_func),
    "zigzag_llama3": (rfa.zigzag_llama3_flash_attn_varlen_func, rfa.zigzag_llama3_flash_attn_varlen_kvpacked_func,
                      rfa.zigzag_llama3_flash_attn_varlen_qkvpacked_func),
}
_IMPL_FLAGS = {None: {}, "fused": {"use_fused_kernel": True}, "grouped": {"use_grouped_attention": True}}


def _rows(scheme: str, lens: List[int], rank: int, N: int) -> torch.Tensor:
    """The global rows (natural order) rank `rank` holds, in its local order."""
    if scheme == "llama3":
        T = sum(lens) // N
        return torch.arange(rank * T, (rank + 1) * T)
    parts, start = [], 0
    for L in lens:
        if scheme == "ring":
            n = L // N
            parts.append(torch.arange(start + rank * n, start + (rank + 1) * n))
        elif scheme == "stripe":
            parts.append(start + torch.arange(L // N) * N + rank)
        else:  # zigzag layouts
            c = L // (2 * N)
            parts += [torch.arange(start + rank * c, start + (rank + 1) * c),
                      torch.arange(start + (2 * N - 1 - rank) * c, start + (2 * N - rank) * c)]
        start += L
    return torch.cat(parts)


def _reference(case: dict, q, k, v, dout, sinks, cu):
    """Single-process attention on the global batch (float64): out, lse [Hq, T], dq, dk, dv, dsinks."""
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    sinks_in = None if sinks is None else sinks.clone().requires_grad_(True)
    longest = max(case["lens"])
    out, lse, _ = rfa.flash_attn_varlen_func(
        ins[0], ins[1], ins[2], cu, cu, longest, longest, softmax_scale=case["scale"], causal=case["causal"],
        window_size=tuple(case["window"]), softcap=case["softcap"], sinks=sinks_in, return_attn_probs=True)
    grads = torch.autograd.grad(out, ins + ([sinks_in] if sinks_in is not None else []), dout)
    dsinks = grads[3] if sinks_in is not None else torch.zeros(0)
    return out.detach(), lse, grads[0], grads[1], grads[2], dsinks


def _call(case: dict, q, k, v, cu, rank: int, N: int, sinks):
    """The scheme on the rank's shard -> (out [T, Hq, D], lse [Hq, T], leaves, unpack) where
    unpack(grads of leaves) -> (dq, dk, dv)."""
    scheme, form = case["scheme"], case["form"]
    kw = dict(softmax_scale=case["scale"], causal=case["causal"], window_size=tuple(case["window"]),
              softcap=case["softcap"], sinks=sinks, return_attn_probs=True)
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if scheme in _RING_FUNCS:
        func, kvpacked, qkvpacked, vfunc, vkvpacked, vqkvpacked = _RING_FUNCS[scheme]
        if form in ("batched", "qkv-batched"):
            B = len(case["lens"])
            L = T // B
            qb, kb, vb = q.view(B, L, Hq, D), k.view(B, L, Hk, D), v.view(B, L, Hk, D)
            if form == "qkv-batched":
                qkv = torch.stack([qb, kb, vb], dim=2).requires_grad_(True)
                out, lse, _ = qkvpacked(qkv, **kw)
                leaves, unpack = [qkv], lambda g: tuple(x.reshape(T, -1, D) for x in g[0].unbind(2))
            else:
                leaves = [t.requires_grad_(True) for t in (qb, kb, vb)]
                out, lse, _ = func(*leaves, **kw)
                unpack = lambda g: tuple(x.reshape(T, -1, D) for x in g)  # noqa: E731
            return out.reshape(T, Hq, D), lse.permute(1, 0, 2).reshape(Hq, T), leaves, unpack
        cu_local = torch.div(cu, N, rounding_mode="floor").to(torch.int32)
        max_local = max(case["lens"]) // N
        if form == "kv":
            q_in, kv = q.requires_grad_(True), torch.stack([k, v], dim=1).requires_grad_(True)
            out, lse, _ = vkvpacked(q_in, kv, cu_local, max_local, **kw)
            return out, lse, [q_in, kv], lambda g: (g[0], g[1][:, 0], g[1][:, 1])
        if form == "qkv":
            qkv = torch.stack([q, k, v], dim=1).requires_grad_(True)
            out, lse, _ = vqkvpacked(qkv, cu_local, max_local, **kw)
            return out, lse, [qkv], lambda g: tuple(g[0].unbind(1))
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        out, lse, _ = vfunc(*leaves, cu_local, max_local, **kw)
        return out, lse, leaves, lambda g: tuple(g)
    func, kvpacked, qkvpacked = _ALL_GATHER_FUNCS[scheme]
    if scheme == "llama3":
        meta = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, case["causal"], rank, N)
    else:
        meta = rfa.zigzag_llama3_prepare_cu_seqlens(cu, case["causal"], rank, N)
        kw.update(_IMPL_FLAGS[case["impl"]])
    cu_q, cu_k, max_q, max_k, k_slice = meta
    args = (cu_q, cu_k, max_q, max_k, case["hs"], k_slice)
    if form == "kv":
        q_in, kv = q.requires_grad_(True), torch.stack([k, v], dim=1).requires_grad_(True)
        out, lse, _ = kvpacked(q_in, kv, *args, **kw)
        return out, lse, [q_in, kv], lambda g: (g[0], g[1][:, 0], g[1][:, 1])
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out, lse, _ = func(*leaves, *args, **kw)
    return out, lse, leaves, lambda g: tuple(g)


def _run_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    import torch.distributed as dist

    dtype = getattr(torch, case["dtype"])
    Hq = case["Hq"]
    gen = torch.Generator().manual_seed(seed)
    cu, q_full, k_full, v_full, dout_full = global_packed_batch(case, gen)
    # inputs representable in the case's dtype, so that the float64 reference sees the same values
    q_full, k_full, v_full, dout_full = (t.to(dtype).double() for t in (q_full, k_full, v_full, dout_full))
    sinks_full = (torch.randn(Hq, generator=gen, dtype=torch.float32) + 1.0) if case["sinks"] else None
    ref = _reference(case, q_full, k_full, v_full, dout_full, sinks_full, cu)

    idx = _rows(case["scheme"], case["lens"], rank, world_size)
    q, k, v, dout = (t.index_select(0, idx).to(dtype) for t in (q_full, k_full, v_full, dout_full))
    sinks = None if sinks_full is None else sinks_full.clone().requires_grad_(True)
    if case["no_host_reads"]:
        with NoHostReads(ring_engine):
            out, lse, leaves, unpack = _call(case, q, k, v, cu, rank, world_size, sinks)
            grads = torch.autograd.grad(out, leaves + ([sinks] if sinks is not None else []), dout)
    else:
        out, lse, leaves, unpack = _call(case, q, k, v, cu, rank, world_size, sinks)
        grads = torch.autograd.grad(out, leaves + ([sinks] if sinks is not None else []), dout)
    assert out.dtype == dtype and lse.dtype == torch.float32
    dq, dk, dv = unpack(grads[:len(leaves)])
    dsinks = grads[-1].clone() if sinks is not None else torch.zeros(0)
    if sinks is not None:
        assert dsinks.dtype == torch.float32 and dsinks.shape == (Hq,)
        dist.all_reduce(dsinks)  # each rank's share: the sum is the gradient
    got = (out, lse, dq, dk, dv, dsinks)
    ref_rows = [ref[0].index_select(0, idx), ref[1].index_select(1, idx)] + \
        [r.index_select(0, idx) for r in ref[2:5]] + [ref[5]]
    return {name: rel_err(x, r) for name, x, r in zip(_QUANTITIES, got, ref_rows)}


# ---- which ring steps run under a window ----------------------------------------------------------


def _forward_calls_per_case(seed: int) -> Dict[str, int]:
    """The forward kernel calls of one causal call of each case under a window, counted by
    wrapping the op: {case: calls}."""
    from ring_flash_attn import ops

    saved = ops.grouped_fwd
    calls: List[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return saved(*args, **kwargs)

    out = {}
    try:
        ops.grouped_fwd = counting
        x = torch.randn(1, 8, 2, 8, dtype=torch.float32, generator=torch.Generator().manual_seed(seed))
        for name, func, window in (("ring-w3", rfa.ring_flash_attn_func, (3, 0)),
                                   ("ring-w9", rfa.ring_flash_attn_func, (9, 0)),
                                   ("zigzag-w3", rfa.zigzag_ring_flash_attn_func, (3, 0)),
                                   ("stripe-w3", rfa.stripe_flash_attn_func, (3, 0)),
                                   ("ring-no-window", rfa.ring_flash_attn_func, (-1, -1))):
            calls.clear()
            func(x, x, x, causal=True, window_size=window)
            out[name] = len(calls)
    finally:
        ops.grouped_fwd = saved
    return out


def _step_calls_check(rank: int, world_size: int, seed: int, results: dict) -> None:
    """With 4 ranks: the kernel calls of each ring step under a causal window (results["steps"]:
    {case: [calls of the forward]} or the failure)."""
    if world_size == 4:
        record_check(results, "steps", lambda: _forward_calls_per_case(seed))


# Forward kernel calls per rank (N = 4, 8 local tokens, causal). ring, window 3: the diagonal
# block, and the previous rank's block (its last 3 keys are within reach); blocks two ranks back
# are 9 positions away: skipped. Window 9: one more step. zigzag (chunks of 4 positions, rank r
# holds chunks r and 7-r): a query chunk sees its own chunk and the one before it (5 positions
# away: not), one call per such pair (rank 0's chunk 0 has none before it). stripe: every step
# holds keys within 3 positions of every query (the 3 positions before a token are on the other
# 3 ranks), one call each.
_EXPECTED_STEP_CALLS = {
    "ring-w3": [1, 2, 2, 2],
    "ring-w9": [1, 2, 3, 3],
    "zigzag-w3": [3, 4, 4, 4],
    "stripe-w3": [4, 4, 4, 4],
    "ring-no-window": [1, 2, 3, 4],
}


_results = SpawnedCases("cp_features", CASES, _run_case, _SEED, _SPAWN_TIMEOUT_S, _QUANTITIES, _TOL, _step_calls_check)


@pytest.mark.parametrize("world_size,case", _results.params())
def test_scheme_with_window_softcap_sinks_matches_single_process(world_size, case, spawn_root):
    _results.assert_within(world_size, case, spawn_root)


def test_ring_steps_outside_the_window_are_skipped(spawn_root):
    """Forward kernel calls of each case on every rank: {case: calls}."""
    _results.assert_each_rank(4, spawn_root, "steps",
                              lambda r: {name: calls[r] for name, calls in _EXPECTED_STEP_CALLS.items()})


# ---- single process ---------------------------------------------------------------------------------


def test_ring_calls_visibility():
    """ring_calls against a brute-force count of the visible (query, key) pairs of each block."""
    for layout in ("ring", "zigzag", "stripe"):
        for N in (2, 3, 4):
            for L in (2, 4, 6):
                if layout == "zigzag" and L % 2:
                    continue
                S = N * L
                for causal in (True, False):
                    for window in ((0, 0), (1, 0), (3, -1), (-1, 2), (2, 5), (L, L), (S, S)):
                        eff = effective_window(window, causal, S)
                        if eff is None:
                            continue
                        for rank in range(N):
                            for src in range(N):
                                calls = ring_calls(layout, N, rank, src, causal, eff, L // 2 if layout == "zigzag"
                                                   else L, L)
                                _check_calls(layout, N, L, rank, src, causal, eff, calls)


def _positions(layout: str, N: int, L: int, rank: int, rows: str) -> List[int]:
    glob = _rows("zigzag" if layout == "zigzag" else layout, [N * L], rank, N).tolist()
    if rows == "front":
        return glob[:L // 2]
    if rows == "back":
        return glob[L // 2:]
    return glob


def _check_calls(layout, N, L, rank, src, causal, window, calls):
    left, right = window
    right = 0 if causal else right

    def visible(p, j):
        return (left < 0 or j >= p - left) and (right < 0 or j <= p + right)

    qs, ks = _positions(layout, N, L, rank, "all"), _positions(layout, N, L, src, "all")
    wanted = {(p, j) for p in qs for j in ks if visible(p, j)}
    covered = set()
    for c in calls:
        qp, kp = _positions(layout, N, L, rank, c.q_rows), _positions(layout, N, L, src, c.k_rows)
        shift = c.shift_units * (L // 2 if layout == "zigzag" else L) + c.shift_offset
        cl, cr = c.window
        for i, p in enumerate(qp):
            d = i + len(kp) - len(qp) + shift
            for jj, j in enumerate(kp):
                seen = (cl < 0 or jj >= d - cl) and (cr < 0 or jj <= d + cr) and (not c.causal or jj <= d)
                if seen:
                    assert (p, j) not in covered, (layout, N, L, rank, src, window, "pair computed twice")
                    covered.add((p, j))
        assert any((p, j) in wanted for p in qp for j in kp), (layout, N, L, rank, src, window, "call sees nothing")
    assert covered == wanted, (layout, N, L, rank, src, causal, window, sorted(wanted ^ covered)[:5])


def test_contiguous_key_range():
    # rank 1 of 2, 10 local tokens: keys from 4 (sequence start) to 20 (causal) or 26 (not causal)
    assert contiguous_key_range((3, 0), True, 1, 10, slice(4, 20)) == (slice(7, 20), 0)
    assert contiguous_key_range((30, 0), True, 1, 10, slice(4, 20)) == (slice(4, 20), 0)
    assert contiguous_key_range((3, 2), False, 1, 10, slice(4, 26)) == (slice(7, 22), -2)
    assert contiguous_key_range((-1, 2), False, 1, 10, slice(4, 26)) == (slice(4, 22), -2)
    assert contiguous_key_range((3, -1), False, 1, 10, slice(4, 26)) == (slice(7, 26), -6)
    # the rank's first token starts a sequence: nothing before it to trim
    assert contiguous_key_range((3, 0), True, 1, 10, slice(10, 20)) == (slice(10, 20), 0)


def test_effective_window():
    assert effective_window((-1, -1), False, None) is None
    assert effective_window((-1, 0), True, None) is None
    assert effective_window((-1, -1), True, None) is None
    assert effective_window((5, -1), True, None) == (5, 0)
    assert effective_window((15, 15), False, 16) is None
    assert effective_window((14, 20), False, 16) == (14, -1)
    assert effective_window((0, 0), False, 1) is None  # one token: nothing to bound


def _no_default_group():
    if __import__("torch.distributed").distributed.is_initialized():
        pytest.skip("a default process group is initialised in this process")


def test_errors():
    _no_default_group()
    q = torch.randn(1, 4, 4, 8)
    k = torch.randn(1, 4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for func in (rfa.ring_flash_attn_func, rfa.zigzag_ring_flash_attn_func, rfa.stripe_flash_attn_func):
        with pytest.raises(ValueError, match=r"window_size: expected a right side of -1 or 0 with causal=True"):
            func(q, k, k, causal=True, window_size=(2, 1))
        with pytest.raises(ValueError, match=r"window_size: expected each side -1 \(unbounded\) or >= 0"):
            func(q, k, k, window_size=(-2, 0))
        with pytest.raises(ValueError, match=r"softcap: expected a finite float >= 0"):
            func(q, k, k, softcap=-1.0)
        with pytest.raises(ValueError, match=r"sinks: expected dtype torch.float32, got torch.float64"):
            func(q, k, k, sinks=torch.zeros(4, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"sinks: expected shape \(4,\)"):
            func(q, k, k, sinks=torch.zeros(2))
    meta = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 1)
    with pytest.raises(ValueError, match=r"sinks: expected shape \(4,\)"):
        rfa.llama3_flash_attn_varlen_func(q[0], k[0], k[0], *meta[:4], 1, meta[4], causal=True, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match=r"window_size: expected a \(left, right\) pair of ints"):
        rfa.llama3_flash_attn_varlen_func(q[0], k[0], k[0], *meta[:4], 1, meta[4], causal=True, window_size=3)
    zmeta = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, 0, 1)
    with pytest.raises(ValueError, match=r"softcap: expected a finite float >= 0"):
        rfa.zigzag_llama3_flash_attn_varlen_func(q[0], k[0], k[0], *zmeta[:4], 1, zmeta[4], softcap=float("nan"))
    with pytest.raises(ValueError, match=r"window_size: expected a right side of -1 or 0 with causal=True"):
        rfa.zigzag_llama3_flash_attn_varlen_func(q[0], k[0], k[0], *zmeta[:4], 1, zmeta[4], window_size=(1, 1))


@pytest.mark.parametrize("scheme", ["ring", "zigzag", "stripe", "llama3", "zigzag_llama3"])
def test_single_process_matches_flash_attn(scheme):
    """World size 1: every scheme with a window, softcap and sinks is the single-device function."""
    _no_default_group()
    case = dict(_BASE, scheme=scheme, lens=[8, 8], form="batched" if scheme == "stripe" else "varlen",
                causal=False, window=(2, 3), softcap=2.0, sinks=True, impl="fused")
    gen = torch.Generator().manual_seed(_SEED)
    cu = cu_seqlens(case["lens"])
    q, dout = (torch.randn(16, 4, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(16, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    sinks_full = torch.randn(4, generator=gen)
    ref = _reference(case, q, k, v, dout, sinks_full, cu)
    sinks = sinks_full.clone().requires_grad_(True)
    out, lse, leaves, unpack = _call(case, q.clone(), k.clone(), v.clone(), cu, 0, 1, sinks)
    grads = torch.autograd.grad(out, leaves + [sinks], dout)
    got = (out, lse) + unpack(grads[:-1]) + (grads[-1],)
    for name, x, r in zip(_QUANTITIES, got, ref):
        assert rel_err(x, r) <= 1e-6, name
