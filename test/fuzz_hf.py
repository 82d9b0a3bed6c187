"""Random cases of the HuggingFace adapter's attention functions for test_fuzz_cpu.py, called as
transformers calls them (``query [B, Hq, S, D]`` after RoPE, the rank's 2-D padding mask,
``sliding_window``, ``softcap``, ``s_aux``, ``is_causal``) without a model: a packed row
(``update_ring_flash_attn_params(cu_seqlens)``) or a batch of padded rows (left, right or
both-sided padding, rows of mixed lengths, ``update_ring_flash_attn_params(attention_mask=)``),
each rank's part cut by the adapter's own helpers. The rank's output and the gradients of its
query, key, value and of the sinks (summed over the ranks) are compared with reference.py's
float64 attention of each row's tokens (one sequence per row, or the packed row's sequences);
the outputs and the gradients at padding must be exactly 0."""

from __future__ import annotations

import math
import random
from typing import Dict, List

import torch
from torch import Tensor

from cases import cu_seqlens
from reference import grouped_attention_reference

IMPLEMENTATIONS = ("ring_attn_llama3", "ring_attn_zigzag_llama3", "ring_attn_ulysses")
TOL = {"float64": 2e-6, "float32": 5e-5}


class _Module(torch.nn.Module):
    """What the attention functions read of the attention module: ``is_causal``."""

    def __init__(self, is_causal: bool):
        super().__init__()
        self.is_causal = is_causal


def draw_hf(seed: int, world_size: int) -> dict:
    """A random adapter configuration for `world_size` ranks (a plain dict)."""
    rng = random.Random(seed * 104729 + world_size)
    N = world_size
    impl = rng.choice(IMPLEMENTATIONS)
    if impl == "ring_attn_ulysses":
        Hk = rng.choice([d for d in (1, 2, 3, 4, 6) if d % N == 0 or N % d == 0])
        Hq = max(Hk, N) * rng.choice([1, 2])
    else:
        Hk = rng.choice([1, 2, 3])
        Hq = Hk * rng.choice([1, 2, 3])
    unit = 2 * N if impl == "ring_attn_zigzag_llama3" else 1  # zigzag: every run a multiple of 2N
    mode = rng.choice(["padded", "padded", "packed"])
    if mode == "padded":
        B = rng.choice([1, 2, 3])
        runs = []
        for _ in range(B):
            left, tokens, right = (unit * rng.choice([0, 0, 1, 2, 3, 5]) for _ in range(3))
            if unit == 1:
                left, tokens, right = rng.choice([0, 0, 1, 3, 7]), rng.choice([0, 1, 2, 5, 9, 17]), rng.choice(
                    [0, 0, 2, 5])
            runs.append([left, tokens, right])
        L = max(sum(r) for r in runs)
        L += (-L) % (unit if unit > 1 else N)
        for r in runs:  # each row to length L: more padding on the right (zigzag: in units of 2N)
            r[2] += L - sum(r)
        if L == 0:
            runs = [[0, N * unit, 0] for _ in runs]
        lens = None
    else:
        lens = [unit * rng.choice([1, 2, 3]) if unit > 1 else rng.choice([1, 2, 3, 5, 8, 13]) for _ in
                range(rng.choice([1, 2, 3]))]
        if sum(lens) % N:
            lens.append(N - sum(lens) % N)
        runs = None
    causal = rng.random() < 0.7
    return dict(seed=seed, world_size=N, impl=impl, mode=mode, runs=runs, lens=lens, Hq=Hq, Hk=Hk,
                D=8 * rng.choice([1, 2, 4]), causal=causal,
                sliding_window=rng.choice([None, None, 1, 2, 3, 6, 40]),
                softcap=rng.choice([None, None, 0.0, 2.5]), sinks=rng.random() < 0.3,
                scale=rng.choice([None, None, 0.25]), dtype=rng.choice(["float64", "float32"]))


def _global_rows(cfg: dict):
    """(mask [B, L] bool or None, cu of the real sequences in row-major order, their token
    positions [n_real] as flat indices into [B, L])."""
    if cfg["mode"] == "packed":
        cu = cu_seqlens(cfg["lens"])
        return None, cu, torch.arange(int(cu[-1]))
    L = sum(cfg["runs"][0])
    mask = torch.zeros(len(cfg["runs"]), L, dtype=torch.bool)
    lengths, positions = [], []
    for b, (left, tokens, _right) in enumerate(cfg["runs"]):
        mask[b, left:left + tokens] = True
        lengths.append(tokens)
        positions.append(b * L + torch.arange(left, left + tokens))
    return mask, cu_seqlens(lengths), torch.cat(positions)


def run_hf_case(cfg: dict, rank: int, N: int) -> Dict[str, float]:
    """One configuration on this rank: {quantity: relative error} (inf: NaN, or a nonzero value
    at padding). Runs with the adapter's group and heads_k_stride at their defaults (the default
    group, 1: what register_hf_attention() sets; whatever an earlier test registered is put back
    after) and leaves the batch it set."""
    from ring_flash_attn import hf_adapter

    state = hf_adapter._STATE
    saved = (state.group, state.heads_k_stride)
    state.group, state.heads_k_stride = None, 1
    try:
        return _run_hf_case(cfg, rank, N)
    finally:
        state.group, state.heads_k_stride = saved


