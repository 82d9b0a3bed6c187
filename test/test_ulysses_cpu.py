"""Ulysses context parallelism (``ulysses_flash_attn_*``) on the CPU backend: gloo process groups
of 2 and 4 ranks (one spawn each, all cases in it; the 8-rank case runs in test_hybrid_cpu.py's
8-rank spawn), single-process calls, the argument errors and the HF adapter's Ulysses attention.

Every case draws a random global batch (the same on every rank), computes single-process
attention on the unsharded batch in float64 (test/reference.py, or test/feature_reference.py
when a score feature is set; autograd for the gradients), gives rank r its contiguous piece and
checks the rank's out, LSE, dQ, dK and dV (and, with sinks, the all-reduced dsinks) against the
reference. Sequences have odd lengths and cross rank boundaries; KV heads fewer than ranks are
replicated by the all-to-all. A feature the kernels do not implement yet must be refused
(NotImplementedError naming it) instead.
"""

from __future__ import annotations

import copy
import random
from typing import Dict, List

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn.cp import ulysses
from ring_flash_attn.cp.all_to_all import check_head_split
from dist_harness import assert_case_within, NoHostReads, rel_err, SpawnedCases
from feature_reference import attention_with_features
from reference import grouped_attention_reference
from cases import (VARLEN_ARGUMENT_ERRORS, assert_packed_forms_need_4d, assert_single_process_matches, case_maker,
                   cu_seqlens, feature_kwargs, global_packed_batch, single_process_batch, varlen_call_args)

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 180

_BASE = dict(Hq=4, Hk=2, D=8, stride=None, dtype="float64", causal=True, scale=None, form="varlen",
             no_host_reads=False, softcap=0.0, sinks=False, window=(-1, -1), kernel="library")


_case = case_maker(_BASE)


# forms: "varlen", "kvpacked", "qkvpacked" (packed tokens, lens = the sequences), "batched" (lens =
# [L] * B, every sequence the same global length).
CASES: Dict[int, List[dict]] = {
    2: [
        _case("gqa-causal-odd", [5, 11, 3, 13]),
        _case("gqa-noncausal-odd", [5, 11, 3, 13], causal=False),
        _case("gqa-chunks-fp32-scale", [9, 1, 14], Hq=8, Hk=4, stride=1, dtype="float32", scale=0.3),
        _case("mqa-replicated-causal", [7, 9], Hq=4, Hk=1),
        _case("kvpacked-causal", [6, 10, 4], form="kvpacked"),
        _case("qkvpacked-mha-noncausal", [3, 17], Hq=2, Hk=2, causal=False, form="qkvpacked"),
        _case("batched-causal-odd-local", [10, 10, 10], form="batched"),
        _case("batched-kvpacked-mqa", [6, 6], Hq=4, Hk=1, causal=False, form="batched-kvpacked"),
        _case("no-host-reads", [20], no_host_reads=True),
        # score features: compared with the reference when the kernels take them, else refused
        _case("sinks-softcap-causal", [5, 11, 3, 13], sinks=True, softcap=2.0),
        _case("window-causal", [5, 11, 3, 13], window=(3, 0)),
        _case("odd-total-causal", [5, 11, 3, 12]),  # 31 tokens: one padding row on rank 1
        _case("odd-total-kvpacked-noncausal", [1, 7, 45], causal=False, form="kvpacked"),
        # the same features through a differentiable Python stand-in for the single-device kernel:
        # checks the scheme's plumbing (each rank's sinks slice, dsinks per head) whatever the kernels do
        _case("features-python-kernel", [5, 11, 3, 13], Hq=4, Hk=1, sinks=True, softcap=2.0, window=(4, 0),
              kernel="python"),
    ],
    4: [
        _case("gqa-replicated-causal-odd", [7, 13, 2, 10], Hq=8, Hk=2),
        _case("gqa-chunks-noncausal", [7, 13, 2, 10], Hq=8, Hk=8, stride=1, causal=False),
        _case("mqa-fp32-causal", [9, 23], Hq=4, Hk=1, dtype="float32"),
        _case("batched-causal", [8, 8], Hq=8, Hk=4, form="batched"),
        _case("odd-total-replicated-window-sinks", [1, 7, 45], Hq=8, Hk=2, window=(9, 0), sinks=True),
    ],
}

_TOL = {"float64": 1e-10, "float32": 3e-5}
_QUANTITIES = ("out", "lse", "dq", "dk", "dv")


