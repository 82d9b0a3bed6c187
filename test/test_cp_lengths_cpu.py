"""Any sequence length on any number of ranks, for every context-parallel scheme (CPU backend, gloo).

A packed batch of sequences whose lengths do not divide N (or 2N): 1, 7, 1000 and 4093 tokens
for one case per scheme, shorter ones for the other forms (batched, kv/qkv-packed, not causal,
the zigzag llama3 implementations). Every rank shards the GLOBAL batch with its scheme's helper
(``ring_shard``, ``zigzag_shard``, ``stripe_shard``, ``llama3_shard``, ``ulysses_shard``,
``hybrid_shard``: each sequence, or the packed total, padded), fills the padding rows of q, k, v and dout with NaN (the schemes must mask
padding through lengths, never read it), runs the scheme on 2, 3, 4 and 8 gloo ranks and saves its
local out, LSE, dQ, dK and dV. This process then checks that the padding rows got out = 0, LSE =
-inf and zero gradients (llama3, Ulysses and the hybrid's trailing padding: a sequence of its
own, only the real rows are checked), puts the shards back together with the scheme's unshard helper and compares them with
ONE process's result: the library's single-device attention on the unsharded batch, in float64.

Cases with a window, a softcap and sink logits (``window`` / ``softcap`` / ``sinks``) check that
the window's global positions, the ring steps' diagonal shifts and skipped steps, llama3's trimmed
key range and zigzag llama3's non-causal shifts stay exact with padding; their padding rows get
LSE = the sink of their head (a row without keys), and the sinks' gradient summed over the ranks
is compared too.

Also without spawning: the shard helpers against an independent description of each layout,
shard/unshard round trips, the prepare helpers and the ``seqlens`` argument checks.
"""

from __future__ import annotations

import os
import random
from typing import Dict, List, Optional, Tuple

import pytest
import torch

import ring_flash_attn as rfa
from dist_harness import CachedSpawns, finish_rank, init_gloo_group, record_check, rel_err
from cases import cu_seqlens, feature_kwargs

_SEED = random.SystemRandom().randrange(1 << 30)
_SPAWN_TIMEOUT_S = 600
# against the float64 single-process result, relative to max(1, max |ref|); the kernels' LSE is
# float32, so float64 data is float32-accurate in the merge
_TOL = {"float32": 5e-5, "float64": 2e-6}
_WORLD_SIZES = [2, 3, 4, pytest.param(8, marks=pytest.mark.eight_ranks)]

_LONG = [1, 7, 1000, 4093]  # the lengths of the issue: none divides 2N for N in 2, 3, 4, 8
_SHORT = [1, 7, 45, 128]  # total 181: padding on every world size for llama3 too

_BASE = dict(form="varlen", packed=None, causal=True, Hq=2, Hk=1, D=16, impl=None, dtype="float32",
             window=(-1, -1), softcap=0.0, sinks=False, kv="zigzag_llama3")
# the all-to-all schemes cut the query heads over the ranks (Ulysses) or the Ulysses degree
# (hybrid: 2 when N is even, else N): 24 query heads divide over every world size here
_A2A = dict(Hq=24, Hk=1)


def _case(case_id: str, scheme: str, lens: List[int], **kw) -> dict:
    c = dict(_BASE)
    c.update(kw)
    c.update(id=f"{scheme}-{case_id}", scheme=scheme, lens=lens)
    return c


