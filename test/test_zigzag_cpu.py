"""Zigzag llama3 context parallelism on the CPU backend: gloo process groups of 2, 4 and 8 ranks.

Every distributed case draws a fresh random global batch (the same on every rank: one seed per
test session, printed in failure messages), computes single-process full attention on the
unsharded batch with the pure-PyTorch reference (test/reference.py, float64, autograd for the
gradients), shards the batch into the zigzag layout, runs ``zigzag_llama3_flash_attn_varlen_func``
on every rank, and checks the rank's out, LSE, dQ, dK and dV against the matching shard of the
reference (and the gathered output against the whole reference).

One ``torch.multiprocessing`` spawn per world size runs all of its cases (a spawn of 8 processes
costs seconds on a small machine, a case milliseconds); each case's result is reported by its own
pytest test. The helpers (shard/unshard, index maps, cu_seqlens preparation) and the
single-process error paths are tested without spawning.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Dict, List

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn.cp import zigzag_layout as zu
from ring_flash_attn.cp import zigzag_llama3
from dist_harness import NoHostReads, record_check, rel_err, SpawnedCases, torchrun
from cases import (assert_single_process_matches, case_maker, cu_seqlens, global_packed_batch, packed_reference,
                   single_process_batch)

_HERE = os.path.dirname(os.path.abspath(__file__))
_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 240

# ---- distributed cases ------------------------------------------------------------------------
# Global sequence lengths are multiples of 2N. Flags: impl in {"baseline", "grouped_python",
# "fused", "triton_alias"}; hs = heads_k_stride.

_BASE = dict(Hq=4, Hk=2, D=8, hs=1, dtype="float64", causal=True, scale=None, reduce=None, packed=None,
             no_host_reads=False)


_case = case_maker(_BASE)


CASES: Dict[int, List[dict]] = {
    2: [
        _case("gqa-hs1-baseline", [8, 20, 4, 12], impl="baseline"),
        _case("gqa-hs1-grouped_python", [8, 20, 4, 12], impl="grouped_python"),
        _case("gqa-hs1-fused", [8, 20, 4, 12], impl="fused"),
        _case("no-host-reads-baseline", [8, 20, 4, 12], impl="baseline", no_host_reads=True),
        _case("no-host-reads-grouped_python", [8, 20, 4, 12], impl="grouped_python", no_host_reads=True),
        _case("no-host-reads-fused", [8, 20, 4, 12], impl="fused", no_host_reads=True),
        _case("gqa-hs2-triton_alias", [8, 20, 4, 12], impl="triton_alias", hs=2),
        _case("mha-fp32-scale-fp32reduce-fused", [12, 4, 16], impl="fused", Hq=2, Hk=2, hs=2,
              dtype="float32", scale=0.3, reduce="float32"),
        _case("single-seq-kvpacked-grouped_python", [16], impl="grouped_python", packed="kv"),
        _case("single-seq-qkvpacked-baseline", [24], impl="baseline", Hq=2, Hk=2, packed="qkv"),
        _case("noncausal-mqa-fused", [8, 12], impl="fused", Hq=4, Hk=1, causal=False),
        _case("empty-seq-gqa-baseline", [8, 0, 12, 4], impl="baseline", Hq=6, Hk=3),
        _case("empty-seq-gqa-fused", [8, 0, 12, 4], impl="fused", Hq=6, Hk=3),
    ],
    4: [
        _case("gqa-hs1-baseline", [16, 40, 8], impl="baseline", Hq=6, Hk=3),
        _case("gqa-hs1-grouped_python", [16, 40, 8], impl="grouped_python", Hq=6, Hk=3),
        _case("gqa-hs1-fused", [16, 40, 8], impl="fused", Hq=6, Hk=3),
        _case("mqa-fp32-fused-fp32reduce", [24, 8], impl="fused", Hq=4, Hk=1, dtype="float32",
              reduce="float32"),
    ],
    8: [
        _case("gqa-hs1-baseline", [32, 16, 48], impl="baseline"),
        _case("gqa-hs1-grouped_python", [32, 16, 48], impl="grouped_python"),
        _case("gqa-hs1-fused", [32, 16, 48], impl="fused"),
    ],
}

# max |error| allowed, relative to max(1, max |reference|)
_TOL = {"float64": 1e-10, "float32": 3e-5}
_QUANTITIES = ("out", "lse", "dq", "dk", "dv", "gathered_out")


def _impl_flags(impl: str) -> dict:
    return {
        "baseline": {},
        "grouped_python": {"use_grouped_attention": True},
        "fused": {"use_fused_kernel": True},
        "triton_alias": {"use_triton_grouped": True},
    }[impl]




def _run_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    dtype = getattr(torch, case["dtype"])
    cu, q_full, k_full, v_full, dout_full = global_packed_batch(case, torch.Generator().manual_seed(seed))
    # single-process full attention on the unsharded batch (float64, autograd)
    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = packed_reference(
        *(t.to(dtype) for t in (q_full, k_full, v_full, dout_full)), cu, case["scale"], case["causal"])

    def shard(t):
        return zu.zigzag_shard(t, cu, rank, world_size)

    cu_q, cu_k, max_q, max_k, local_k_slice = rfa.zigzag_llama3_prepare_cu_seqlens(
        cu, causal=case["causal"], rank=rank, world_size=world_size)
    kw = dict(softmax_scale=case["scale"], causal=case["causal"], return_attn_probs=True,
              grad_reduce_dtype=None if case["reduce"] is None else getattr(torch, case["reduce"]),
              **_impl_flags(case["impl"]))
    q, k, v = (shard(t).to(dtype) for t in (q_full, k_full, v_full))
    if case["packed"] == "kv":
        q.requires_grad_(True)
        kv = torch.stack([k, v], dim=1).requires_grad_(True)
        out, lse, none = rfa.zigzag_llama3_flash_attn_varlen_kvpacked_func(
            q, kv, cu_q, cu_k, max_q, max_k, case["hs"], local_k_slice, **kw)
        dq, dkv = torch.autograd.grad(out, (q, kv), shard(dout_full).to(dtype))
        dk, dv = dkv[:, 0], dkv[:, 1]
    elif case["packed"] == "qkv":
        qkv = torch.stack([q, k, v], dim=1).requires_grad_(True)
        out, lse, none = rfa.zigzag_llama3_flash_attn_varlen_qkvpacked_func(
            qkv, cu_q, cu_k, max_q, max_k, case["hs"], local_k_slice, **kw)
        (dqkv,) = torch.autograd.grad(out, (qkv,), shard(dout_full).to(dtype))
        dq, dk, dv = dqkv.unbind(1)
    else:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        dout = shard(dout_full).to(dtype)
        guard = NoHostReads(zigzag_llama3) if case["no_host_reads"] else contextlib.nullcontext()
        with guard:
            out, lse, none = rfa.zigzag_llama3_flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, max_q, max_k, case["hs"], local_k_slice, **kw)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert none is None
    assert out.dtype == dtype and lse.dtype == torch.float32
    gathered = rfa.zigzag_gather(out.detach(), cu)
    return {
        "out": rel_err(out, shard(ref_out)),
        "lse": rel_err(lse, shard(ref_lse.t()).t()),
        "dq": rel_err(dq, shard(ref_dq)),
        "dk": rel_err(dk, shard(ref_dk)),
        "dv": rel_err(dv, shard(ref_dv)),
        "gathered_out": rel_err(gathered, ref_out),
    }


def _error_checks(rank: int, world_size: int) -> Dict[str, str]:
    """Each bad input must raise ValueError naming the argument (before any collective, on every
    rank alike). Returns {check: "" if it passed else what went wrong}."""
    import re

    N = world_size
    lens = [4 * N, 2 * N]
    cu = cu_seqlens(lens)
    T = int(cu[-1]) // N
    q = torch.randn(T, 4, 8, dtype=torch.float64)
    k = torch.randn(T, 2, 8, dtype=torch.float64)
    v = torch.randn(T, 2, 8, dtype=torch.float64)
    cu_q = torch.div(cu, N, rounding_mode="floor").to(torch.int32)

    def call(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu, hs=1):
        return rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4 * N, 4 * N, hs, None,
                                                        use_fused_kernel=True)

    # total unchanged, lengths not multiples of 2N: padded to 6N and 2N, a zigzag shard of 4 rows more
    bad_len = cu_seqlens([4 * N + N, 2 * N - N])
    checks = {
        "length-not-multiple-of-2N": (lambda: call(cu_q=torch.div(bad_len, N, rounding_mode="floor").to(torch.int32),
                                                   cu_k=bad_len),
                                      rf"cu_seqlens_k: expected the GLOBAL cumulative lengths of a batch whose zigzag "
                                      rf"shard has the {T} local tokens of q .* \({T + 2} local tokens\)"),
        "cu_seqlens_k-total": (lambda: call(cu_k=cu * 2, cu_q=cu_q * 2),
                               rf"cu_seqlens_k: expected the GLOBAL cumulative lengths of a batch whose zigzag shard "
                               rf"has the {T} local tokens of q .* \({2 * T} local tokens\)"),
        "cu_seqlens_q-global-not-local": (lambda: call(cu_q=cu) if N > 1 else call(cu_q=cu + 0 * cu + 1),
                                          r"cu_seqlens_q: expected the rank's LOCAL cumulative lengths"),
        "cu_seqlens-sizes": (lambda: call(cu_q=cu_q[:-1]), r"cu_seqlens_q: expected 3 entries"),
        "cu_seqlens-dtype": (lambda: call(cu_k=cu.long()), r"cu_seqlens_k: expected dtype torch.int32"),
        "heads_k_stride": (lambda: call(k=torch.randn(T, 4, 8, dtype=torch.float64),
                                        v=torch.randn(T, 4, 8, dtype=torch.float64), hs=3),
                           r"heads_k_stride: expected a divisor of the KV heads of k \(4\), got 3"),
        "mixed-dtypes": (lambda: call(k=k.float()),
                         r"k: expected dtype torch.float64 \(the dtype of q\), got torch.float32"),
        "mixed-devices": (lambda: call(v=v.to("meta")), r"v: expected a tensor on cpu \(the device of q\), got meta"),
        "local-tokens": (lambda: call(k=k[:-2], v=v[:-2]), rf"k: expected {T} local tokens"),
    }
    results = {}
    for name, (fn, pattern) in checks.items():
        try:
            fn()
            results[name] = "no error raised"
        except ValueError as e:
            results[name] = "" if re.search(pattern, str(e)) else f"message {str(e)!r} !~ {pattern!r}"
        except Exception as e:  # noqa: BLE001 - reported to the parent
            results[name] = f"{type(e).__name__}: {e}"
    return results


def _order_check(rank: int, world_size: int) -> List[str]:
    """The order in which one forward + backward (3 KV-head slices, fused) issues collectives,
    waits and kernels, recorded by wrapping torch.distributed and the ops."""
    import torch.distributed as dist

    from ring_flash_attn import ops as rfa_ops

    events: List[str] = []
    counters = {"ag": 0, "rs": 0}

    class _Work:
        def __init__(self, work, name):
            self.work, self.name = work, name

        def wait(self):
            events.append(f"wait {self.name}")
            return self.work.wait()

    def wrap_collective(fn, tag):
        def wrapped(*args, **kwargs):
            name = f"{tag}{counters[tag]}"
            counters[tag] += 1
            events.append(name)
            work = fn(*args, **kwargs)
            return _Work(work, name) if kwargs.get("async_op") else work
        return wrapped

    def wrap_kernel(fn, tag):
        def wrapped(*args, **kwargs):
            events.append(tag)
            return fn(*args, **kwargs)
        return wrapped

    saved = (dist.all_gather_into_tensor, dist.reduce_scatter_tensor, rfa_ops.fwd_into, rfa_ops.bwd_into)
    dist.all_gather_into_tensor = wrap_collective(saved[0], "ag")
    dist.reduce_scatter_tensor = wrap_collective(saved[1], "rs")
    rfa_ops.fwd_into = wrap_kernel(saved[2], "fwd")
    rfa_ops.bwd_into = wrap_kernel(saved[3], "bwd")
    try:
        N = world_size
        cu = cu_seqlens([4 * N, 2 * N])
        T = int(cu[-1]) // N
        q = torch.randn(T, 3, 8, dtype=torch.float64, requires_grad=True)
        k = torch.randn(T, 3, 8, dtype=torch.float64, requires_grad=True)
        v = torch.randn(T, 3, 8, dtype=torch.float64, requires_grad=True)
        cu_q = torch.div(cu, N, rounding_mode="floor").to(torch.int32)
        out = rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_q, cu, 4 * N, 4 * N, 1, None, use_fused_kernel=True)
        events.append("|")
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    finally:
        dist.all_gather_into_tensor, dist.reduce_scatter_tensor, rfa_ops.fwd_into, rfa_ops.bwd_into = saved
    return events


# Forward: slice s+1's all-gather is issued before slice s's kernel (and waited for only after
# it). Backward: the same for the gathers; slice s's reduce-scatter is waited for only after
# slice s+1's kernel has been issued.
EXPECTED_ORDER = ("ag0 ag1 wait ag0 fwd ag2 wait ag1 fwd wait ag2 fwd | "
                  "ag3 ag4 wait ag3 bwd rs0 ag5 wait ag4 bwd rs1 wait rs0 wait ag5 bwd rs2 wait rs1 wait rs2")


def _two_rank_checks(rank: int, world_size: int, seed: int, results: dict) -> None:
    """results["errors"] ({} unless two ranks); with two ranks the error checks and the overlap
    order (results["order"], or the failure)."""
    results["errors"] = {}
    if world_size != 2:
        return
    results["errors"] = _error_checks(rank, world_size)
    record_check(results, "order", lambda: " ".join(_order_check(rank, world_size)))


_results = SpawnedCases("zigzag", CASES, _run_case, _SEED, _SPAWN_TIMEOUT_S, _QUANTITIES, _TOL, _two_rank_checks)


@pytest.mark.parametrize("world_size,case", _results.params())
def test_zigzag_matches_full_attention(world_size, case, spawn_root):
    _results.assert_within(world_size, case, spawn_root)


@pytest.mark.parametrize("check", ["length-not-multiple-of-2N", "cu_seqlens_k-total", "cu_seqlens_q-global-not-local",
                                   "cu_seqlens-sizes", "cu_seqlens-dtype", "heads_k_stride", "mixed-dtypes",
                                   "mixed-devices", "local-tokens"])
def test_zigzag_errors_two_ranks(check, spawn_root):
    per_rank = _results(2, spawn_root)
    for r, res in enumerate(per_rank):
        assert res["errors"].get(check) == "", f"rank {r}: {check}: {res['errors'].get(check, 'not run')}"


def test_zigzag_overlap_order_two_ranks(spawn_root):
    """Communication is issued ahead of the kernels it overlaps with (see EXPECTED_ORDER)."""
    _results.assert_each_rank(2, spawn_root, "order", EXPECTED_ORDER)


# ---- single-process: helpers ---------------------------------------------------------------------


def _random_lengths(rng: random.Random, world_size: int, batch: int) -> List[int]:
    return [2 * world_size * rng.randrange(0, 5) for _ in range(batch)]


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_shard_unshard_round_trip(world_size):
    rng = random.Random(_SEED + world_size)
    lens = _random_lengths(rng, world_size, 4) + [2 * world_size]
    cu = cu_seqlens(lens)
    total = int(cu[-1])
    x = torch.randn(total, 3, 2, dtype=torch.float64)
    shards = [zu.zigzag_shard(x, cu, r, world_size) for r in range(world_size)]
    local_cu = zu.zigzag_local_cu_seqlens(cu, world_size).tolist()
    for r, s in enumerate(shards):
        assert s.shape == (total // world_size, 3, 2)
        # brute force: sequence b contributes chunk r then chunk 2N-1-r
        for b, L in enumerate(lens):
            c = L // (2 * world_size)
            start = int(cu[b])
            expect = torch.cat([x[start + r * c: start + (r + 1) * c],
                                x[start + (2 * world_size - 1 - r) * c: start + (2 * world_size - r) * c]])
            assert torch.equal(s[local_cu[b]:local_cu[b + 1]], expect), (r, b)
    assert torch.equal(zu.zigzag_unshard(shards, cu), x)
    # the gathered (rank-major) -> natural index map is a permutation
    idx = zu.zigzag_gathered_to_global_index(cu, world_size, total // world_size)
    assert torch.equal(idx.sort().values, torch.arange(total))


def test_shard_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing entries, got 8 then 6 at index 1"):
        zu.zigzag_shard(torch.zeros(6, 2), [0, 8, 6], 0, 2)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected the last entry to be 16 \(the rows of x\), got 8"):
        zu.zigzag_shard(torch.zeros(16, 2), [0, 8], 0, 2)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\)"):
        zu.zigzag_shard(torch.zeros(8, 2), [0, 8], 2, 2)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_zigzag_prepare_cu_seqlens(world_size):
    lens = [2 * world_size * m for m in (3, 1, 5)]
    cu = cu_seqlens(lens)
    cu_q, cu_k, max_q, max_k, local_k_slice = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, 0, world_size)
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert cu_q.tolist() == [x // world_size for x in cu.tolist()]
    assert cu_k.tolist() == cu.tolist()
    assert (max_q, max_k) == (max(lens) // world_size, max(lens))
    assert local_k_slice == slice(None)
    # with max_seqlen given nothing is read (but CPU values are still checked): the longest local
    # sequence of one of 1000 tokens, 2 ceil(1000 / 2N)
    assert rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, 0, world_size, max_seqlen=1000)[2:4] == (
        2 * -(-1000 // (2 * world_size)), 1000)
    # a length that is not a multiple of 2N is padded: 2 ceil(L / 2N) local rows
    odd = [1, 2 * world_size + 1] + lens
    cu_q, cu_k, max_q, max_k, _ = rfa.zigzag_llama3_prepare_cu_seqlens(cu_seqlens(odd), True, 0, world_size)
    local = [2 * -(-n // (2 * world_size)) for n in odd]
    assert cu_q.tolist() == cu_seqlens(local).tolist() and cu_k.tolist() == cu_seqlens(odd).tolist()
    assert (max_q, max_k) == (max(local), max(odd))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing entries"):
        rfa.zigzag_llama3_prepare_cu_seqlens([0, 4, 2], True, 0, world_size)


def _llama3_brute_force(cu: List[int], causal: bool, rank: int, world_size: int):
    """Upstream's contiguous llama3 layout, token by token."""
    total = cu[-1]
    per = total // world_size
    start, end = rank * per, (rank + 1) * per
    seqs = [b for b in range(len(cu) - 1) if cu[b + 1] > start and cu[b] < end]
    q_lens = [min(cu[b + 1], end) - max(cu[b], start) for b in seqs]
    first = cu[seqs[0]]
    k_lens = [(min(cu[b + 1], end) if causal else cu[b + 1]) - cu[b] for b in seqs]
    return q_lens, k_lens, slice(first, end if causal else cu[seqs[-1] + 1])