def _features(case: dict) -> dict:
    return feature_kwargs(case["window"], case["softcap"])


def _python_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                   causal=False, window_size=(-1, -1), deterministic=False, return_attn_probs=False, softcap=0.0,
                   sinks=None):
    """flash_attn_varlen_func's contract on the feature reference (differentiable, self-attention)."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k)
    out, lse = attention_with_features(q, k, v, cu_seqlens_q, softmax_scale, causal, window_size, softcap, sinks)
    return (out, lse.float(), None) if return_attn_probs else out


class _PythonKernel:
    """Puts ``_python_kernel`` in the place of the library's kernel inside the Ulysses module."""

    def __enter__(self):
        self.saved = ulysses.flash_attn_varlen_func
        ulysses.flash_attn_varlen_func = _python_kernel

    def __exit__(self, *exc):
        ulysses.flash_attn_varlen_func = self.saved
        return False


def _kernel_refusal(case: dict, Hq: int):
    """The NotImplementedError the single-device kernel raises for the case's features, or None
    when it computes them (probed on a tiny single-process input)."""
    kw = _features(case)
    if case["sinks"]:
        kw["sinks"] = torch.zeros(Hq, dtype=torch.float32)
    if not kw or case["kernel"] == "python":
        return None
    from ring_flash_attn.cp.features import accepts_keyword

    if "sinks" in kw and not accepts_keyword(rfa.flash_attn_varlen_func, "sinks"):
        return NotImplementedError("sinks")
    x = torch.randn(4, Hq, 8, dtype=torch.float64)
    try:
        rfa.flash_attn_varlen_func(x, x, x, cu_seqlens([4]), cu_seqlens([4]), 4, 4, causal=True, **kw)
    except NotImplementedError as e:
        return e
    return None


def reference(case: dict, q, k, v, cu, dtype):
    """out, lse and the leaves (q, k, v[, sinks]) of the float64 reference on inputs rounded to dtype."""
    leaves = [t.to(dtype).double().requires_grad_(True) for t in (q, k, v)]
    sinks = None
    if case["sinks"]:
        sinks = torch.linspace(-1.0, 1.5, q.shape[1]).double().requires_grad_(True)  # fp32 values, as passed
        leaves.append(sinks)
    if case["sinks"] or case["softcap"] or tuple(case["window"]) != (-1, -1):
        out, lse = attention_with_features(leaves[0], leaves[1], leaves[2], cu, case["scale"], case["causal"],
                                           tuple(case["window"]), case["softcap"], sinks)
        lse = lse.float()  # as the kernels return it
    else:
        (out,), (lse,) = grouped_attention_reference([leaves[0]], leaves[1], leaves[2], [cu], cu, None,
                                                     case["scale"], case["causal"])
    return out, lse, leaves