CASES = [
    _case("long", "ring", _LONG),
    _case("kvpacked", "ring", _SHORT, packed="kv"),
    _case("qkvpacked-noncausal", "ring", _SHORT, packed="qkv", Hk=2, causal=False),
    _case("batched", "ring", [1, 130], form="batched"),
    _case("batched-kvpacked-noncausal", "ring", [45, 7], form="batched", packed="kv", causal=False),
    _case("batched-qkvpacked", "ring", [130, 1], form="batched", packed="qkv", Hk=2),
    _case("long", "zigzag", _LONG),
    _case("kvpacked-noncausal", "zigzag", _SHORT, packed="kv", causal=False),
    _case("qkvpacked", "zigzag", _SHORT, packed="qkv", Hk=2),
    _case("batched", "zigzag", [1, 130], form="batched"),
    _case("batched-kvpacked", "zigzag", [45, 7], form="batched", packed="kv"),
    _case("batched-qkvpacked-noncausal", "zigzag", [130, 1], form="batched", packed="qkv", Hk=2, causal=False),
    _case("fp64", "zigzag", _SHORT, dtype="float64"),  # the CPU fp64 backward's LSE rescaling
    _case("long", "stripe", [1000, 4093], form="batched", B=2),
    _case("kvpacked-noncausal", "stripe", [45, 7, 1], form="batched", packed="kv", causal=False),
    _case("qkvpacked", "stripe", [130, 1], form="batched", packed="qkv", Hk=2),
    _case("long", "llama3", _LONG),
    _case("kvpacked-noncausal", "llama3", _SHORT, packed="kv", causal=False),
    _case("qkvpacked", "llama3", _SHORT, packed="qkv", Hk=2),
    _case("long", "zigzag_llama3", _LONG),
    _case("fused-kvpacked", "zigzag_llama3", _SHORT, packed="kv", impl="fused"),
    _case("grouped-python-noncausal", "zigzag_llama3", _SHORT, impl="grouped_python", causal=False),
    _case("qkvpacked", "zigzag_llama3", _SHORT, packed="qkv", Hk=2),
    # a window (and softcap, sinks) with lengths that do not divide: the shifts of the split
    # (real rows, padding rows) layout, the skipped ring steps, the trimmed llama3 key range
    _case("window-sinks", "ring", [7, 1000, 1], window=(37, 0), sinks=True),
    _case("batched-noncausal-window-softcap-sinks", "ring", [130, 7], form="batched", causal=False,
          window=(5, 40), softcap=2.0, sinks=True),
    _case("noncausal-window-sinks", "zigzag", [7, 1000], causal=False, window=(60, 9), sinks=True),
    _case("window-softcap", "zigzag", [1000, 7, 1], window=(100, 0), softcap=2.0),
    # long chunks only: the steps wholly outside the window are skipped
    _case("window-sinks-skipped-steps", "zigzag", [1000, 701], window=(60, 0), sinks=True),
    _case("batched-noncausal-window-sinks", "stripe", [45, 7, 1], form="batched", causal=False, window=(3, 11),
          sinks=True),
    _case("window-sinks", "llama3", [7, 1000], window=(50, 0), sinks=True),
    _case("noncausal-window-softcap-sinks", "llama3", _SHORT, causal=False, window=(20, 33), softcap=2.0,
          sinks=True),
    _case("noncausal-window-sinks", "zigzag_llama3", [7, 1000], causal=False, window=(40, 25), sinks=True),
    _case("grouped-python-noncausal-left-window-softcap-sinks", "zigzag_llama3", _SHORT, impl="grouped_python",
          causal=False, window=(9, -1), softcap=2.0, sinks=True),
    _case("fused-window-sinks", "zigzag_llama3", _LONG, impl="fused", window=(30, 0), sinks=True),
    # the all-to-all schemes: the packed total padded to the layout (a padding sequence of its own)
    _case("long", "ulysses", _LONG, **_A2A),
    _case("kvpacked-noncausal-window", "ulysses", _SHORT, packed="kv", causal=False, window=(20, 5), **_A2A),
    _case("long", "hybrid", _LONG, **_A2A),
    _case("llama3-noncausal", "hybrid", _SHORT, kv="llama3", causal=False, **_A2A),
    _case("zigzag-ring-qkvpacked", "hybrid", _SHORT, kv="zigzag_ring", packed="qkv", Hq=24, Hk=24),
]

