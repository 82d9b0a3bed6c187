"""The error of every context-parallel scheme does not grow with the number of ranks (CPU, gloo, bf16).

One causal attention (S = 2048 tokens, 4 heads, head dim 64, bf16 inputs) runs through each
scheme on 1, 2, 4 and 8 gloo ranks; the max error of out, dQ, dK and dV against the float64
result (max |x - ref| / max |ref|) on N ranks must stay within 1.25 times the scheme's error on
one rank, and that one within 1.25 times the error of one plain ``flash_attn_varlen_func`` call.
A scheme that rounded its per-step partials (ring dK/dV blocks, the two zigzag groups' dK/dV,
a bf16 reduce-scatter) to bf16 fails: measured before the partials were kept in fp32, dV of the
ring scheme reached 1.9x its one-rank error on 2 ranks.

``python test/test_cp_accuracy_cpu.py`` prints the table of errors (docs/lengths-and-padding.md).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from typing import Dict, List

import pytest
import torch

import ring_flash_attn as rfa
from dist_harness import CachedSpawns, finish_rank, init_gloo_group, rel_err
from cases import cu_seqlens

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 600
_RATIO = 1.25
_S, _H, _D = 2048, 8, 64  # 8 heads: Ulysses cuts them over up to 8 ranks
_WORLD_SIZES = [1, 2, 4, pytest.param(8, marks=pytest.mark.eight_ranks)]
_QUANTITIES = ("out", "dq", "dk", "dv")
# (name, the scheme's shard/unshard layout, extra keyword arguments)
SCHEMES = [
    ("ring", "ring", {}),
    ("zigzag_ring", "zigzag", {}),
    ("stripe", "stripe", {}),
    ("llama3", "llama3", {}),
    ("zigzag_llama3", "zigzag", {}),
    ("zigzag_llama3_fused", "zigzag", {"use_fused_kernel": True}),
    ("zigzag_llama3_grouped_python", "zigzag", {"use_grouped_attention": True}),
    ("ulysses", "ulysses", {}),
    ("hybrid", "hybrid", {}),
]


def _hybrid_layout(world_size: int):
    """Ulysses degree 2 across zigzag llama3 (the hybrid's default scheme), or 1 on one rank."""
    from ring_flash_attn.cp.mesh import HybridLayout

    U = 2 if world_size % 2 == 0 else 1
    return HybridLayout(U, world_size // U)


_SHARD = {"ring": (rfa.ring_shard, rfa.ring_unshard), "zigzag": (rfa.zigzag_shard, rfa.zigzag_unshard),
          "stripe": (rfa.stripe_shard, rfa.stripe_unshard), "llama3": (rfa.llama3_shard, rfa.llama3_unshard),
          "ulysses": (rfa.ulysses_shard, rfa.ulysses_unshard),
          "hybrid": (lambda x, cu, rank, n: rfa.hybrid_shard(x, cu, rank, _hybrid_layout(n)),
                     lambda shards, cu: rfa.hybrid_unshard(shards, cu, _hybrid_layout(len(shards))))}


def _inputs(seed: int):
    """q, k, v, dout [S, H, D] in bf16 (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(_S, _H, _D, generator=gen).to(torch.bfloat16) for _ in range(4))


def _run(name: str, layout: str, extra: dict, seed: int, rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """The scheme on this rank's shard: local out, dq, dk, dv."""
    q, k, v, dout = _inputs(seed)
    cu = cu_seqlens([_S])
    shard = _SHARD[layout][0]
    ql, kl, vl, dl = (shard(t, cu, rank, world_size) for t in (q, k, v, dout))
    ql, kl, vl = (t.requires_grad_(True) for t in (ql, kl, vl))
    if name in ("ring", "zigzag_ring", "stripe"):
        func = {"ring": rfa.ring_flash_attn_func, "zigzag_ring": rfa.zigzag_ring_flash_attn_func,
                "stripe": rfa.stripe_flash_attn_func}[name]
        out = func(ql[None], kl[None], vl[None], causal=True)[0]
    elif name == "llama3":
        cu_q, cu_k, mq, mk, ks = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world_size)
        out = rfa.llama3_flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, mq, mk, 1, ks, causal=True)
    elif name == "ulysses":
        cu_q, cu_k, mq, mk, ks = rfa.ulysses_prepare_cu_seqlens(cu, True, rank, world_size)
        out = rfa.ulysses_flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, mq, mk, None, ks, causal=True)
    elif name == "hybrid":
        layout = _hybrid_layout(world_size)
        mesh = rfa.hybrid_mesh(layout.ulysses_degree, kv_scheme=layout.kv_scheme)
        cu_q, cu_k, mq, mk, ks = rfa.hybrid_prepare_cu_seqlens(cu, True, rank, layout)
        out = rfa.hybrid_flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, mq, mk, 1, ks, causal=True, group=mesh)
    else:
        cu_q, cu_k, mq, mk, ks = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, rank, world_size)
        out = rfa.zigzag_llama3_flash_attn_varlen_func(ql, kl, vl, cu_q, cu_k, mq, mk, 1, ks, causal=True, **extra)
    dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), dl)
    return dict(out=out.detach(), dq=dq, dk=dk, dv=dv)