def _run_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    dtype = getattr(torch, case["dtype"])
    Hq = case["Hq"]
    batched = case["form"].startswith("batched")
    cu, q_full, k_full, v_full, dout_full = global_packed_batch(case, torch.Generator().manual_seed(seed))
    total = int(cu[-1])
    T = -(-total // world_size)  # rows per rank; the last ranks' rows past the total are padding
    ref_out, ref_lse, leaves = reference(case, q_full, k_full, v_full, cu, dtype)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout_full.to(dtype).double())

    refusal = _kernel_refusal(case, Hq)
    kw = dict(softmax_scale=case["scale"], causal=case["causal"], return_attn_probs=True, **_features(case))
    sinks = None
    if case["sinks"]:
        sinks = leaves[3].detach().float().requires_grad_(True)
        kw["sinks"] = sinks
    if batched:
        B, L_global = len(case["lens"]), case["lens"][0]
        L = L_global // world_size
        rows = torch.cat([torch.arange(b * L_global + rank * L, b * L_global + (rank + 1) * L) for b in range(B)])
        local = lambda t: t[rows].to(dtype).view(B, L, *t.shape[1:])  # noqa: E731
    else:
        rows = torch.arange(rank * T, min((rank + 1) * T, total))  # the rank's real rows (a prefix of its piece)
        local = lambda t: rfa.ulysses_shard(t, cu, rank, world_size).to(dtype)  # noqa: E731
    q, k, v, dout = (local(t) for t in (q_full, k_full, v_full, dout_full))
    cu_q, cu_k, max_q, max_k, k_slice = rfa.ulysses_prepare_cu_seqlens(cu, case["causal"], rank, world_size)

    def call():
        if case["form"] == "kvpacked":
            q_, kv = q.requires_grad_(True), torch.stack([k, v], dim=1).requires_grad_(True)
            out, lse, none = rfa.ulysses_flash_attn_varlen_kvpacked_func(
                q_, kv, cu_q, cu_k, max_q, max_k, case["stride"], k_slice, **kw)
            dq, dkv = torch.autograd.grad(out, (q_, kv), dout)
            return out, lse, none, (dq, dkv[:, 0], dkv[:, 1])
        if case["form"] == "qkvpacked":
            qkv = torch.stack([q, k, v], dim=1).requires_grad_(True)
            out, lse, none = rfa.ulysses_flash_attn_varlen_qkvpacked_func(
                qkv, cu_q, cu_k, max_q, max_k, case["stride"], k_slice, **kw)
            (dqkv,) = torch.autograd.grad(out, (qkv,), dout)
            return out, lse, none, dqkv.unbind(1)
        if case["form"] == "batched":
            q_, k_, v_ = (t.requires_grad_(True) for t in (q, k, v))
            out, lse, none = rfa.ulysses_flash_attn_func(q_, k_, v_, heads_k_stride=case["stride"], **kw)
            grads = torch.autograd.grad(out, (q_, k_, v_), dout)
            return out, lse, none, grads
        if case["form"] == "batched-kvpacked":
            q_, kv = q.requires_grad_(True), torch.stack([k, v], dim=2).requires_grad_(True)
            out, lse, none = rfa.ulysses_flash_attn_kvpacked_func(q_, kv, heads_k_stride=case["stride"], **kw)
            dq, dkv = torch.autograd.grad(out, (q_, kv), dout)
            return out, lse, none, (dq, dkv[:, :, 0], dkv[:, :, 1])
        q_, k_, v_ = (t.requires_grad_(True) for t in (q, k, v))
        inputs = (q_, k_, v_) + ((sinks,) if sinks is not None else ())
        out, lse, none = rfa.ulysses_flash_attn_varlen_func(q_, k_, v_, cu_q, cu_k, max_q, max_k, case["stride"],
                                                            k_slice, **kw)
        grads = torch.autograd.grad(out, inputs, dout)
        return out, lse, none, grads

    if refusal is not None:
        with pytest.raises(NotImplementedError) as info:
            call()
        word = "sinks" if case["sinks"] else ("softcap" if case["softcap"] else "window_size")
        assert word in str(info.value), str(info.value)
        return {"refused": str(info.value)}
    if case["no_host_reads"]:
        with NoHostReads(ulysses):
            out, lse, none, grads = call()
    elif case["kernel"] == "python":
        with _PythonKernel():
            out, lse, none, grads = call()
    else:
        out, lse, none, grads = call()
    assert none is None
    if batched:
        B, L = q.shape[0], q.shape[1]
        flat = lambda t: t.reshape(B * L, *t.shape[2:])  # noqa: E731
        out, grads = flat(out), [flat(g) for g in grads[:3]]
        assert lse.shape == (B, Hq, L)
        lse = lse.transpose(0, 1).reshape(Hq, B * L)
    if not batched:
        assert out.shape[0] == T and lse.shape == (Hq, T)
        n = rows.numel()  # compare the real rows; the padding rows are a sequence of their own
        out, lse, grads = out[:n], lse[:, :n], [g[:n] for g in grads[:3]] + list(grads[3:])
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (Hq, rows.numel())
    result = {"out": rel_err(out, ref_out[rows]), "lse": rel_err(lse, ref_lse[:, rows]),
              "dq": rel_err(grads[0], ref_grads[0][rows]), "dk": rel_err(grads[1], ref_grads[1][rows]),
              "dv": rel_err(grads[2], ref_grads[2][rows])}
    if sinks is not None:
        import torch.distributed as dist

        dsinks = grads[3].double()
        dist.all_reduce(dsinks)  # each rank's gradient covers the heads it computes
        result["dsinks"] = rel_err(dsinks, ref_grads[3])
    return result


_results = SpawnedCases("ulysses", CASES, _run_case, _SEED, _SPAWN_TIMEOUT_S, _QUANTITIES, _TOL)