_HELPERS = {  # scheme -> (shard, unshard): (x, cu_seqlens or None, rank, N), (shards, cu_seqlens or None[, S])
    "ring": (rfa.ring_shard, rfa.ring_unshard),
    "zigzag": (rfa.zigzag_shard, rfa.zigzag_unshard),
    "stripe": (rfa.stripe_shard, rfa.stripe_unshard),
    "llama3": (rfa.llama3_shard, rfa.llama3_unshard),
    "zigzag_llama3": (rfa.zigzag_shard, rfa.zigzag_unshard),
    "ulysses": (rfa.ulysses_shard, rfa.ulysses_unshard),
}
# the padding of these schemes' packed total is a sequence of its own (it attends to itself), so
# its rows are not checked for zeros and keep zeros in a sinks case (see _run)
_OWN_PADDING_SEQUENCE = ("llama3", "ulysses", "hybrid")
# scheme -> (its functions' name prefix, its forms): the functions are
# <prefix>_flash_attn[_varlen][_kvpacked | _qkvpacked]_func
_FUNCTION_NAMES = {
    "ring": ("ring", ("varlen", "batched")),
    "zigzag": ("zigzag_ring", ("varlen", "batched")),
    "stripe": ("stripe", ("batched",)),
    "llama3": ("llama3", ("varlen",)),
    "zigzag_llama3": ("zigzag_llama3", ("varlen",)),
    "ulysses": ("ulysses", ("varlen",)),
    "hybrid": ("hybrid", ("varlen",)),
}
_RING_FUNCS = {  # (scheme, form) -> its (plain, K/V-packed, Q/K/V-packed) functions
    (scheme, form): tuple(getattr(rfa, f"{prefix}_flash_attn{'_varlen' if form == 'varlen' else ''}{packed}_func")
                          for packed in ("", "_kvpacked", "_qkvpacked"))
    for scheme, (prefix, forms) in _FUNCTION_NAMES.items() for form in forms
}


# ---- inputs and the single-process result ------------------------------------------------------------


def _inputs(case: dict, seed: int) -> Tuple[torch.Tensor, ...]:
    """The GLOBAL packed batch of real tokens: q [total, Hq, D], k, v [total, Hk, D], dout like q
    (float32 values, in the case's dtype)."""
    total = sum(case["lens"])
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(total, case["Hq"], case["D"], generator=gen) for _ in range(2))
    k, v = (torch.randn(total, case["Hk"], case["D"], generator=gen) for _ in range(2))
    return tuple(t.to(getattr(torch, case["dtype"])) for t in (q, k, v, dout))


def _sinks(case: dict, seed: int) -> Optional[torch.Tensor]:
    """The case's sink logits (float32 [Hq]), or None."""
    if not case["sinks"]:
        return None
    return torch.randn(case["Hq"], generator=torch.Generator().manual_seed(seed + 7919)) + 1.0


def _features(case: dict, sinks: Optional[torch.Tensor]) -> dict:
    """The window / softcap / sinks keywords of the case (only those set)."""
    return feature_kwargs(case["window"], case["softcap"], sinks)


def _reference(case: dict, seed: int) -> Dict[str, torch.Tensor]:
    """One process: the library's single-device attention on the unsharded batch in float64 (out,
    lse [Hq, total], dq, dk, dv; dsinks with sinks)."""
    q, k, v, dout = (t.double() for t in _inputs(case, seed))
    cu = cu_seqlens(case["lens"])
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    sinks = _sinks(case, seed)
    if sinks is not None:
        sinks.requires_grad_(True)
        ins.append(sinks)
    longest = max(case["lens"])
    out, lse, _ = rfa.flash_attn_varlen_func(ins[0], ins[1], ins[2], cu, cu, longest, longest, causal=case["causal"],
                                             return_attn_probs=True, **_features(case, sinks))
    grads = torch.autograd.grad(out, ins, dout)
    ref = dict(out=out.detach(), lse=lse, dq=grads[0], dk=grads[1], dv=grads[2])
    if sinks is not None:
        ref["dsinks"] = grads[3]
    return ref


