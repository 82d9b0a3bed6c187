"""The 2-D hybrid scheme (``hybrid_flash_attn_varlen_*``: all-to-all inside the mesh's Ulysses
groups, zigzag llama3, llama3 or zigzag ring across its KV groups) on the CPU backend: gloo process groups of
4 ranks (meshes 2x2, 4x1, 1x4; the HF adapter's Ulysses and hybrid attention on a tiny Llama) and
8 ranks (meshes 2x4 and 4x2, a 2x2 mesh on each half of the world, and plain Ulysses on 8
ranks), one spawn each; the mesh helpers and the argument errors single-process.

Every case draws a random global batch (the same on every rank), computes single-process
attention on the unsharded batch in float64 (test/reference.py, autograd for the gradients),
gives each rank its ``hybrid_shard`` and checks its out, LSE, dQ, dK and dV against the matching
rows of the reference. Meshes are written ``ulysses_degree x kv_degree``.
"""

from __future__ import annotations

import copy
import random
from typing import Dict, List

import pytest
import torch

import ring_flash_attn as rfa
from ring_flash_attn import hf_adapter
from ring_flash_attn.cp.mesh import HybridLayout
from dist_harness import assert_case_within, CachedSpawns, case_params, CaseWorker, rel_err
from cases import case_maker, cu_seqlens, feature_kwargs, global_packed_batch, packed_reference

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 240

# The zigzag layout cuts every sequence into 2 * kv_degree equal chunks, padding a sequence whose
# length it cannot cut: with True the odd-length zigzag cases compare their real rows with the
# reference (padding rows: out and gradients 0) instead of checking that the layout refuses them.
ZIGZAG_ANY_LENGTH = True

_BASE = dict(U=2, kv="zigzag_llama3", Hq=4, Hk=2, D=8, hs=1, uhs=None, dtype="float64", causal=True, scale=None,
             form="varlen", mesh="world", kind="attention", window=(-1, -1), softcap=0.0, sinks=False)


_case = case_maker(_BASE)


CASES: Dict[int, List[dict]] = {
    4: [
        _case("2x2-zigzag-gqa-causal", [8, 12, 4, 8]),
        _case("2x2-zigzag-noncausal-fp32-scale", [8, 12, 4, 8], causal=False, dtype="float32", scale=0.4),
        _case("2x2-llama3-odd-causal", [5, 11, 3, 13], kv="llama3"),
        _case("2x2-zigzag-ring-gqa-causal", [8, 12, 4, 8], kv="zigzag_ring"),
        _case("2x2-zigzag-ring-mqa-noncausal", [8, 4, 12], Hk=1, kv="zigzag_ring", causal=False),
        _case("2x2-llama3-odd-noncausal", [5, 11, 3, 13], kv="llama3", causal=False),
        _case("2x2-zigzag-mqa-replicated", [8, 4, 12], Hk=1),
        _case("2x2-zigzag-a2a-chunks", [8, 12, 4, 8], Hq=8, Hk=4, uhs=1),
        _case("2x2-zigzag-kv-slices", [8, 12, 4, 8], Hq=8, Hk=4, hs=1),
        _case("2x2-kvpacked", [8, 12, 4, 8], form="kvpacked"),
        _case("2x2-qkvpacked-mha", [8, 12, 4, 8], Hq=2, Hk=2, hs=1, form="qkvpacked"),
        _case("4x1-ulysses-only", [5, 11, 3, 13], U=4, Hk=4),
        _case("1x4-zigzag-only", [8, 16, 8], U=1),
        _case("2x2-device-mesh", [8, 12, 4, 8], mesh="device_mesh"),
        _case("2x2-zigzag-odd-lengths", [5, 11, 3, 13]),
        # totals the layout cannot cut into equal parts: a padding sequence after the last one
        _case("2x2-llama3-odd-total", [5, 11, 3, 12], kv="llama3"),
        _case("2x2-zigzag-odd-total-noncausal", [1, 7, 45], causal=False),
        _case("2x2-zigzag-ring-odd-total", [5, 11, 3, 12], kv="zigzag_ring"),
        _case("4x1-ulysses-only-odd-total", [5, 11, 3, 12], U=4, Hk=4),
        # window, softcap and sinks through the all-to-all and the scheme across
        _case("2x2-zigzag-window-softcap-sinks", [8, 12, 4, 8], window=(3, 0), softcap=2.0, sinks=True),
        _case("2x2-llama3-noncausal-window-sinks", [5, 11, 3, 13], kv="llama3", causal=False, window=(2, 4),
              sinks=True),
        # the HF adapter on a tiny Llama (Hq 4, Hk 2): Ulysses over 4 ranks (KV heads replicated),
        # the hybrid on a 2x2 mesh (zigzag across: lengths multiples of 4)
        _case("hf-ulysses-odd", [5, 13, 3, 11], U=4, kind="hf"),
        _case("hf-hybrid-2x2-zigzag", [8, 12, 4, 8], kind="hf"),
    ],
    8: [
        _case("2x4-zigzag-gqa-causal", [16, 8, 24]),
        _case("4x2-zigzag-replicated-causal", [12, 4, 16], U=4, Hq=8, Hk=2),
        _case("2x4-llama3-odd-causal", [5, 11, 3, 13], kv="llama3"),
        _case("4x2-zigzag-ring-replicated-causal", [12, 4, 16], U=4, Hq=8, Hk=2, kv="zigzag_ring"),
        _case("4x2-llama3-odd-noncausal", [7, 13, 2, 10], U=4, kv="llama3", causal=False),
        _case("2x2-on-each-half", [8, 12, 4, 8], mesh="halves"),
        _case("4x2-zigzag-odd-total-window-sinks", [1, 7, 45], U=4, Hq=8, Hk=2, window=(9, 0), sinks=True),
        _case("2x4-llama3-odd-total", [1, 7, 45], kv="llama3"),
        _case("ulysses-8-replicated-odd", [7, 13, 2, 10], U=8, Hq=8, Hk=2, kind="ulysses"),
    ],
}