def _worker(rank: int, world_size: int, port: int, seed: int, out_dir: str) -> None:
    import traceback

    torch.set_num_threads(1)
    init_gloo_group(rank, world_size, port)
    results = {}
    try:
        for name, layout, extra in SCHEMES:
            try:
                path = os.path.join(out_dir, f"{name}_rank{rank}.pt")
                torch.save(_run(name, layout, extra, seed, rank, world_size), path)
                results[name] = {"path": path}
            except Exception:  # noqa: BLE001 - reported per scheme
                results[name] = {"exception": traceback.format_exc()}
    finally:
        finish_rank(rank, out_dir, results)


_SPAWNS = CachedSpawns(_worker, _SEED, "cp_accuracy", _SPAWN_TIMEOUT_S)
_CACHE: Dict[str, object] = {}


def _reference(seed: int) -> Dict[str, torch.Tensor]:
    """float64 result of the bf16 inputs (one process)."""
    if "ref" not in _CACHE:
        q, k, v, dout = (t.double() for t in _inputs(seed))
        cu = cu_seqlens([_S])
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = rfa.flash_attn_varlen_func(ins[0], ins[1], ins[2], cu, cu, _S, _S, causal=True)
        dq, dk, dv = torch.autograd.grad(out, ins, dout)
        _CACHE["ref"] = dict(out=out.detach(), dq=dq, dk=dk, dv=dv)
    return _CACHE["ref"]


def _plain_errors(seed: int) -> Dict[str, float]:
    """The errors of one plain bf16 flash_attn_varlen_func call (one kernel, one rounding)."""
    if "plain" not in _CACHE:
        ref = _reference(seed)
        q, k, v, dout = _inputs(seed)
        cu = cu_seqlens([_S])
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = rfa.flash_attn_varlen_func(ins[0], ins[1], ins[2], cu, cu, _S, _S, causal=True)
        got = dict(zip(_QUANTITIES, (out.detach(),) + torch.autograd.grad(out, ins, dout)))
        _CACHE["plain"] = {n: rel_err(got[n], ref[n], floor=0.0) for n in _QUANTITIES}
    return _CACHE["plain"]


def errors(world_size: int, spawn_root: str, name: str) -> Dict[str, float]:
    """The scheme's max errors on world_size ranks (cached)."""
    key = f"{name}@{world_size}"
    if key not in _CACHE:
        per_rank = _SPAWNS(world_size, spawn_root)
        layout = next(lay for n, lay, _ in SCHEMES if n == name)
        parts = []
        for r, res in enumerate(per_rank):
            entry = res[name]
            assert "exception" not in entry, f"{name}, rank {r} of {world_size} (seed {_SEED}):\n{entry['exception']}"
            parts.append(torch.load(entry["path"]))
        ref = _reference(_SEED)
        unshard = _SHARD[layout][1]
        _CACHE[key] = {n: rel_err(unshard([p[n] for p in parts], cu_seqlens([_S])), ref[n], floor=0.0)
                       for n in _QUANTITIES}
    return _CACHE[key]


@pytest.mark.parametrize("name", [s[0] for s in SCHEMES])
def test_one_rank_error_is_one_kernel_calls(name: str, spawn_root: str):
    got, plain = errors(1, spawn_root, name), _plain_errors(_SEED)
    for n in _QUANTITIES:
        assert got[n] <= _RATIO * plain[n], (f"{name} on 1 rank (seed {_SEED}): {n} error {got[n]:.3e} > {_RATIO} x "
                                             f"{plain[n]:.3e} (one flash_attn_varlen_func call)")


@pytest.mark.parametrize("name", [s[0] for s in SCHEMES])
@pytest.mark.parametrize("world_size", [w for w in _WORLD_SIZES if w != 1])
def test_error_does_not_grow_with_ranks(world_size: int, name: str, spawn_root: str):
    base, got = errors(1, spawn_root, name), errors(world_size, spawn_root, name)
    assert all(base[n] > 0 for n in _QUANTITIES), f"{name}: a zero error on 1 rank cannot bound anything: {base}"
    for n in _QUANTITIES:
        assert got[n] <= _RATIO * base[n], (f"{name} on {world_size} ranks (seed {_SEED}): {n} error {got[n]:.3e} > "
                                            f"{_RATIO} x {base[n]:.3e} (its error on 1 rank)")


if __name__ == "__main__":  # the table of docs/lengths-and-padding.md
    root = tempfile.mkdtemp(prefix="cp_accuracy_")
    sizes = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8]
    plain = _plain_errors(_SEED)
    print(f"seed {_SEED}; one flash_attn_varlen_func call: " + ", ".join(f"{n} {plain[n]:.2e}" for n in _QUANTITIES))
    print("| scheme | " + " | ".join(f"N = {w}" for w in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, _, _ in SCHEMES:
        row: List[str] = []
        for w in sizes:
            e = errors(w, root, name)
            row.append(" / ".join(f"{e[n]:.2e}" for n in _QUANTITIES))
        print(f"| {name} | " + " | ".join(row) + " |")