def _batched(x: torch.Tensor, lens: List[int]) -> torch.Tensor:
    """The packed rows of B sequences as [B, max(lens), ...], zero rows after each length."""
    out = x.new_zeros((len(lens), max(lens)) + tuple(x.shape[1:]))
    start = 0
    for b, n in enumerate(lens):
        out[b, :n] = x[start:start + n]
        start += n
    return out


def _packed(x: torch.Tensor, lens: List[int]) -> torch.Tensor:
    """The inverse of _batched: [B, S, ...] -> the packed real rows."""
    return torch.cat([x[b, :n] for b, n in enumerate(lens)])


# ---- a rank's run ----------------------------------------------------------------------------------


def _hybrid_layout(case: dict, world_size: int):
    """The hybrid cases' mesh shape: Ulysses degree 2 when N is even, else N (one KV group)."""
    from ring_flash_attn.cp.mesh import HybridLayout

    U = 2 if world_size % 2 == 0 else world_size
    return HybridLayout(U, world_size // U, case["kv"])


def _shard(case: dict, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    if case["scheme"] == "hybrid":
        return rfa.hybrid_shard(x, cu_seqlens(case["lens"]), rank, _hybrid_layout(case, world_size))
    shard = _HELPERS[case["scheme"]][0]
    if case["form"] == "batched":
        return shard(_batched(x, case["lens"]), None, rank, world_size)
    return shard(x, cu_seqlens(case["lens"]), rank, world_size)


def _run(case: dict, seed: int, rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """The scheme on this rank's shard: its local out, lse (token-major [rows, Hq]) and grads."""
    q, k, v, dout = _inputs(case, seed)
    if case["packed"] == "qkv":
        assert case["Hq"] == case["Hk"]
    real = _shard(case, torch.ones(q.shape[0]), rank, world_size) == 1  # False on padding rows
    scheme, form, causal = case["scheme"], case["form"], case["causal"]
    # padding rows hold NaN: they must never be read. llama3 with sinks: its padding is a
    # sequence of its own that attends to itself, and the sinks' gradient sums over every row,
    # so there the padding rows keep llama3_shard's zeros and get dout = 0 (a loss that ignores
    # them), as in a real run
    fill = 0.0 if scheme in _OWN_PADDING_SEQUENCE and case["sinks"] else float("nan")
    ql, kl, vl, dl = (_shard(case, t, rank, world_size).masked_fill(~real[..., None, None], fill)
                      for t in (q, k, v, dout))
    func, kvpacked, qkvpacked = _RING_FUNCS[(scheme, form)]
    sinks = _sinks(case, seed)
    if sinks is not None:
        sinks.requires_grad_(True)
    kw = dict(causal=causal, return_attn_probs=True, **_features(case, sinks))
    extra = () if sinks is None else (sinks,)
    lens = case["lens"]
    cu = cu_seqlens(lens)
    if scheme in ("ring", "zigzag", "stripe"):
        if form == "batched":
            args, kw["seqlens"] = (), lens
        else:
            local_cu = (rfa.ring_local_cu_seqlens if scheme == "ring" else rfa.zigzag_local_cu_seqlens)(cu, world_size)
            args, kw["seqlens"] = (local_cu, int((local_cu[1:] - local_cu[:-1]).max())), cu[1:] - cu[:-1]
    elif scheme == "ulysses":
        meta = rfa.ulysses_prepare_cu_seqlens(cu, causal, rank, world_size)
        args = tuple(meta[:4]) + (None, meta[4])
    elif scheme == "hybrid":
        layout = _hybrid_layout(case, world_size)
        kw["group"] = rfa.hybrid_mesh(layout.ulysses_degree, kv_scheme=layout.kv_scheme)
        meta = rfa.hybrid_prepare_cu_seqlens(cu, causal, rank, layout)
        args = tuple(meta[:4]) + (1, meta[4])
    else:
        prepare = (rfa.llama3_flash_attn_prepare_cu_seqlens if scheme == "llama3"
                   else rfa.zigzag_llama3_prepare_cu_seqlens)
        args = tuple(prepare(cu, causal, rank, world_size)[:4]) + (1,) + (prepare(cu, causal, rank, world_size)[4],)
        if case["impl"] == "fused":
            kw["use_fused_kernel"] = True
        elif case["impl"] == "grouped_python":
            kw["use_grouped_attention"] = True
    if case["packed"] == "kv":
        ql.requires_grad_(True)
        kv = torch.stack([kl, vl], dim=-3).requires_grad_(True)
        out, lse, _ = kvpacked(ql, kv, *args, **kw)
        dq, dkv, *dsinks = torch.autograd.grad(out, (ql, kv) + extra, dl)
        dk, dv = dkv.unbind(-3)
    elif case["packed"] == "qkv":
        qkv = torch.stack([ql, kl, vl], dim=-3).requires_grad_(True)
        out, lse, _ = qkvpacked(qkv, *args, **kw)
        dqkv, *dsinks = torch.autograd.grad(out, (qkv,) + extra, dl)
        dq, dk, dv = dqkv.unbind(-3)
    else:
        ql, kl, vl = (t.requires_grad_(True) for t in (ql, kl, vl))
        out, lse, _ = func(ql, kl, vl, *args, **kw)
        dq, dk, dv, *dsinks = torch.autograd.grad(out, (ql, kl, vl) + extra, dl)
    lse = lse.transpose(-1, -2)  # varlen [Hq, T] -> [T, Hq]; batched [B, Hq, L] -> [B, L, Hq]
    got = dict(out=out.detach(), lse=lse, dq=dq, dk=dk, dv=dv, real=real)
    if sinks is not None:
        got["dsinks"] = dsinks[0]  # this rank's rows' share
    return got


def _zigzag_gather_check(rank: int, world_size: int, seed: int) -> str:
    """zigzag_gather of padded shards gives the batch back on every rank: "" or what differs."""
    x = torch.randn(sum(_LONG), 3, generator=torch.Generator().manual_seed(seed))
    cu = cu_seqlens(_LONG)
    back = rfa.zigzag_gather(rfa.zigzag_shard(x, cu, rank, world_size), cu)
    return "" if torch.equal(back, x) else f"differs: max {(back - x).abs().max()}"


def _worker(rank: int, world_size: int, port: int, seed: int, out_dir: str) -> None:
    import traceback

    torch.set_num_threads(1)
    init_gloo_group(rank, world_size, port)
    results = {}
    try:
        for i, case in enumerate(CASES):
            try:
                got = _run(case, seed + i, rank, world_size)
                path = os.path.join(out_dir, f"{case['id']}_rank{rank}.pt")
                torch.save(got, path)
                results[case["id"]] = {"path": path}
            except Exception:  # noqa: BLE001 - reported per case
                results[case["id"]] = {"exception": traceback.format_exc()}
        record_check(results, "zigzag_gather", lambda: _zigzag_gather_check(rank, world_size, seed))
    finally:
        finish_rank(rank, out_dir, results)


_SPAWNS = CachedSpawns(_worker, _SEED, "cp_lengths", _SPAWN_TIMEOUT_S)
_REFERENCES: Dict[str, Dict[str, torch.Tensor]] = {}


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in CASES])
@pytest.mark.parametrize("world_size", _WORLD_SIZES)
def test_any_length_matches_one_process(world_size: int, case: dict, spawn_root: str):
    per_rank = _SPAWNS(world_size, spawn_root)
    seed = _SEED + CASES.index(case)
    if case["id"] not in _REFERENCES:
        _REFERENCES[case["id"]] = _reference(case, seed)
    ref = _REFERENCES[case["id"]]
    got = []
    for r, res in enumerate(per_rank):
        entry = res[case["id"]]
        assert "exception" not in entry, f"rank {r} of {world_size} (seed {seed}):\n{entry['exception']}"
        got.append(torch.load(entry["path"]))
    where = f"{case['id']} on {world_size} ranks (seed {seed})"
    scheme, form, lens = case["scheme"], case["form"], case["lens"]
    # padding rows: out 0, lse -inf, no gradient (llama3, Ulysses, the hybrid's trailing padding:
    # a sequence of its own, not checked)
    assert any((~g["real"]).any() for g in got), f"{where}: no padding row on any rank"
    if scheme not in _OWN_PADDING_SEQUENCE:
        for r, g in enumerate(got):
            pad = ~g["real"]
            for name in ("out", "dq", "dk", "dv"):
                assert torch.equal(g[name][pad], torch.zeros_like(g[name][pad])), \
                    f"{where}, rank {r}: {name} of padding rows is not 0: {g[name][pad].abs().max()}"
            if case["sinks"]:  # a row without keys: LSE = its head's sink
                want_lse = _sinks(case, seed).expand_as(g["lse"])[pad]
                assert torch.equal(g["lse"][pad], want_lse), f"{where}, rank {r}: lse of padding rows is not the sink"
            else:
                assert torch.isneginf(g["lse"][pad]).all(), f"{where}, rank {r}: lse of padding rows is not -inf"
    for name in ("out", "lse", "dq", "dk", "dv"):
        shards = [g[name] for g in got]
        if scheme == "hybrid":
            glob = rfa.hybrid_unshard(shards, cu_seqlens(lens), _hybrid_layout(case, world_size))
        elif form == "batched":
            unshard = _HELPERS[scheme][1]
            glob = _packed(unshard(shards, None, max(lens)), lens)
        else:
            glob = _HELPERS[scheme][1](shards, cu_seqlens(lens))
        want = ref[name].t() if name == "lse" else ref[name]
        err, tol = rel_err(glob, want), _TOL[case["dtype"]]
        assert err <= tol, f"{where}: {name} max|err| / max(1, max|ref|) = {err:.3e} > {tol:.1e}"
    if case["sinks"]:  # each rank returns its rows' share; the sum is the gradient
        total = torch.stack([g["dsinks"] for g in got]).sum(0)
        err, tol = rel_err(total, ref["dsinks"]), _TOL[case["dtype"]]
        assert err <= tol, f"{where}: dsinks (summed over ranks) max|err| / max(1, max|ref|) = {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("world_size", _WORLD_SIZES)
def test_zigzag_gather_of_padded_shards(world_size: int, spawn_root: str):
    _SPAWNS.assert_each_rank(world_size, spawn_root, "zigzag_gather", "")


# ---- without spawning ---------------------------------------------------------------------------------


def _layout_positions(layout: str, length: int, rank: int, world_size: int) -> List[int]:
    """The global positions rank `rank` holds of a sequence of `length` tokens, in local order
    (positions >= length are padding), written out token by token."""
    N = world_size
    if layout == "zigzag":
        c = -(-length // (2 * N))
        return list(range(rank * c, (rank + 1) * c)) + list(range((2 * N - 1 - rank) * c, (2 * N - rank) * c))
    c = -(-length // N)
    if layout == "ring":
        return list(range(rank * c, (rank + 1) * c))
    return [i * N + rank for i in range(c)]  # stripe


_LAYOUT_HELPERS = {"ring": (rfa.ring_shard, rfa.ring_unshard), "zigzag": (rfa.zigzag_shard, rfa.zigzag_unshard),
                   "stripe": (rfa.stripe_shard, rfa.stripe_unshard)}


@pytest.mark.parametrize("layout", ["ring", "zigzag", "stripe"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_shard_helpers_match_the_layouts(layout: str, world_size: int):
    rng = random.Random(_SEED + world_size)
    lens = [0, 1, 7] + [rng.randrange(0, 40) for _ in range(4)]
    cu = cu_seqlens(lens)
    x = torch.randn(int(cu[-1]), 2, 3, dtype=torch.float64)
    shard, unshard = _LAYOUT_HELPERS[layout]
    shards = [shard(x, cu, r, world_size) for r in range(world_size)]
    local_cu = cu_seqlens([len(_layout_positions(layout, n, 0, world_size)) for n in lens])
    if layout != "stripe":
        local = (rfa.ring_local_cu_seqlens if layout == "ring" else rfa.zigzag_local_cu_seqlens)(cu, world_size)
        assert torch.equal(local, local_cu), (lens, local, local_cu)
    for r, got in enumerate(shards):
        rows = []
        for b, n in enumerate(lens):
            for p in _layout_positions(layout, n, r, world_size):
                rows.append(x[int(cu[b]) + p] if p < n else torch.zeros(2, 3, dtype=torch.float64))
        want = torch.stack(rows) if rows else x.new_zeros((0, 2, 3))
        assert torch.equal(got, want), (layout, lens, r)
    assert torch.equal(unshard(shards, cu), x)
    # a batch of B sequences of S tokens (cu_seqlens None) is sharded along dim 1
    for S in (1, 7, 2 * world_size):
        xb = torch.randn(3, S, 2, dtype=torch.float64)
        sb = [shard(xb, None, r, world_size) for r in range(world_size)]
        packed = [shard(xb.reshape(3 * S, 2), cu_seqlens([S] * 3), r, world_size) for r in range(world_size)]
        assert all(torch.equal(a.reshape(-1, 2), p) for a, p in zip(sb, packed))
        assert torch.equal(unshard(sb, None, S), xb)
        assert torch.equal(unshard(sb, None)[:, :S], xb)  # default: all N L positions


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_llama3_shard_pads_the_packed_total(world_size: int):
    for lens in ([1, 7, 1000, 4093], [5], [0, 3], [2 * world_size]):
        cu = cu_seqlens(lens)
        total = int(cu[-1])
        x = torch.randn(total, 2)
        per = -(-total // world_size)
        shards = [rfa.llama3_shard(x, cu, r, world_size) for r in range(world_size)]
        padded = torch.cat([x, torch.zeros(per * world_size - total, 2)])
        for r, got in enumerate(shards):
            assert torch.equal(got, padded[r * per:(r + 1) * per])
        assert torch.equal(rfa.llama3_unshard(shards, cu), x)
        # the metadata describes the same pieces: every rank holds `per` rows
        for r in range(world_size):
            cu_q = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, r, world_size)[0]
            assert int(cu_q[-1]) == per
    with pytest.raises(ValueError, match=r"shards: expected 3 rows per rank \(ceil of the total 5 over 2 ranks\), "
                                         r"got 2"):
        rfa.llama3_unshard([torch.zeros(2), torch.zeros(2)], [0, 5])


def test_shard_helper_errors():
    with pytest.raises(ValueError, match=r"cu_seqlens: expected the last entry to be 9 \(the rows of x\), got 8"):
        rfa.ring_shard(torch.zeros(9, 2), [0, 8], 0, 2)
    with pytest.raises(ValueError, match=r"x: expected a tensor with dims \[batch, seqlen, ...\] \(cu_seqlens None\)"):
        rfa.stripe_shard(torch.zeros(9), None, 0, 2)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 3\)"):
        rfa.llama3_shard(torch.zeros(9, 2), [0, 9], 3, 3)
    with pytest.raises(ValueError, match=r"shards: expected 4 rows per rank \(the zigzag layout of cu_seqlens over 2 "
                                         r"ranks, every sequence padded to a multiple of 4\), got 3"):
        rfa.zigzag_unshard([torch.zeros(3), torch.zeros(3)], [0, 7])
    with pytest.raises(ValueError, match=r"seqlen: expected an int in \[0, 8\] \(world_size 2 x local length 4\), "
                                         r"got 9"):
        rfa.ring_unshard([torch.zeros(1, 4), torch.zeros(1, 4)], None, 9)


def test_seqlens_argument_errors():
    q = torch.randn(2, 6, 2, 8, dtype=torch.float64)
    f = rfa.zigzag_ring_flash_attn_func
    with pytest.raises(ValueError, match=r"seqlens: expected a real global length in \[0, 6\] \(world_size 1 x "
                                         r"local_seqlen 6\), got 7"):
        f(q, q, q, causal=True, seqlens=7)
    with pytest.raises(ValueError, match=r"seqlens: expected 2 entries \(one real global length per sequence\), got 3"):
        f(q, q, q, seqlens=[1, 2, 3])
    with pytest.raises(ValueError, match=r"seqlens: expected entry 1 in \[0, 6\] \(world_size 1 x its 6 local rows\), "
                                         r"got -1"):
        f(q, q, q, seqlens=torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"seqlens: expected an int32 or int64 tensor \[2\]"):
        f(q, q, q, seqlens=torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match=r"seqlens: expected a tensor on cpu \(the device of q\), got meta"):
        f(q, q, q, seqlens=torch.tensor([3, 1], device="meta"))
    q3, cu = q.reshape(12, 2, 8), cu_seqlens([6, 6])
    with pytest.raises(ValueError, match=r"seqlens: expected a sequence of 2 ints or an int32 tensor \[2\] \(one real "
                                         r"global length per sequence\), got the int 5"):
        rfa.ring_flash_attn_varlen_func(q3, q3, q3, cu, 6, seqlens=5)
    with pytest.raises(ValueError, match=r"seqlens: expected entry 0 in \[0, 6\] \(world_size 1 x its 6 local rows\), "
                                         r"got 8"):
        rfa.ring_flash_attn_varlen_func(q3, q3, q3, cu, 6, seqlens=[8, 2])


@pytest.mark.parametrize("causal", [True, False])
def test_seqlens_on_one_process(causal: bool):
    """World size 1 (no process group): the batched and varlen ring functions with seqlens give the
    attention of the real prefixes, whatever the padding rows hold (NaN here); padding rows get
    out = 0, lse = -inf and no gradient."""
    if __import__("torch.distributed").distributed.is_initialized():
        pytest.skip("a default process group is initialised in this process")
    gen = torch.Generator().manual_seed(_SEED)
    lens = [3, 9, 0]
    S = 10  # even: the zigzag layout's two chunks per rank
    q, dout = (torch.randn(3, S, 4, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(3, S, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    pad = torch.arange(S)[None, :] >= torch.tensor(lens)[:, None]  # [3, S]
    q, k, v, dout = (t.masked_fill(pad[..., None, None], float("nan")) for t in (q, k, v, dout))
    cu = cu_seqlens(lens)
    ins = [_packed(t, lens).clone().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse, _ = rfa.flash_attn_varlen_func(*ins, cu, cu, S, S, causal=causal, return_attn_probs=True)
    ref_grads = torch.autograd.grad(ref_out, ins, _packed(dout, lens))
    for func, varlen in ((rfa.ring_flash_attn_func, False), (rfa.zigzag_ring_flash_attn_func, False),
                         (rfa.stripe_flash_attn_func, False), (rfa.ring_flash_attn_varlen_func, True),
                         (rfa.zigzag_ring_flash_attn_varlen_func, True)):
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if varlen:
            flat = [t.reshape((3 * S,) + tuple(t.shape[2:])) for t in x]
            out, lse, _ = func(*flat, cu_seqlens([S] * 3), S, causal=causal, return_attn_probs=True,
                               seqlens=torch.tensor(lens, dtype=torch.int32))
            out, lse = out.reshape(3, S, 4, 8), lse.reshape(4, 3, S).permute(1, 0, 2)
        else:
            out, lse, _ = func(*x, causal=causal, return_attn_probs=True, seqlens=lens)
        grads = torch.autograd.grad(out, x, dout)
        name = func.__name__
        assert rel_err(_packed(out, lens), ref_out) <= 1e-12, name
        assert rel_err(_packed(lse.transpose(1, 2), lens), ref_lse.t()) <= 1e-6, name
        for g, rg in zip(grads, ref_grads):
            assert rel_err(_packed(g, lens), rg) <= 1e-12, name
        assert torch.equal(out[pad], torch.zeros_like(out[pad])), name
        assert torch.isneginf(lse.transpose(1, 2)[pad]).all(), name
        for g in grads:
            assert torch.equal(g[pad], torch.zeros_like(g[pad])), name
