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

import itertools
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
    ([0, 7], r"cu_seqlens: expected a total length divisible by world_size 2, got 7"),
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
                                               ([9, 23], True, 3, 4), ([0, 8, 0, 8], False, 0, 2)]:
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
        for lens, world_size in [([8, 12, 4, 8], 2), ([16, 8, 24], 4)]:
            cu = cu_seqlens(lens)
            kw = dict(max_seqlen=max(lens)) if with_max_seqlen else {}
            want = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, 1, world_size, **kw)
            _assert_same_metadata(compiled(cu, True, 1, world_size, **kw), want, f"{lens} world {world_size}")
        kw = dict(max_seqlen=12) if with_max_seqlen else {}
        with pytest.raises(RuntimeError, match=r"cu_seqlens: expected cumulative lengths from 0, non-decreasing, "
                                               r"every length a multiple of 2 \* world_size = 4"):
            compiled(cu_seqlens([8, 6, 10]), True, 1, 2, **kw)
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