_TOL = {"float64": 1e-10, "float32": 3e-5}
# ring attention merges its steps' partial outputs through the kernels' float32 LSE
_RING_TOL = {"float64": 2e-6, "float32": 5e-5}
_QUANTITIES = ("out", "lse", "dq", "dk", "dv")
_DSINKS_TOL = 2e-6  # float32 sinks: their gradient is float32


def _zigzag_refuses(case: dict, kv_degree: int) -> bool:
    return (case["kv"] in ("zigzag_llama3", "zigzag_ring") and not ZIGZAG_ANY_LENGTH
            and any(n % (2 * kv_degree) for n in case["lens"]))


def _make_mesh(case: dict, rank: int, world_size: int):
    """(mesh, rank in the mesh's parent group, the parent group's size)."""
    import torch.distributed as dist

    U = case["U"]
    if case["mesh"] == "device_mesh":
        from torch.distributed.device_mesh import init_device_mesh

        dm = init_device_mesh("cpu", (world_size // U, U), mesh_dim_names=("kv", "ulysses"))
        mesh = rfa.hybrid_mesh_from_device_mesh(dm, kv_scheme=case["kv"])
        assert mesh.has_parent and (mesh.kv_rank, mesh.ulysses_rank) == divmod(rank, U)
        return mesh, rank, world_size
    if case["mesh"] == "halves":
        halves = [dist.new_group(list(range(h * 4, h * 4 + 4))) for h in range(2)]
        half = halves[rank // 4]
        return rfa.hybrid_mesh(U, group=half, kv_scheme=case["kv"]), rank % 4, 4
    return rfa.hybrid_mesh(U, kv_scheme=case["kv"]), rank, world_size


def _run_attention(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    dtype = getattr(torch, case["dtype"])
    Hq = case["Hq"]
    mesh, prank, pworld = _make_mesh(case, rank, world_size)
    gen = torch.Generator().manual_seed(seed + (rank // pworld))  # each parent group its own batch
    cu, q_full, k_full, v_full, dout_full = global_packed_batch(case, gen)
    total = int(cu[-1])
    if _zigzag_refuses(case, mesh.kv_degree):
        with pytest.raises(ValueError, match=r"multiple of 2 \* world_size"):
            rfa.hybrid_shard(q_full, cu, prank, mesh)
        with pytest.raises(ValueError, match=r"multiple of 2 \* world_size"):
            rfa.hybrid_prepare_cu_seqlens(cu, case["causal"], prank, mesh)
        return {"refused": "odd lengths under the zigzag layout"}
    sinks = None
    if case["sinks"]:  # float32 values, the reference in float64
        sinks = torch.randn(Hq, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_(True)
    ref_out, ref_lse, ref_grads = packed_reference(*(t.to(dtype) for t in (q_full, k_full, v_full, dout_full)), cu,
                                                   case["scale"], case["causal"], case["window"], case["softcap"],
                                                   sinks)

    local = lambda t: rfa.hybrid_shard(t, cu, prank, mesh)  # noqa: E731
    # the rows of real tokens (the zigzag layout pads a sequence whose length it cannot cut; its
    # padding rows get out = 0, LSE = -inf or the sink, and are not compared)
    real = local(torch.ones(total, dtype=torch.float64)) == 1
    q, k, v, dout = (local(t).to(dtype) for t in (q_full, k_full, v_full, dout_full))
    meta = rfa.hybrid_prepare_cu_seqlens(cu, case["causal"], prank, mesh)
    kw = dict(softmax_scale=case["scale"], causal=case["causal"], return_attn_probs=True, group=mesh,
              ulysses_heads_k_stride=case["uhs"], **feature_kwargs(case["window"], case["softcap"]))
    if sinks is not None:
        import torch.distributed as dist

        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        out, lse, none = rfa.hybrid_flash_attn_varlen_func(q, k, v, *meta[:4], case["hs"], meta[4], sinks=sinks, **kw)
        *grads, dsinks = torch.autograd.grad(out, (q, k, v, sinks), dout)
        dsinks = dsinks.double()
        dist.all_reduce(dsinks)  # each rank's share: its rows of the heads it computes
        errors = _errors(out, lse, grads, ref_out, ref_lse, ref_grads, local, real)
        errors["dsinks"] = rel_err(dsinks, ref_grads[3])
        return errors
    if case["form"] == "kvpacked":
        q.requires_grad_(True)
        kv = torch.stack([k, v], dim=1).requires_grad_(True)
        out, lse, none = rfa.hybrid_flash_attn_varlen_kvpacked_func(q, kv, *meta[:4], case["hs"], meta[4], **kw)
        dq, dkv = torch.autograd.grad(out, (q, kv), dout)
        grads = (dq, dkv[:, 0], dkv[:, 1])
    elif case["form"] == "qkvpacked":
        qkv = torch.stack([q, k, v], dim=1).requires_grad_(True)
        out, lse, none = rfa.hybrid_flash_attn_varlen_qkvpacked_func(qkv, *meta[:4], case["hs"], meta[4], **kw)
        grads = torch.autograd.grad(out, (qkv,), dout)[0].unbind(1)
    else:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        out, lse, none = rfa.hybrid_flash_attn_varlen_func(q, k, v, *meta[:4], case["hs"], meta[4], **kw)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert none is None and out.dtype == dtype and lse.shape == (Hq, q.shape[0])
    return _errors(out, lse, grads, ref_out, ref_lse, ref_grads, local, real)


def _errors(out, lse, grads, ref_out, ref_lse, ref_grads, local, real) -> Dict[str, float]:
    """The relative errors of the rank's real rows; its padding rows must have out = 0 and zero
    gradients (NaN otherwise: the case fails)."""
    pad = ~real
    if pad.any() and any(t[pad].abs().max() != 0 for t in (out,) + tuple(grads)):
        return {"out": float("nan")}
    return {"out": rel_err(out[real], local(ref_out)[real]),
            "lse": rel_err(lse[:, real], local(ref_lse.t()).t()[:, real]),
            "dq": rel_err(grads[0][real], local(ref_grads[0])[real]),
            "dk": rel_err(grads[1][real], local(ref_grads[1])[real]),
            "dv": rel_err(grads[2][real], local(ref_grads[2])[real])}


def _run_ulysses(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    """Plain ``ulysses_flash_attn_varlen_func`` over the whole world."""
    cu, q_full, k_full, v_full, dout_full = global_packed_batch(case, torch.Generator().manual_seed(seed))
    ref_out, ref_lse, ref_grads = packed_reference(q_full, k_full, v_full, dout_full, cu, None, case["causal"])
    local = lambda t: rfa.ulysses_shard(t, cu, rank, world_size)  # noqa: E731
    q, k, v = (local(t).requires_grad_(True) for t in (q_full, k_full, v_full))
    meta = rfa.ulysses_prepare_cu_seqlens(cu, case["causal"], rank, world_size)
    out, lse, _ = rfa.ulysses_flash_attn_varlen_func(q, k, v, *meta[:4], None, meta[4], causal=case["causal"],
                                                     return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), local(dout_full))
    return {"out": rel_err(out, local(ref_out)), "lse": rel_err(lse, local(ref_lse.t()).t()),
            "dq": rel_err(grads[0], local(ref_grads[0])), "dk": rel_err(grads[1], local(ref_grads[1])),
            "dv": rel_err(grads[2], local(ref_grads[2]))}


# ---- the HF adapter on a tiny Llama --------------------------------------------------------------

_HF_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, initializer_range=0.2)
_HF_TOL = 1e-5  # the model's RMSNorm computes in fp32 whatever the dtype


def _run_hf(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    """The tiny model through the adapter on every rank's shard vs the eager model on the whole
    batch: gathered logits and all-reduced gradients (loss sum(logits * w), so the ranks' losses
    add up to the reference loss)."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    ulysses_only = case["U"] == world_size
    if not ulysses_only:
        mesh = rfa.hybrid_mesh(case["U"], kv_scheme=case["kv"])
    rfa.register_hf_attention(None, case["hs"])
    attn = rfa.HF_ATTN_ULYSSES if ulysses_only else rfa.HF_ATTN_HYBRID
    config = LlamaConfig(**_HF_CONFIG)
    torch.manual_seed(seed)
    ref = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager").double()
    model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn).double()
    model.load_state_dict(ref.state_dict())
    lens = case["lens"]
    total = sum(lens)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _HF_CONFIG["vocab_size"], (total,), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lens])
    w = torch.randn(total, _HF_CONFIG["vocab_size"], generator=gen, dtype=torch.float64)
    cu = cu_seqlens(lens)
    ref_logits = ref(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
    (ref_logits * w).sum().backward()
    if ulysses_only:
        shard = lambda x: rfa.ulysses_shard(x, cu, rank, world_size)  # noqa: E731
    else:
        shard = lambda x: rfa.hybrid_shard(x, cu, rank, mesh)  # noqa: E731
    try:
        rfa.update_ring_flash_attn_params(cu, None)
        logits = model(input_ids=shard(ids)[None], position_ids=shard(pos)[None], use_cache=False).logits[0]
        (logits * shard(w)).sum().backward()
    finally:
        hf_adapter._STATE.batch = None
    parts = [torch.empty_like(logits) for _ in range(world_size)]
    dist.all_gather(parts, logits.detach().contiguous())
    gathered = torch.cat(parts) if ulysses_only else rfa.hybrid_unshard(parts, cu, mesh)
    worst = 0.0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.detach().clone()
        dist.all_reduce(g)
        err = rel_err(g, p_ref.grad, floor=1e-30)
        worst = err if (err != err or err > worst) else worst  # NaN sticks
    return {"logits": rel_err(gathered, ref_logits, floor=1e-30), "grads": worst}


def _run_case(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, float]:
    if case["kind"] == "hf":
        return _run_hf(case, seed, rank, world_size)
    if case["kind"] == "ulysses":
        return _run_ulysses(case, seed, rank, world_size)
    return _run_attention(case, seed, rank, world_size)


_results = CachedSpawns(CaseWorker(CASES, _run_case), _SEED, "hybrid", _SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("world_size,case", case_params(CASES))
def test_hybrid_matches_full_attention(world_size, case, spawn_root):
    if case["kind"] == "hf":
        pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    per_rank = _results(world_size, spawn_root)
    got = [res["cases"][case["id"]] for res in per_rank]
    if all("refused" in g for g in got):
        # every rank checked that the call is refused (ValueError / NotImplementedError naming why)
        assert _zigzag_refuses(case, world_size // case["U"] if case["mesh"] != "halves" else 4 // case["U"])
        return
    quantities = ("logits", "grads") if case["kind"] == "hf" else _QUANTITIES
    tol = _HF_TOL if case["kind"] == "hf" else (_RING_TOL if case["kv"] == "zigzag_ring" else _TOL)[case["dtype"]]
    assert_case_within(per_rank, case, quantities, tol, _SEED)
    if case["sinks"]:  # the sinks and their gradient are float32
        assert_case_within(per_rank, case, ("dsinks",), _DSINKS_TOL, _SEED)


# ---- single process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,world,per_node,expected", [
    ((32, 8), 64, 8, (8, 8)),  # Llama-3-8B on 8 nodes: all-to-all inside each node
    ((64, 8), 16, 8, (8, 2)),  # Llama-3-70B on 2 nodes
    ((32, 8), 4, 8, (4, 1)),  # one partial node: Ulysses only
    ((32, 8), 8, 4, (4, 2)),
    ((12, 6), 8, 8, (2, 4)),  # 6 KV heads: 4 and 8 are neither multiples nor divisors of 6
    ((12, 12), 16, 8, (4, 4)),  # 12 heads: 8 does not divide them, 4 does
    ((4, 1), 8, 8, (4, 2)),  # MQA: the one KV head replicated 4 times
    ((6, 6), 16, 8, (2, 8)),
])
def test_choose_hybrid_degrees(heads, world, per_node, expected):
    assert rfa.choose_hybrid_degrees(heads[0], heads[1], world, per_node) == expected


@pytest.mark.parametrize("heads,world,per_node,expected", [
    ((32, 8), 8, 8, HybridLayout(8, 1, "zigzag_llama3")),  # one node: nothing across
    ((32, 8), 64, 8, HybridLayout(8, 8, "zigzag_ring")),  # one KV head per rank across nodes: the ring
    ((64, 16), 64, 8, HybridLayout(8, 8, "zigzag_llama3")),  # two KV heads per rank: two all-gather slices
    ((32, 8), 16, 16, HybridLayout(16, 1, "zigzag_llama3")),
])
def test_choose_hybrid_layout(heads, world, per_node, expected):
    assert rfa.choose_hybrid_layout(heads[0], heads[1], world, per_node) == expected


def test_choose_hybrid_degrees_errors():
    with pytest.raises(ValueError, match=r"num_heads_q: expected a multiple of num_heads_k 3, got 4"):
        rfa.choose_hybrid_degrees(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"ranks_per_node: expected an int >= 1, got 0"):
        rfa.choose_hybrid_degrees(4, 2, 8, 0)


def test_hybrid_layout_helpers():
    layout = HybridLayout(2, 2, "zigzag_llama3")
    cu = cu_seqlens([8, 12, 4, 8])
    x = torch.arange(32 * 2).view(32, 2)
    parts = [rfa.hybrid_shard(x, cu, r, layout) for r in range(4)]
    assert torch.equal(rfa.hybrid_unshard(parts, cu, layout), x)
    # rank (a, u) = (1, 0): the first half of KV coordinate 1's zigzag shard
    assert torch.equal(parts[2], rfa.zigzag_shard(x, cu, 1, 2)[:8])
    assert layout.coordinates(3) == (1, 1)
    contiguous = HybridLayout(2, 2, "llama3")
    parts = [rfa.hybrid_shard(x, cu_seqlens([5, 27]), r, contiguous) for r in range(4)]
    assert torch.equal(torch.cat(parts), x)
    meta = rfa.hybrid_prepare_cu_seqlens(cu, True, 3, layout)
    want = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, 1, 2)
    assert torch.equal(meta[0], want[0]) and torch.equal(meta[1], want[1]) and meta[2:] == want[2:]
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 4\)"):
        layout.coordinates(4)
    with pytest.raises(ValueError, match=r"kv_scheme: expected one of \['zigzag_llama3', 'llama3', 'zigzag_ring'\]"):
        HybridLayout(2, 2, "ring")
    with pytest.raises(ValueError, match=r"ulysses_degree: expected an int >= 1"):
        HybridLayout(0, 2)
    with pytest.raises(ValueError, match=r"shards: expected 4 tensors"):
        rfa.hybrid_unshard(parts[:3], cu, layout)


def _hybrid_parts_by_hand(x, lens, layout):
    """The hybrid layout written out from its definition (independent of the helpers): the global
    batch with each sequence (zigzag) padded to a multiple of 2K and, where a KV part would not
    cut into U equal pieces, a zero padding sequence after the last one; KV part a = the zigzag
    chunks a and 2K-1-a of every sequence (or the contiguous piece a); rank (a, u) gets piece u."""
    U, K = layout.ulysses_degree, layout.kv_degree
    zigzag = layout.kv_scheme != "llama3"
    seqs, start = [], 0
    for n in lens:
        s = x[start:start + n]
        start += n
        if zigzag:
            P = -(-n // (2 * K)) * 2 * K
            s = torch.cat([s, torch.zeros(P - n, *x.shape[1:], dtype=x.dtype)])
        seqs.append(s)
    if zigzag:
        m = 0
        while (sum(len(s) for s in seqs) // K + 2 * m) % U:
            m += 1
        if m:
            seqs.append(torch.zeros(2 * K * m, *x.shape[1:], dtype=x.dtype))
        parts = []
        for a in range(K):
            chunks = []
            for s in seqs:
                c = len(s) // (2 * K)
                chunks += [s[a * c:(a + 1) * c], s[(2 * K - 1 - a) * c:(2 * K - a) * c]]
            parts.append(torch.cat(chunks))
    else:
        flat = torch.cat(seqs)
        N = U * K
        flat = torch.cat([flat, torch.zeros(-len(flat) % N, *x.shape[1:], dtype=x.dtype)])
        per = len(flat) // K
        parts = [flat[a * per:(a + 1) * per] for a in range(K)]
    out = []
    for a in range(K):
        T = len(parts[a]) // U
        assert T * U == len(parts[a])
        out += [parts[a][u * T:(u + 1) * T] for u in range(U)]
    return out


@pytest.mark.parametrize("U,K,kv", [(2, 2, "zigzag_llama3"), (4, 2, "zigzag_ring"), (3, 2, "zigzag_llama3"),
                                    (2, 3, "llama3"), (4, 2, "llama3"), (2, 4, "zigzag_llama3")])
@pytest.mark.parametrize("lens", [[5, 11, 3, 13], [1, 7, 45], [6], [9, 1, 22, 3, 1]])
def test_hybrid_layout_any_total(U, K, kv, lens):
    """Any total and sequence lengths: the shard helper against the layout written out by hand,
    the round trip, and the metadata (the KV scheme's, of the lengths with the padding sequence)."""
    layout = HybridLayout(U, K, kv)
    T = sum(lens)
    x = torch.arange(1, T * 2 + 1).view(T, 2)
    cu = cu_seqlens(lens)
    want = _hybrid_parts_by_hand(x, lens, layout)
    parts = [rfa.hybrid_shard(x, cu, r, layout) for r in range(U * K)]
    for r, (got, expected) in enumerate(zip(parts, want)):
        assert torch.equal(got, expected), (r, got.shape, expected.shape)
    assert torch.equal(rfa.hybrid_unshard(parts, cu, layout), x)
    for r in range(U * K):
        # the KV scheme's metadata describes the rank's KV part: U pieces of the rank's length
        cu_q = rfa.hybrid_prepare_cu_seqlens(cu, True, r, layout)[0]
        assert int(cu_q[-1]) == U * len(parts[r]), (r, cu_q)


def test_hybrid_needs_a_mesh():
    rfa.set_active_hybrid_mesh(None)
    q = torch.randn(8, 4, 8, dtype=torch.float64)
    k = torch.randn(8, 2, 8, dtype=torch.float64)
    cu = cu_seqlens([8])
    with pytest.raises(ValueError, match=r"group: expected a HybridMesh .* no mesh is active"):
        rfa.hybrid_flash_attn_varlen_func(q, k, k, cu, cu, 8, 8)
    with pytest.raises(ValueError, match=r"mesh: expected a HybridMesh or None"):
        rfa.set_active_hybrid_mesh("2x2")
    with pytest.raises(RuntimeError, match=r"hybrid_mesh: torch.distributed is not initialised"):
        rfa.hybrid_mesh(2)
    scheme = rfa.cp.get_scheme("hybrid")
    assert scheme.hf.attn_implementation == rfa.HF_ATTN_HYBRID == "ring_attn_hybrid"
    with pytest.raises(rfa.cp.BatchNotSupported, match=r"needs an active mesh of 4 ranks"):
        scheme.hf.prepare_batch([0, 8], 0, 4)