@pytest.mark.parametrize("world_size,case", _results.params())
def test_ulysses_matches_full_attention(world_size, case, spawn_root):
    per_rank = _results(world_size, spawn_root)
    if all("refused" in res["cases"].get(case["id"], {}) for res in per_rank):
        return  # every rank checked that the scheme refuses the feature the kernels lack (NotImplementedError)
    _results.assert_within(world_size, case, spawn_root)
    if case["sinks"]:  # a float32 gradient (the sinks are a float32 parameter)
        assert_case_within(per_rank, case, ("dsinks",), max(_TOL[case["dtype"]], 1e-6), _SEED)


# ---- single process (no initialised group: world size 1) --------------------------------------------


def test_ulysses_single_process_matches_reference():
    batch = single_process_batch(_SEED)
    cu, q, k, v, dout = batch
    for causal in (True, False):
        for stride in (None, 1):
            meta = rfa.ulysses_prepare_cu_seqlens(cu, causal, 0, 1)
            out, lse, _ = rfa.ulysses_flash_attn_varlen_func(q, k, v, *meta[:4], stride, meta[4], causal=causal,
                                                             return_attn_probs=True)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            assert_single_process_matches(out, lse, grads, batch, causal)
            # without return_attn_probs: the output alone, the same values
            only = rfa.ulysses_flash_attn_varlen_func(q.detach(), k.detach(), v.detach(), *meta[:4], stride,
                                                      meta[4], causal=causal)
            assert isinstance(only, torch.Tensor) and torch.equal(only, out.detach())
            with torch.no_grad():  # inference: the same output, no graph kept
                inferred = rfa.ulysses_flash_attn_varlen_func(q, k, v, *meta[:4], stride, meta[4], causal=causal)
            assert not inferred.requires_grad and torch.equal(inferred, out.detach())