@pytest.mark.parametrize("causal", [True, False])
def test_llama3_prepare_cu_seqlens_matches_brute_force(causal):
    rng = random.Random(_SEED)
    for _ in range(20):
        world_size = rng.choice([1, 2, 4, 8])
        lens = [rng.randrange(1, 12) for _ in range(rng.randrange(1, 6))]
        cu = cu_seqlens(lens).tolist()
        # any total: the helper pads it to a multiple of N with a sequence of its own
        padded = cu + ([cu[-1] + (-cu[-1]) % world_size] if cu[-1] % world_size else [])
        for rank in range(world_size):
            cu_q, cu_k, max_q, max_k, sl = rfa.llama3_flash_attn_prepare_cu_seqlens(
                torch.tensor(cu, dtype=torch.int32), causal, rank, world_size)
            q_lens, k_lens, expect_sl = _llama3_brute_force(padded, causal, rank, world_size)
            got_q = [b - a for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:])]
            got_k = [b - a for a, b in zip(cu_k.tolist(), cu_k.tolist()[1:])]
            assert got_q == q_lens and got_k == k_lens and sl == expect_sl, (cu, rank, world_size)
            assert cu_q.tolist()[0] == 0 and cu_k.tolist()[0] == 0
            assert (max_q, max_k) == (max(q_lens), max(k_lens))
            assert sum(q_lens) == padded[-1] // world_size == -(-cu[-1] // world_size)


