"""Reliability of the context-parallel package on the CPU backend: what a wrong or changing input
does instead of a silently wrong answer.

* Metadata helpers and narrowing: ``llama3_flash_attn_prepare_cu_seqlens`` rejects malformed
  cu_seqlens, and every value or count that the package stores as int32 is checked before it is
  narrowed (``update_ring_flash_attn_params``, list inputs of the helpers, token counts).
* Metadata changed between forward and backward: the caller's cu_seqlens tensors are saved
  through autograd, so an in-place change after the forward makes the backward raise instead
  of computing gradients for other sequences.
* ``torch.compile`` of the metadata helpers (with and without
  ``torch._dynamo.config.capture_scalar_outputs``).
* Ranks that disagree: with ``RING_FLASH_ATTN_CHECK_METADATA=1`` every scheme compares a
  fingerprint of its arguments across the ranks (gloo processes) and raises a RuntimeError on
  every rank naming what differs, before any collective whose shape depends on it.
* The public functions' signatures: type hints, no private types.
"""

from __future__ import annotations

import random

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn import hf_adapter
from ring_flash_attn.cp import validation
from cases import cu_seqlens

_SEED = random.SystemRandom().randrange(1 << 30)
_INT32_MAX = 2**31 - 1


# ---- metadata helpers and int32 narrowing ---------------------------------------------------------


@pytest.mark.parametrize("cu,pattern", [
    ([0, 10, 4, 16], r"cu_seqlens: expected non-decreasing entries, got 10 then 4 at index 1"),
    ([0, 6, 16, 12], r"cu_seqlens: expected non-decreasing entries, got 16 then 12 at index 2"),
    ([3, 10, 16], r"cu_seqlens: expected the first entry to be 0, got 3"),
])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_llama3_prepare_rejects_malformed_cu_seqlens(cu, pattern, as_tensor):
    arg = torch.tensor(cu, dtype=torch.int32) if as_tensor else cu
    for rank in range(2):
        with pytest.raises(ValueError, match=pattern):
            rfa.llama3_flash_attn_prepare_cu_seqlens(arg, True, rank, 2)


@pytest.mark.parametrize("helper", ["llama3", "zigzag"])
def test_prepare_helpers_reject_list_entries_beyond_int32(helper):
    cu = [0, 2**32 + 8]  # would wrap to [0, 8]
    fn = rfa.llama3_flash_attn_prepare_cu_seqlens if helper == "llama3" else rfa.zigzag_llama3_prepare_cu_seqlens
    with pytest.raises(ValueError, match=r"cu_seqlens: expected entries in \[0, 2147483647\] \(they are stored as "
                                         r"int32\), got 4294967304 at index 1"):
        fn(cu, True, 0, 2)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_update_ring_flash_attn_params_rejects_values_beyond_int32(as_tensor):
    values = [0, 2**31 + 4, 2**32 + 8]  # would be stored as [0, -2147483644, 8]
    cu = torch.tensor(values, dtype=torch.int64) if as_tensor else values
    saved = hf_adapter._STATE.batch
    try:
        with pytest.raises(ValueError, match=r"cu_seqlens: expected entries in \[0, 2147483647\] \(they are stored "
                                             r"as int32\), got 2147483652 at index 1"):
            hf_adapter.update_ring_flash_attn_params(cu)
        # the largest int32 total is accepted and kept exactly
        hf_adapter.update_ring_flash_attn_params(torch.tensor([0, 5, _INT32_MAX], dtype=torch.int64) if as_tensor
                                                 else [0, 5, _INT32_MAX])
        assert hf_adapter._STATE.batch.total == _INT32_MAX
    finally:
        hf_adapter._STATE.batch = saved