def test_check_head_split():
    assert check_head_split(8, 8, 4) == 1
    assert check_head_split(8, 2, 4) == 2
    assert check_head_split(8, 1, 8) == 8
    with pytest.raises(ValueError, match=r"q: expected a number of heads divisible by the 4 ranks"):
        check_head_split(6, 2, 4)
    with pytest.raises(ValueError, match=r"k: expected a number of KV heads that is a multiple or a divisor of the 4"):
        check_head_split(12, 6, 4)


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(window_size=(1, 2, 3)), ValueError, r"window_size: expected a \(left, right\) pair"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected a finite float >= 0"),
    (dict(sinks=torch.zeros(4, dtype=torch.float64)), ValueError, r"sinks: expected dtype torch.float32"),
    (dict(sinks=torch.zeros(2)), ValueError, r"sinks: expected shape \(4,\)"),
    (dict(heads_k_stride=3), ValueError, r"heads_k_stride: expected a divisor of the 2 KV heads each rank holds"),
    (dict(heads_k_stride=0), ValueError, r"heads_k_stride: expected None or an int >= 1"),
    (dict(cu_seqlens_q=cu_seqlens([6, 8]), cu_seqlens_k=cu_seqlens([6, 8])), ValueError,
     r"cu_seqlens_q: expected the last entry to be 16 \(the GLOBAL cumulative lengths"),
    (dict(local_k_slice=(0, 16)), ValueError, r"local_k_slice: expected a slice or None"),
] + VARLEN_ARGUMENT_ERRORS)
def test_ulysses_errors(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rfa.ulysses_flash_attn_varlen_func(**varlen_call_args(**over))


def test_ulysses_batched_and_packed_shape_errors():
    assert_packed_forms_need_4d(rfa.ulysses_flash_attn_varlen_kvpacked_func,
                                rfa.ulysses_flash_attn_varlen_qkvpacked_func)
    a = varlen_call_args()
    q = torch.randn(2, 8, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k: expected batch and local length \(2, 8\)"):
        rfa.ulysses_flash_attn_func(q, torch.randn(1, 16, 2, 8, dtype=torch.float64),
                                    torch.randn(1, 16, 2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor"):
        rfa.ulysses_flash_attn_func(a["q"], a["k"], a["v"])


def test_ulysses_layout_helpers():
    cu = cu_seqlens([5, 11, 3, 13])
    x = torch.arange(32 * 3).view(32, 3)
    parts = [rfa.ulysses_shard(x, cu, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(parts), x)
    assert torch.equal(rfa.ulysses_unshard(parts, cu), x)
    meta = rfa.ulysses_prepare_cu_seqlens(cu, True, 2, 4)
    assert torch.equal(meta[0], cu) and torch.equal(meta[1], cu) and meta[2:] == (13, 13, slice(None))
    with pytest.raises(ValueError, match=r"max_seqlen: expected >= the longest sequence \(13\), got 12"):
        rfa.ulysses_prepare_cu_seqlens(cu, True, 0, 4, max_seqlen=12)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected the last entry to be 32"):
        rfa.ulysses_shard(x, cu_seqlens([5, 11]), 0, 4)


def test_ulysses_layout_any_total():
    """A total that N does not divide: each rank holds ceil(T / N) rows, the last ranks' rows past
    T are zero padding, described by one more sequence in the metadata; unshard drops them."""
    lens = [5, 11, 3, 13]  # T = 32
    cu = cu_seqlens(lens)
    x = torch.arange(1, 32 * 3 + 1).view(32, 3)  # no zero row among the real ones
    for N in (3, 5, 7):
        per_rank = -(-32 // N)
        padded = torch.cat([x, torch.zeros(per_rank * N - 32, 3, dtype=x.dtype)])
        parts = [rfa.ulysses_shard(x, cu, r, N) for r in range(N)]
        for r, part in enumerate(parts):
            assert torch.equal(part, padded[r * per_rank:(r + 1) * per_rank]), (N, r)
        assert torch.equal(rfa.ulysses_unshard(parts, cu), x)
        cu_q, cu_k, max_q, max_k, k_slice = rfa.ulysses_prepare_cu_seqlens(cu, True, 0, N)
        want = cu_seqlens(lens + [per_rank * N - 32])
        assert torch.equal(cu_q, want) and torch.equal(cu_k, want), (N, cu_q)
        assert (max_q, max_k, k_slice) == (13, 13, slice(None))
    # the no-host-read form (max_seqlen given; checks off): the padding entry computed on the
    # device, appended even when empty
    import ring_flash_attn.cp.ulysses as ulysses
    with NoHostReads(ulysses):
        cu_q, _, max_q, _, _ = rfa.ulysses_prepare_cu_seqlens(cu, True, 0, 3, max_seqlen=13)
        cu_even, _, _, _, _ = rfa.ulysses_prepare_cu_seqlens(cu, True, 0, 4, max_seqlen=13)
    assert torch.equal(cu_q, cu_seqlens(lens + [1])) and max_q == 13
    assert torch.equal(cu_even, cu_seqlens(lens + [0]))


def test_ulysses_registry_entry():
    scheme = rfa.cp.get_scheme("ulysses")
    assert scheme.varlen_func is rfa.ulysses_flash_attn_varlen_func
    assert scheme.func is rfa.ulysses_flash_attn_func
    assert scheme.hf.attn_implementation == rfa.HF_ATTN_ULYSSES == "ring_attn_ulysses"
    metadata = scheme.hf.prepare_batch([0, 5, 16], 1, 2)
    assert torch.equal(metadata[True][0], cu_seqlens([5, 11])) and metadata[True][2:] == (11, 11, slice(None))


def test_ulysses_hf_tiny_llama_single_process():
    """A tiny random-weight Llama with ``attn_implementation="ring_attn_ulysses"`` on one process
    (world size 1) matches the eager model on a packed batch, logits and every gradient."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    from transformers import LlamaConfig, LlamaForCausalLM

    from ring_flash_attn import hf_adapter

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, initializer_range=0.2)
    names = rfa.register_hf_attention(None, 1)
    assert rfa.HF_ATTN_ULYSSES in names
    torch.manual_seed(_SEED)
    ref = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").double()
    model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=rfa.HF_ATTN_ULYSSES).double()
    model.load_state_dict(ref.state_dict())
    lens = [5, 2, 9]
    gen = torch.Generator().manual_seed(_SEED)
    ids = torch.randint(0, 64, (16,), generator=gen)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    w = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    try:
        rfa.update_ring_flash_attn_params(cu_seqlens(lens), None)
        losses = []
        for m in (ref, model):
            logits = m(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
            (logits * w).sum().backward()
            losses.append(logits.detach())
        assert rel_err(losses[1], losses[0], floor=1e-30) <= 1e-5  # RMSNorm computes in fp32
        for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            assert rel_err(p.grad, p_ref.grad, floor=1e-30) <= 1e-5, name
    finally:
        hf_adapter._STATE.batch = None