def _run_hf_case(cfg: dict, rank: int, N: int) -> Dict[str, float]:
    import torch.distributed as dist

    from ring_flash_attn import hf_adapter

    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    mask, cu_real, positions = _global_rows(cfg)
    B, L = (mask.shape if mask is not None else (1, sum(cfg["lens"])))
    Hq, Hk, D = cfg["Hq"], cfg["Hk"], cfg["D"]

    def rnd(h):
        return torch.randn(B, L, h, D, generator=gen, dtype=torch.float64).to(dtype).double()

    q, k, v, dout = rnd(Hq), rnd(Hk), rnd(Hk), rnd(Hq)
    sinks = (torch.randn(Hq, generator=gen) + 0.5) if cfg["sinks"] else None
    # the reference: every real sequence of the flattened rows
    W = cfg["sliding_window"]
    window = (-1, -1) if W is None else (W - 1, 0 if cfg["causal"] else W - 1)
    flat = [t.reshape(B * L, t.shape[2], D).index_select(0, positions) for t in (q, k, v, dout)]
    leaves = [t.clone().requires_grad_(True) for t in flat[:3]]
    s_ref = None if sinks is None else sinks.double().requires_grad_(True)
    (ref_out,), _ = grouped_attention_reference([leaves[0]], leaves[1], leaves[2], [cu_real], cu_real, None,
                                                cfg["scale"], cfg["causal"], window, cfg["softcap"] or 0.0, s_ref)
    inputs = leaves + ([s_ref] if s_ref is not None else [])
    ref_grads = torch.autograd.grad(ref_out, inputs, flat[3], allow_unused=True)
    ref_grads = [torch.zeros_like(x) if g is None else g for g, x in zip(ref_grads, inputs)]

    def dense(rows: Tensor, heads: int) -> Tensor:
        """Reference rows at their [B, L] positions, zero at padding."""
        out = torch.zeros(B * L, heads, D, dtype=torch.float64)
        out[positions] = rows.detach()
        return out.view(B, L, heads, D)

    ref = dict(out=dense(ref_out, Hq), dq=dense(ref_grads[0], Hq), dk=dense(ref_grads[1], Hk),
               dv=dense(ref_grads[2], Hk))

    # this rank's part, cut by the adapter's helpers
    impl = cfg["impl"]
    if mask is not None:
        hf_adapter.update_ring_flash_attn_params(attention_mask=mask)

        def local(x: Tensor) -> Tensor:
            return hf_adapter.shard_padded_batch(x, mask, impl, rank, N)
    else:
        cu = cu_seqlens(cfg["lens"])
        hf_adapter.update_ring_flash_attn_params(cu)

        def local(x: Tensor) -> Tensor:
            import ring_flash_attn as rfa

            if impl == "ring_attn_zigzag_llama3":
                return rfa.zigzag_shard(x[0], cu, rank, N)[None]
            T = x.shape[1] // N
            return x[:, rank * T:(rank + 1) * T].clone()

    ids = local(torch.arange(B * L, dtype=torch.float64).view(B, L, 1)).view(-1).long()
    ql, kl, vl = (local(t).to(dtype).transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
    dl = local(dout).to(dtype)
    s = None if sinks is None else sinks.clone().requires_grad_(True)
    kwargs = {"s_aux": s} if s is not None else {}
    fn = hf_adapter._attention_function(impl)
    model_mask = None if mask is None else local(mask.to(torch.int64))
    out, weights = fn(_Module(cfg["causal"]), ql, kl, vl, model_mask, scaling=cfg["scale"],
                      sliding_window=W, softcap=cfg["softcap"], **kwargs)
    results: Dict[str, float] = {"weights": 0.0 if weights is None else math.inf}
    grads = torch.autograd.grad(out, [ql, kl, vl] + ([s] if s is not None else []), dl)
    got = dict(out=out.detach(), dq=grads[0].transpose(1, 2), dk=grads[1].transpose(1, 2),
               dv=grads[2].transpose(1, 2))
    padding = None if mask is None else ~mask.reshape(-1).index_select(0, ids)
    for name in ("out", "dq", "dk", "dv"):
        g = got[name].reshape(-1, *got[name].shape[2:]).double()
        r = ref[name].reshape(B * L, *ref[name].shape[2:]).index_select(0, ids)
        results[name] = _rel(g, r)
        if padding is not None and padding.any():
            results[f"{name}_padding"] = 0.0 if bool((g[padding] == 0).all()) else math.inf
    if s is not None:
        dsinks = grads[3].clone()
        if dist.is_initialized():
            dist.all_reduce(dsinks)
        results["dsinks"] = _rel(dsinks.double(), ref_grads[3])
    return results


def _rel(got: Tensor, ref: Tensor) -> float:
    """max|got - ref| / max(1, max|ref|); inf for NaN or a shape mismatch."""
    if got.shape != ref.shape or torch.isnan(got).any():
        return math.inf
    if got.numel() == 0:
        return 0.0
    return (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def tolerance(cfg: dict) -> float:
    return TOL[cfg["dtype"]]