def test_llama3_rejects_more_gathered_tokens_than_int32():
    # stride-0 views: the shapes say 2^31 local tokens without allocating them
    T = 2**31
    q = torch.zeros(1, 2, 8, dtype=torch.float64).expand(T, 2, 8)
    k = torch.zeros(1, 1, 8, dtype=torch.float64).expand(T, 1, 8)
    cu = cu_seqlens([16])
    with pytest.raises(ValueError, match=r"q: expected at most 2147483647 tokens in the gathered K/V \(world_size 1 "
                                         r"x 2147483648 local tokens\) \(int32 cumulative lengths\), got 2147483648"):
        rfa.llama3_flash_attn_varlen_func(q, k, k, cu, cu, 16, 16, 1, None)


def _small_inputs(T, Hq=2, Hk=1, D=8, B=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (T,) if B is None else (B, T)
    q = torch.randn(*shape, Hq, D, generator=gen, dtype=dtype)
    k = torch.randn(*shape, Hk, D, generator=gen, dtype=dtype)
    v = torch.randn(*shape, Hk, D, generator=gen, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("path", ["ring-batched", "llama3", "zigzag-llama3-grouped-python"])
def test_int32_count_checks_are_wired_into_every_path(path, monkeypatch):
    """The count checks with the int32 limit scaled down to 40 (the real limit needs > 2^31 rows):
    each path checks the count it narrows before using it."""
    monkeypatch.setattr(validation, "INT32_MAX", 40)
    if path == "ring-batched":
        q, k, v = _small_inputs(24, B=2)  # 48 local tokens
        with pytest.raises(ValueError, match=r"q: expected at most 40 local tokens \(batch \* local_seqlen\) \(int32 "
                                             r"cumulative lengths\), got 48"):
            rfa.zigzag_ring_flash_attn_func(q, k, v, causal=True)
    elif path == "llama3":
        q, k, v = _small_inputs(48)
        cu = cu_seqlens([20, 28])
        with pytest.raises(ValueError, match=r"q: expected at most 40 tokens in the gathered K/V \(world_size 1 x 48 "
                                             r"local tokens\)"):
            rfa.llama3_flash_attn_varlen_func(q, k, v, cu, cu, 28, 28, 1, None)
    else:
        q, k, v = _small_inputs(32)  # 32 gathered rows fit, the 64 rows of the duplicated K/V do not
        cu = cu_seqlens([12, 20])
        with pytest.raises(ValueError, match=r"q: expected at most 40 rows of the K/V duplicated by "
                                             r"use_grouped_attention \(2 x world_size 1 x 32 local tokens\)"):
            rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, 1, use_grouped_attention=True)


@pytest.mark.parametrize("cu_q,cu_k,k_slice,causal,pattern", [
    # a rank's first sequence cannot start after its first token
    ([0, 6, 16], [0, 6, 14], slice(2, 16), True,
     r"local_k_slice: expected a start <= 0 \(the rank's first token: the keys of its first sequence piece start at "
     r"or before it\), got 2"),
    # a sequence starting among the queries starts at the same row among the keys
    ([0, 6, 16], [0, 5, 16], slice(0, 16), True,
     r"cu_seqlens_k: expected entry 1 to be 6 \(where cu_seqlens_q\[1\] = 6 puts that sequence's start"),
    # causal: the keys end at the rank's last token
    ([0, 6, 16], [0, 6, 15], slice(0, 16), True,
     r"cu_seqlens_k: expected the last entry to be 16 \(causal: the keys end at the rank's last token"),
])
def test_llama3_rejects_keys_the_contiguous_layout_does_not_give(cu_q, cu_k, k_slice, causal, pattern):
    """Metadata whose key ranges do not follow from its query pieces (e.g. another rank's or
    another batch's cu_seqlens_k): the attention would be over the wrong keys."""
    q, k, v = _small_inputs(16)
    with pytest.raises(ValueError, match=pattern):
        rfa.llama3_flash_attn_varlen_func(q, k, v, torch.tensor(cu_q, dtype=torch.int32),
                                          torch.tensor(cu_k, dtype=torch.int32), 10, 10, 1, k_slice, causal=causal)


# ---- torch.compile of the metadata helpers --------------------------------------------------------


def _assert_same_metadata(got, want, what):
    assert len(got) == 5, what
    for i in (0, 1):
        assert got[i].dtype == torch.int32 and torch.equal(got[i], want[i]), f"{what}: output {i} {got[i]} != {want[i]}"
    assert (int(got[2]), int(got[3])) == (want[2], want[3]), f"{what}: maxima {got[2:4]} != {want[2:4]}"
    assert got[4] == want[4], f"{what}: slice {got[4]} != {want[4]}"


@pytest.mark.parametrize("capture_scalar_outputs", [True, False])
def test_torch_compile_llama3_prepare_cu_seqlens(capture_scalar_outputs):
    """Compiles (it failed with GuardOnDataDependentSymNode at the total % world_size check when
    scalar outputs are captured), returns what the eager call returns and keeps its ValueErrors."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=capture_scalar_outputs):
        compiled = torch.compile(rfa.llama3_flash_attn_prepare_cu_seqlens)
        for lens, causal, rank, world_size in [([5, 11, 3, 13], True, 1, 2), ([7, 13, 2, 10], False, 2, 4),
                                               ([9, 23], True, 3, 4), ([0, 8, 0, 8], False, 0, 2),
                                               ([1, 7, 13], True, 3, 4), ([5, 6], False, 2, 3)]:
            cu = cu_seqlens(lens)
            want = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, world_size)
            _assert_same_metadata(compiled(cu, causal, rank, world_size), want, f"{lens} rank {rank}/{world_size}")
        with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing entries"):
            compiled(torch.tensor([0, 10, 4, 16], dtype=torch.int32), True, 0, 2)
    torch._dynamo.reset()


@pytest.mark.parametrize("capture_scalar_outputs", [True, False])
@pytest.mark.parametrize("with_max_seqlen", [True, False])
def test_torch_compile_zigzag_llama3_prepare_cu_seqlens(capture_scalar_outputs, with_max_seqlen):
    """Traces without a graph break (fullgraph=True) where no host read is asked for: with
    max_seqlen, or with captured scalar outputs; a malformed cu_seqlens trips the device-side
    assert (a RuntimeError on CPU) instead of passing."""
    fullgraph = with_max_seqlen or capture_scalar_outputs
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=capture_scalar_outputs):
        compiled = torch.compile(rfa.zigzag_llama3_prepare_cu_seqlens, fullgraph=fullgraph)
        for lens, world_size in [([8, 12, 4, 8], 2), ([16, 8, 24], 4), ([1, 7, 13], 2)]:
            cu = cu_seqlens(lens)
            kw = dict(max_seqlen=max(lens)) if with_max_seqlen else {}
            want = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, 1, world_size, **kw)
            _assert_same_metadata(compiled(cu, True, 1, world_size, **kw), want, f"{lens} world {world_size}")
        kw = dict(max_seqlen=12) if with_max_seqlen else {}
        with pytest.raises(RuntimeError, match=r"cu_seqlens: expected cumulative lengths from 0, non-decreasing"):
            compiled(torch.tensor([0, 8, 6, 12], dtype=torch.int32), True, 1, 2, **kw)
    torch._dynamo.reset()


# ---- metadata changed between forward and backward ------------------------------------------------

_INPLACE_ERROR = r"one of the variables needed for gradient computation has been modified by an inplace operation"


def _varlen_call(scheme: str, q, k, v, lens):
    """(run, metadata tensors the caller owns) for `scheme` on one process: run() is the forward."""
    cu = cu_seqlens(lens)
    if scheme in ("ring", "zigzag_ring"):
        fn = rfa.ring_flash_attn_varlen_func if scheme == "ring" else rfa.zigzag_ring_flash_attn_varlen_func
        return (lambda: fn(q, k, v, cu, max(lens), causal=True)), {"cu_seqlens": cu}
    if scheme == "llama3":
        cu_q, cu_k, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 1)
        return (lambda: rfa.llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 1, ks, causal=True)), \
            {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    cu_q, cu_k, mq, mk, ks = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, 0, 1)
    return (lambda: rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 1, ks, causal=True)), \
        {"cu_seqlens_k": cu_k}


_SCHEME_METADATA = [("ring", "cu_seqlens"), ("zigzag_ring", "cu_seqlens"), ("llama3", "cu_seqlens_q"),
                    ("llama3", "cu_seqlens_k"), ("zigzag_llama3", "cu_seqlens_k")]


@pytest.mark.parametrize("scheme,name", _SCHEME_METADATA)
def test_metadata_changed_after_forward_makes_backward_raise(scheme, name):
    """The caller's cu_seqlens changed in place between forward and backward (another batch's
    lengths, same number of entries): the backward raises autograd's in-place error instead of
    computing the gradients of the other batch (before: dq off by a relative 30)."""
    q, k, v = (t.requires_grad_(True) for t in _small_inputs(16, Hq=4, Hk=2, seed=_SEED))
    run, metadata = _varlen_call(scheme, q, k, v, [6, 10])
    out = run()
    other = metadata[name].clone()
    other[1] = 10  # lengths [10, 6]: a valid batch of the same total
    metadata[name].copy_(other)
    with pytest.raises(RuntimeError, match=_INPLACE_ERROR):
        out.backward(torch.randn_like(out))


@pytest.mark.parametrize("scheme", ["ring", "zigzag_ring", "llama3", "zigzag_llama3"])
def test_metadata_unchanged_backward_matches_reference(scheme):
    """The control of the test above: the same calls without the change give the reference
    gradients (and changing the metadata AFTER the backward is allowed)."""
    from reference import grouped_attention_reference

    lens = [6, 10]
    q, k, v = (t.requires_grad_(True) for t in _small_inputs(16, Hq=4, Hk=2, seed=_SEED))
    run, metadata = _varlen_call(scheme, q, k, v, lens)
    out = run()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    cu = cu_seqlens(lens)
    (ref_out,), _ = grouped_attention_reference([q], k, v, [cu], cu, None, None, True)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    for name, g, rg in zip("qkv", grads, ref_grads):
        err = (g - rg).abs().max().item() / max(1.0, rg.abs().max().item())
        assert err <= 1e-10, f"{scheme}: d{name} relative error {err:.3e}"
    for t in metadata.values():
        t.zero_()


# ---- ranks that disagree (gloo processes, RING_FLASH_ATTN_CHECK_METADATA=1) ----------------------------


def _shard_inputs(world_size: int, T_local: int, dtype=torch.float64, Hq=4, Hk=2, D=8, seed=0, batched=False):
    """The rank-independent global q, k, v ([N T, H, D], or [1, N T, H, D]) and the slicer of rank r's
    contiguous part."""
    gen = torch.Generator().manual_seed(seed)
    total = world_size * T_local
    q = torch.randn(total, Hq, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(total, Hk, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(total, Hk, D, generator=gen, dtype=torch.float64).to(dtype)

    def part(rank):
        rows = slice(rank * T_local, (rank + 1) * T_local)
        ts = [t[rows].clone().requires_grad_(True) for t in (q, k, v)]
        return [t.unsqueeze(0) for t in ts] if batched else ts

    return part


def _ring_varlen(rank, world_size, cu_local, causal=True, fn=None, dtype=torch.float64, scale=None):
    T = int(cu_local[-1])
    q, k, v = _shard_inputs(world_size, T, dtype)(rank)
    fn = fn or rfa.ring_flash_attn_varlen_func
    lens = (cu_local[1:] - cu_local[:-1]).tolist()
    return fn(q, k, v, cu_local, max(lens), causal=causal, softmax_scale=scale)


def _ring_batched(rank, world_size, L, fn, causal=True, scale=None, deterministic=False):
    q, k, v = _shard_inputs(world_size, L, batched=True)(rank)
    return fn(q, k, v, causal=causal, softmax_scale=scale, deterministic=deterministic)


def _llama3(rank, world_size, lens, causal=True, hs=1):
    cu = cu_seqlens(lens)
    T = int(cu[-1]) // world_size
    q, k, v = _shard_inputs(world_size, T)(rank)
    cu_q, cu_k, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal, rank, world_size)
    return rfa.llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, hs, ks, causal=causal)


def _zigzag_llama3(rank, world_size, lens, grad_reduce_dtype=None):
    cu = cu_seqlens(lens)
    T = int(cu[-1]) // world_size
    q, k, v = _shard_inputs(world_size, T)(rank)  # any rows: the check and the result's shape are what count
    cu_q, cu_k, mq, mk, ks = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, rank, world_size)
    return rfa.zigzag_llama3_flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 1, ks, causal=True,
                                                    grad_reduce_dtype=grad_reduce_dtype)


def _hf_attention(rank, world_size, lens, causal=True, update=True):
    cu = cu_seqlens(lens)
    if update:
        hf_adapter.update_ring_flash_attn_params(cu)
    else:
        hf_adapter._STATE.batch = None
    T = int(cu[-1]) // world_size
    q, k, v = _shard_inputs(world_size, T)(rank)
    as_hf = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # [1, H, T, D]
    out, _ = hf_adapter.llama3_attention_forward(torch.nn.Identity(), *as_hf, None, is_causal=causal)
    return out


def _zigzag_gather(rank, world_size, cols):
    cu = cu_seqlens([world_size * 4])
    x = torch.arange(4 * cols, dtype=torch.float64).reshape(4, cols) + 100 * rank
    return rfa.zigzag_gather(x, cu)


def _rank1(value_0, value_1):
    """value_1 on rank 1, value_0 on the other ranks."""
    return lambda rank: value_1 if rank == 1 else value_0


_CU_A, _CU_B = cu_seqlens([5, 3]), cu_seqlens([3, 5])
_DISAGREE = r"ranks disagree on "

# (id, call(rank, world_size), {rank: (exception type, message pattern)} for every rank; None: no exception)
_RuntimeAll = "RuntimeError"
DIST_CASES = {
    2: [
        ("ring-varlen-causal", lambda r, n: _ring_varlen(r, n, _CU_A, causal=_rank1(True, False)(r)),
         (_RuntimeAll, r"ring_flash_attn_varlen_func on 2 ranks: ranks disagree on causal: rank 0 True, rank 1 False")),
        ("ring-varlen-cu_seqlens", lambda r, n: _ring_varlen(r, n, _rank1(_CU_A, _CU_B)(r)),
         (_RuntimeAll, _DISAGREE + r"the values of cu_seqlens: rank 0 hash [0-9a-f]{16}, rank 1 hash [0-9a-f]{16}")),
        ("zigzag-ring-varlen-dtype",
         lambda r, n: _ring_varlen(r, n, cu_seqlens([4, 4]), fn=rfa.zigzag_ring_flash_attn_varlen_func,
                                   dtype=_rank1(torch.float64, torch.float32)(r)),
         (_RuntimeAll, _DISAGREE + r"the dtype of q: rank 0 torch.float64, rank 1 torch.float32")),
        ("ring-batched-shape", lambda r, n: _ring_batched(r, n, _rank1(4, 6)(r), rfa.ring_flash_attn_func),
         (_RuntimeAll, r"ring_flash_attn_func on 2 ranks: ranks disagree on the shape of q: rank 0 \(1, 4, 4, 8\), "
                       r"rank 1 \(1, 6, 4, 8\)")),
        ("stripe-softmax_scale",
         lambda r, n: _ring_batched(r, n, 4, rfa.stripe_flash_attn_func, scale=_rank1(None, 0.3)(r)),
         (_RuntimeAll, r"stripe_flash_attn_func on 2 ranks: ranks disagree on softmax_scale: rank 0 "
                       r"0.35355339059327\d*, rank 1 0.3")),
        ("zigzag-ring-deterministic",
         lambda r, n: _ring_batched(r, n, 4, rfa.zigzag_ring_flash_attn_func, deterministic=_rank1(False, True)(r)),
         (_RuntimeAll, _DISAGREE + r"deterministic: rank 0 False, rank 1 True")),
        ("different-functions",
         lambda r, n: _ring_varlen(r, n, cu_seqlens([4, 4]), fn=_rank1(rfa.ring_flash_attn_varlen_func,
                                                                       rfa.zigzag_ring_flash_attn_varlen_func)(r)),
         (_RuntimeAll, _DISAGREE + r"the function called: rank 0 ring_flash_attn_varlen_func, rank 1 "
                       r"zigzag_ring_flash_attn_varlen_func")),
        ("llama3-heads_k_stride", lambda r, n: _llama3(r, n, [5, 11], hs=_rank1(1, 2)(r)),
         (_RuntimeAll, r"llama3_flash_attn_varlen_func on 2 ranks: ranks disagree on heads_k_stride: rank 0 1, "
                       r"rank 1 2")),
        ("llama3-cu_seqlens", lambda r, n: _llama3(r, n, _rank1([5, 11], [10, 6])(r)),
         (_RuntimeAll, _DISAGREE + r"the sequence boundaries: rank 1 starts the sequence holding its first token 8 "
                       r"at token 0 \(local_k_slice.start\), but the ranks' cu_seqlens_q put the last sequence start "
                       r"at or before token 8 at 5")),
        ("llama3-cu_seqlens-noncausal", lambda r, n: _llama3(r, n, _rank1([5, 11], [10, 6])(r), causal=False),
         (_RuntimeAll, _DISAGREE + r"the sequence boundaries")),
        ("zigzag-llama3-cu_seqlens", lambda r, n: _zigzag_llama3(r, n, _rank1([8, 8], [4, 12])(r)),
         (_RuntimeAll, _DISAGREE + r"the values of cu_seqlens_q")),
        ("zigzag-llama3-grad_reduce_dtype",
         lambda r, n: _zigzag_llama3(r, n, [8, 8], grad_reduce_dtype=_rank1(None, torch.float32)(r)),
         (_RuntimeAll, _DISAGREE + r"the dtype of the dK/dV reduction \(grad_reduce_dtype\): rank 0 torch.float64, "
                       r"rank 1 torch.float32")),
        ("one-rank-rejects", lambda r, n: _llama3(r, n, [5, 11], hs=_rank1(1, 3)(r)),
         {0: ("RuntimeError", r"llama3_flash_attn_varlen_func on 2 ranks: rank 1 rejected its arguments \(the error "
                              r"raised there says why\)"),
          1: ("ValueError", r"heads_k_stride: expected a divisor of the KV heads of k \(2\), got 3")}),
        ("hf-update-cu_seqlens", lambda r, n: hf_adapter.update_ring_flash_attn_params(
            cu_seqlens(_rank1([5, 11], [10, 6])(r))),
         (_RuntimeAll, r"update_ring_flash_attn_params on 2 ranks: ranks disagree on the values of cu_seqlens")),
        ("hf-attention-causal", lambda r, n: _hf_attention(r, n, [5, 11], causal=_rank1(True, False)(r)),
         (_RuntimeAll, r"llama3_flash_attn_varlen_func on 2 ranks: ranks disagree on causal: rank 0 True, "
                       r"rank 1 False")),
        ("hf-attention-no-batch", lambda r, n: _hf_attention(r, n, [5, 11], update=_rank1(True, False)(r)),
         {0: ("RuntimeError", r"rank 1 rejected its arguments"),
          1: ("RuntimeError", r"no batch metadata: call update_ring_flash_attn_params")}),
        ("zigzag-gather-shape", lambda r, n: _zigzag_gather(r, n, _rank1(3, 5)(r)),
         (_RuntimeAll, r"zigzag_gather on 2 ranks: ranks disagree on the shape of x_local: rank 0 \(4, 3\), "
                       r"rank 1 \(4, 5\)")),
        # controls (after all the errors above: the group is still in step)
        ("agree-ring-varlen", lambda r, n: _ring_varlen(r, n, _CU_A), None),
        ("agree-zigzag-ring-varlen",
         lambda r, n: _ring_varlen(r, n, cu_seqlens([4, 2]), fn=rfa.zigzag_ring_flash_attn_varlen_func), None),
        ("agree-stripe", lambda r, n: _ring_batched(r, n, 4, rfa.stripe_flash_attn_func, scale=0.3), None),
        ("agree-llama3", lambda r, n: _llama3(r, n, [5, 11, 3, 13]), None),
        ("agree-llama3-noncausal", lambda r, n: _llama3(r, n, [5, 11, 3, 13], causal=False), None),
        ("agree-zigzag-llama3", lambda r, n: _zigzag_llama3(r, n, [8, 12, 4]), None),
        ("agree-hf", lambda r, n: _hf_attention(r, n, [7, 2, 9, 14]), None),
        ("agree-zigzag-gather", lambda r, n: _zigzag_gather(r, n, 3), None),
    ],
    4: [
        ("causal-rank2", lambda r, n: _llama3(r, n, [5, 11, 3, 13], causal=r != 2),
         (_RuntimeAll, _DISAGREE + r"causal: ranks 0, 1 and 3 True, rank 2 False")),
        # rank 2's first sequence starts at 12 in its batch, at 14 in the others'
        ("llama3-start", lambda r, n: _llama3(r, n, [5, 6, 1, 20] if r == 2 else [5, 6, 3, 18]),
         (_RuntimeAll, _DISAGREE + r"the sequence boundaries: rank 2 starts the sequence holding its first token 16 "
                       r"at token 12 \(local_k_slice.start\), but the ranks' cu_seqlens_q put the last sequence start "
                       r"at or before token 16 at 14")),
        # not causal: rank 0's last sequence ends at 12 in its batch, at 11 in the others'
        ("llama3-end", lambda r, n: _llama3(r, n, [5, 7, 2, 18] if r == 0 else [5, 6, 3, 18], causal=False),
         (_RuntimeAll, _DISAGREE + r"the sequence boundaries: rank 0 ends the sequence holding its last token 7 at "
                       r"token 12 \(local_k_slice.start \+ cu_seqlens_k\[-1\]\), but the ranks' metadata put the first "
                       r"sequence boundary at or after token 8 at 11")),
        # a different batch that gives rank 3 the metadata of the others' batch is no disagreement
        ("agree-llama3-same-metadata", lambda r, n: _llama3(r, n, [5, 7, 2, 18] if r == 3 else [5, 6, 3, 18]), None),
    ] + [(f"agree-llama3-random-{i}-{'causal' if c else 'noncausal'}",
          (lambda lens, c: lambda r, n: _llama3(r, n, lens, causal=c))(lens, c), None)
         for i, lens in enumerate([[1, 7, 8, 16], [8, 8, 8, 8], [31, 1], [2, 2, 2, 2, 2, 2, 2, 2, 16], [32], [0, 12, 0, 20]])
         for c in (True, False)],
}


def _run_dist_case(call, rank: int, world_size: int) -> dict:
    import os

    try:
        out = call(rank, world_size)
    except Exception as e:  # noqa: BLE001 - recorded, compared by the test
        return {"raised": type(e).__name__, "message": str(e)}
    # a control: the same call without the check gives the same result
    os.environ["RING_FLASH_ATTN_CHECK_METADATA"] = "0"
    try:
        again = call(rank, world_size)
    finally:
        os.environ["RING_FLASH_ATTN_CHECK_METADATA"] = "1"
    same = out is None and again is None or bool(torch.equal(out, again))
    return {"raised": None, "same_without_check": same}


def _dist_worker(rank: int, world_size: int, port: int, seed: int, out_dir: str) -> None:
    import datetime
    import json
    import os

    import torch.distributed as dist

    os.environ["RING_FLASH_ATTN_CHECK_METADATA"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    results = {"cases": {}}
    try:
        for case_id, call, _ in DIST_CASES[world_size]:
            results["cases"][case_id] = _run_dist_case(call, rank, world_size)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _make_spawns():
    from dist_harness import CachedSpawns

    return CachedSpawns(_dist_worker, _SEED, "cp_reliability", 240)


_spawns = _make_spawns()


@pytest.mark.parametrize("world_size,case_id,expected", [
    pytest.param(ws, case_id, expected, id=f"w{ws}-{case_id}") for ws in sorted(DIST_CASES)
    for case_id, _, expected in DIST_CASES[ws]])
def test_ranks_that_disagree_get_an_error_on_every_rank(world_size, case_id, expected, spawn_root):
    import re

    per_rank = _spawns(world_size, spawn_root)
    for rank, res in enumerate(per_rank):
        got = res["cases"][case_id]
        if expected is None:
            assert got["raised"] is None, f"rank {rank}: {got}"
            assert got["same_without_check"], f"rank {rank}: the result differs without the check"
            continue
        kind, pattern = expected[rank] if isinstance(expected, dict) else expected
        assert got["raised"] == kind and re.search(pattern, got["message"]), (
            f"rank {rank} of {world_size}: expected {kind} matching {pattern!r}, got {got}")


# ---- the public functions' signatures ------------------------------------------------------------------


def _public_cp_functions():
    import inspect

    names = []
    for name in rfa.__all__:
        obj = getattr(rfa, name)
        module = getattr(obj, "__module__", "") or ""
        if inspect.isfunction(obj) and (module.startswith("ring_flash_attn.cp") or module == "ring_flash_attn.hf_adapter"):
            names.append(name)
    return names


def test_public_cp_functions_are_found():
    names = _public_cp_functions()
    # every scheme's functions, the layout helpers and the HF adapter's
    for expected in ("ring_flash_attn_func", "zigzag_ring_flash_attn_varlen_qkvpacked_func", "stripe_flash_attn_func",
                     "llama3_flash_attn_varlen_kvpacked_func", "zigzag_llama3_flash_attn_varlen_func",
                     "llama3_flash_attn_prepare_cu_seqlens", "zigzag_shard", "update_ring_flash_attn_params"):
        assert expected in names
    assert len(names) >= 30, names


@pytest.mark.parametrize("name", _public_cp_functions())
def test_public_cp_function_signature_is_typed_and_public(name):
    """help() shows type hints for every parameter and the return value, and no private type
    (a name starting with an underscore, e.g. an internal result class)."""
    import inspect
    import pydoc
    import re
    import typing

    from torch.distributed import ProcessGroup

    fn = getattr(rfa, name)
    sig = inspect.signature(fn)
    missing = [p.name for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without a type hint: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name}: no return type hint"
    private = re.compile(r"(?<![\w])_[A-Za-z]\w*")
    annotations = [str(p.annotation) for p in sig.parameters.values()] + [str(sig.return_annotation)]
    bad = [a for a in annotations if private.search(a.replace("__", ""))]
    assert not bad, f"{name}: private names in type hints: {bad}"
    hints = typing.get_type_hints(fn, localns={"ProcessGroup": ProcessGroup})  # every hint resolves
    assert "return" in hints
    rendered = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    first_line = next(line for line in rendered.splitlines() if line.strip().startswith(name + "("))
    assert not private.search(first_line), f"{name}: help() shows a private name: {first_line}"
    assert (fn.__doc__ or "").strip(), f"{name}: no docstring"