# ---- single-process (no process group: world size 1) --------------------------------------------


@pytest.mark.parametrize("impl", ["baseline", "grouped_python", "fused"])
def test_single_process_matches_full_attention(impl):
    """Without a process group the function is plain causal attention on the local batch (N = 1):
    out, lse and gradients against the reference, float64."""
    if __import__("torch.distributed").distributed.is_initialized():
        pytest.skip("a default process group is initialised in this process")
    batch = single_process_batch(_SEED, lens=[6, 2, 10], head_dim=16)
    cu, q, k, v, dout = batch
    out, lse, _ = rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu, cu, 10, 10, 1, None,
                                                           return_attn_probs=True, **_impl_flags(impl))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert_single_process_matches(out, lse, grads, batch, True, tol=1e-12)


def test_single_process_errors():
    if __import__("torch.distributed").distributed.is_initialized():
        pytest.skip("a default process group is initialised in this process")
    q = torch.randn(8, 4, 8)
    k = torch.randn(8, 2, 8)
    cu = cu_seqlens([8])
    f = rfa.zigzag_llama3_flash_attn_varlen_func
    # lengths 3 and 5 are padded to 4 and 6 (a shard of 10 rows, not 8)
    with pytest.raises(ValueError, match=r"cu_seqlens_k: expected the GLOBAL cumulative lengths of a batch whose "
                                         r"zigzag shard has the 8 local tokens of q .* \(10 local tokens\)"):
        f(q, k, k, cu_seqlens([4, 6]), cu_seqlens([3, 5]), 5, 5, 1, None)
    with pytest.raises(ValueError, match=r"q: expected an even number of local tokens"):
        f(q[:7], k[:7], k[:7], cu, cu, 8, 8, 1, None)
    with pytest.raises(ValueError, match=r"max_seqlen_k: expected a Python int"):
        f(q, k, k, cu, cu, 8, torch.tensor(8), 1, None)
    with pytest.raises(ValueError, match=r"local_k_slice: expected a slice or None, got int"):
        f(q, k, k, cu, cu, 8, 8, 1, 3)
    with pytest.raises(ValueError, match=r"grad_reduce_dtype: expected None, torch.float32"):
        f(q, k, k, cu, cu, 8, 8, 1, None, grad_reduce_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q: expected a number of heads divisible by the KV heads of k \(3\), got 4"):
        f(q, torch.randn(8, 3, 8), torch.randn(8, 3, 8), cu, cu, 8, 8, 1, None)
    with pytest.raises(NotImplementedError, match=r"dropout_p"):
        f(q, k, k, cu, cu, 8, 8, 1, None, 0.1)
    with pytest.raises(ValueError, match=r"kv: expected a 4-D tensor"):
        rfa.zigzag_llama3_flash_attn_varlen_kvpacked_func(q, k, cu, cu, 8, 8, 1, None)


def test_impl_flags_resolution():
    from ring_flash_attn.cp.zigzag_llama3 import resolve_impl

    assert resolve_impl() == "baseline"
    assert resolve_impl(use_grouped_attention=True) == "grouped_python"
    assert resolve_impl(use_triton_grouped=True) == "fused"
    assert resolve_impl(use_fused_kernel=True) == "fused"
    assert resolve_impl(use_grouped_attention=True, use_triton_grouped=True) == "fused"


@pytest.mark.parametrize("impl", ["baseline", "grouped_python", "fused"])
def test_single_process_no_host_reads(impl):
    """Forward and backward read no tensor value on the host (the no-sync guarantee, checked on
    the CPU backend by making every host read raise)."""
    if __import__("torch.distributed").distributed.is_initialized():
        pytest.skip("a default process group is initialised in this process")
    cu = cu_seqlens([4, 12, 8])
    q = torch.randn(24, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(24, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(24, 2, 8, dtype=torch.float64, requires_grad=True)
    with NoHostReads(zigzag_llama3):
        out = rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, 1, None, **_impl_flags(impl))
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    with pytest.raises(AssertionError, match="host read"), NoHostReads(zigzag_llama3):
        torch.zeros(2).tolist()  # the guard itself works


# ---- the distributed benchmark, end to end on gloo ------------------------------------------------


def test_distributed_benchmark_runs_on_gloo(tmp_path):
    """benchmark/benchmark_zigzag_distributed.py under torchrun with 2 CPU ranks: exit 0, a table
    per (impl, pass) and one CSV row per (rank, impl, pass) with positive times and their ratio."""
    import csv

    script = os.path.join(os.path.dirname(_HERE), "benchmark", "benchmark_zigzag_distributed.py")
    out_csv = tmp_path / "zigzag.csv"
    r = torchrun(script, ["--device", "cpu", "--seqlens", "64", "--num-runs", "2", "--warmup", "1", "--csv",
                          str(out_csv)], nproc=2, timeout_s=180, stdout_tail=3000)
    assert r.stdout.count("Kernels (ms)") == 3 * 2, r.stdout
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 2
    assert {(row["rank"], row["impl"], row["pass"]) for row in rows} == {
        (str(rk), impl, p) for rk in (0, 1) for impl in ("baseline", "grouped_python", "fused")
        for p in ("fwd", "fwd_bwd")}
    for row in rows:
        step, kern, ratio = float(row["step_ms"]), float(row["kernels_ms"]), float(row["ratio"])
        assert step > 0 and kern > 0 and abs(ratio - step / kern) <= 1e-3 * ratio + 1e-3, row
        assert row["world_size"] == "2" and row["backend"] == "gloo"


def test_gpu_script_smoke_on_gloo():
    """test/test_zigzag_llama3_grouped.py (the torchrun GPU test) in its --device cpu mode with 2
    ranks and tiny shapes: every check passes, the no-sync / graph checks are skipped."""
    script = os.path.join(_HERE, "test_zigzag_llama3_grouped.py")
    r = torchrun(script, ["--device", "cpu", "--seqlens", "64", "--num-heads-q", "4", "--num-heads-k", "2",
                          "--head-dim", "16", "--heads-k-stride", "1", "--varlen-unit", "1", "--seed", str(_SEED)],
                 nproc=2, timeout_s=180)
    # 2 workloads x 3 impls x (out, lse, dq, dk, dv) + 2 x 2 comparisons with the baseline
    assert "34 passed, 1 skipped, 0 failed" in r.stdout, r.stdout[-4000:]
