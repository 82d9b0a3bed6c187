"""Random single-process attention cases for test_fuzz_cpu.py: a configuration drawn from a seed,
the call of one public entry point on it, and the comparison of its outputs, LSE and gradients
with the float64 reference of reference.py (autograd through it for the gradients).

A configuration (``draw_single``) is a plain dict: dtype, groups G, sequences B, per-group query
lengths and key lengths (0, 1, primes, lengths past the other side's), seqused_k, heads Hq / Hk,
head dim, causal, window, softcap, sinks, scale, rows after the last sequence, strided inputs,
whether the loss uses the LSE, and the entry point (``flash_attn_varlen_func``,
``grouped_flash_attn_varlen_func``, ``grouped_python``, the ``torch.ops`` op)."""

from __future__ import annotations

import math
import random
from typing import Dict, List, Optional

import torch
from torch import Tensor

from cases import LOW_PRECISION, TIGHT_TOL, cu_seqlens, feature_kwargs
from reference import _visible as visible_pairs
from reference import grouped_attention_reference

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
ENTRIES = ("flash_attn_varlen_func", "grouped", "grouped_python", "op")
# lengths a user meets: empty, one token, primes, powers of two and their neighbours
LENGTHS = (0, 1, 1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 32, 33, 47, 61, 64, 65, 127, 129)


def float32_value(x: float) -> float:
    """x rounded to float32: the library's softmax_scale and softcap fields are float32, so a
    float64 case draws values they hold exactly (its reference then computes the same thing)."""
    return float(torch.tensor(x, dtype=torch.float32))


def _window(rng: random.Random, causal: bool, longest: int) -> tuple:
    """A window (left, right): unbounded, 0, small, or past the longest sequence on each side;
    with causal the right side is -1 or 0."""
    def side() -> int:
        return rng.choice([-1, -1, 0, 1, 2, rng.randrange(0, max(1, longest) + 1), longest + rng.randrange(1, 40)])
    if rng.random() < 0.35:
        return (-1, -1)
    left = side()
    right = rng.choice([-1, 0]) if causal else side()
    return (left, right)


def draw_single(seed: int) -> dict:
    """A random single-process configuration (a plain dict, printable as the failing case)."""
    rng = random.Random(seed)
    entry = rng.choice(ENTRIES)
    G = 1 if entry == "flash_attn_varlen_func" else rng.choice([1, 1, 2, 3])
    B = rng.choice([1, 1, 2, 3, 4])
    lens_k = [rng.choice(LENGTHS) for _ in range(B)]
    if rng.random() < 0.5:  # self-attention shaped groups, the usual case
        lens_q = [list(lens_k) for _ in range(G)]
    else:
        lens_q = [[rng.choice(LENGTHS) for _ in range(B)] for _ in range(G)]
    seqused = None
    if entry != "flash_attn_varlen_func" and rng.random() < 0.3:
        seqused = [None if rng.random() < 0.3 else [rng.randrange(0, n + 1) for n in lens_k] for _ in range(G)]
    Hk = rng.choice([1, 1, 2, 3])
    Hq = Hk * rng.choice([1, 1, 2, 3, 4])
    D = 8 * rng.randrange(1, 17) if rng.random() < 0.9 else rng.choice([136, 192, 256])  # 8 .. 256
    causal = rng.random() < 0.6
    longest = max(lens_k + [n for lens in lens_q for n in lens] + [1])
    dtype = rng.choice(DTYPE_NAMES)
    softcap = rng.choice([0.0, 0.0, 0.0, float32_value(rng.uniform(0.3, 5.0))])
    scale = None if rng.random() < 0.7 else float32_value(rng.uniform(0.05, 1.5))
    q_amplitude = rng.choice([1.0, 1.0, 3.0])
    return dict(
        seed=seed, entry=entry, dtype=dtype, G=G, B=B, lens_q=lens_q, lens_k=lens_k, seqused=seqused, Hq=Hq, Hk=Hk,
        D=D, causal=causal, window=_window(rng, causal, longest),
        softcap=softcap, sinks=rng.random() < 0.3, scale=scale,
        extra_q=rng.choice([0, 0, 0, 1, 3]), extra_k=rng.choice([0, 0, 0, 2]),
        strided=rng.random() < 0.3,
        lse_loss=rng.random() < 0.25 and entry in ("flash_attn_varlen_func", "grouped", "op"),
        q_amplitude=q_amplitude,
        deterministic=rng.random() < 0.2,
        # max_seqlen_* are hints: the results must not depend on them
        hints=rng.choice(["exact", "exact", "zero", "small", "large"]),
    )


def _strided(t: Tensor, gen: torch.Generator) -> Tensor:
    """t's values in a view whose token and head strides are not those of a dense tensor (the
    head dim stays contiguous): every other token of a buffer with a spare head."""
    n, h, d = t.shape
    buf = torch.randn(2 * n + 1, h + 1, d, generator=gen, dtype=torch.float64).to(t.dtype)
    view = buf[1::2, 1:]
    view.copy_(t)
    return view


class SingleInputs:
    """The float64 inputs of a configuration, rounded to its dtype (so the reference sees what the
    call sees): q per group, k, v, dout per group, dlse per group, sinks, metadata."""

    def __init__(self, cfg: dict):
        gen = torch.Generator().manual_seed(cfg["seed"])
        dtype = getattr(torch, cfg["dtype"])
        Hq, Hk, D = cfg["Hq"], cfg["Hk"], cfg["D"]

        def rnd(*shape, amplitude=1.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * amplitude).to(dtype).double()

        self.dtype = dtype
        self.cu_q = [cu_seqlens(lens) for lens in cfg["lens_q"]]
        self.cu_k = cu_seqlens(cfg["lens_k"])
        self.total_q = [sum(lens) + cfg["extra_q"] for lens in cfg["lens_q"]]
        total_k = sum(cfg["lens_k"]) + cfg["extra_k"]
        self.q = [rnd(n, Hq, D, amplitude=cfg["q_amplitude"]) for n in self.total_q]
        self.k = rnd(total_k, Hk, D)
        self.v = rnd(total_k, Hk, D)
        self.dout = [rnd(n, Hq, D) for n in self.total_q]
        self.dlse = [torch.randn(Hq, n, generator=gen, dtype=torch.float64) for n in self.total_q]
        self.sinks = (torch.randn(Hq, generator=gen, dtype=torch.float32) + 0.5) if cfg["sinks"] else None
        self.seqused = None
        if cfg["seqused"] is not None:
            self.seqused = [None if s is None else torch.tensor(s, dtype=torch.int32) for s in cfg["seqused"]]
        self.max_q = [max(lens) for lens in cfg["lens_q"]]
        self.max_k = max(cfg["lens_k"])
        if cfg["hints"] == "zero":
            self.max_q, self.max_k = [0] * len(self.max_q), 0
        elif cfg["hints"] == "small":
            self.max_q, self.max_k = [m // 2 for m in self.max_q], self.max_k // 3
        elif cfg["hints"] == "large":
            self.max_q, self.max_k = [m + 1000 for m in self.max_q], self.max_k + 77


def reference_single(cfg: dict, inp: SingleInputs, dtype: torch.dtype,
                     rounded_out: Optional[List[Tensor]] = None) -> Dict[str, object]:
    """reference.py's attention on the inputs computed in `dtype` (float64: the reference; the
    low-precision dtype: the "same math" baseline of the pass rule) and its gradients by autograd:
    {"out": [..], "lse": [..], "dq": [..], "dk", "dv", "dsinks"}.

    rounded_out (per group, the output a low-precision call returned): the gradients the exact
    backward gets when its ``D = rowsum(dO * O)`` reads that rounded O instead of the exact one,
    as every FlashAttention backward (and the sinks' gradient) does: the loss gains
    ``sum_i (D_i - D_rounded_i) * lse_i``, whose gradient ``(D_i - D_rounded_i) * P_ij`` turns the
    scores' ``P (dP - D)`` into ``P (dP - D_rounded)``. Its distance to the exact gradients is
    the error that rounding alone brings into a low-precision backward."""
    q = [t.to(dtype).requires_grad_(True) for t in inp.q]
    k = inp.k.to(dtype).requires_grad_(True)
    v = inp.v.to(dtype).requires_grad_(True)
    sinks = None if inp.sinks is None else inp.sinks.to(dtype).requires_grad_(True)
    outs, lses = grouped_attention_reference(q, k, v, inp.cu_q, inp.cu_k, inp.seqused, cfg["scale"], cfg["causal"],
                                             tuple(cfg["window"]), cfg["softcap"], sinks)
    loss = sum((o * d.to(dtype)).sum() for o, d in zip(outs, inp.dout))
    if cfg["lse_loss"]:
        lse_terms = [torch.where(torch.isfinite(l), l.to(dtype), torch.zeros_like(l, dtype=dtype)) for l in lses]
        loss = loss + sum((l * d.to(dtype)).sum() for l, d in zip(lse_terms, inp.dlse))
    if rounded_out is not None:
        for o, o_r, d, l in zip(outs, rounded_out, inp.dout, lses):
            shift = ((o.detach() - o_r.to(dtype)) * d.to(dtype)).sum(-1).t()  # D - D_rounded, [Hq, rows]
            finite = torch.isfinite(l)
            loss = loss + (torch.where(finite, l.to(dtype), torch.zeros_like(l, dtype=dtype)) * shift).sum()
    return _results(loss, q, k, v, sinks, outs, lses)


def _results(loss: Tensor, q: List[Tensor], k: Tensor, v: Tensor, sinks: Optional[Tensor], outs, lses) -> dict:
    """{"out", "lse", "dq" (per group), "dk", "dv", "dsinks" (None without sinks)}: the outputs
    and the gradients of `loss` (zero for a leaf it does not use, e.g. keys no query sees)."""
    leaves = q + [k, v] + ([sinks] if sinks is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    G = len(q)
    return dict(out=[o.detach() for o in outs], lse=[l.detach() for l in lses], dq=grads[:G], dk=grads[G],
                dv=grads[G + 1], dsinks=grads[G + 2] if sinks is not None else None)


def run_single(cfg: dict, inp: SingleInputs) -> Dict[str, object]:
    """The configuration's entry point on the inputs (in their dtype), with the same loss as
    reference_single: {"out", "lse", "dq", "dk", "dv", "dsinks"} (lse None where the entry point
    does not return it)."""
    import ring_flash_attn as rfa
    from ring_flash_attn.grouped_python import _flash_attn_varlen_forward_grouped

    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    dtype = inp.dtype

    def leaf(t: Tensor) -> Tensor:
        x = t.to(dtype)
        if cfg["strided"]:
            x = _strided(x, gen)
        return x.detach().requires_grad_(True)

    q = [leaf(t) for t in inp.q]
    k, v = leaf(inp.k), leaf(inp.v)
    sinks = None if inp.sinks is None else inp.sinks.clone().requires_grad_(True)
    features = dict(window_size=tuple(cfg["window"]), softcap=cfg["softcap"], sinks=sinks)
    entry = cfg["entry"]
    if entry == "flash_attn_varlen_func":
        out, lse, _ = rfa.flash_attn_varlen_func(q[0], k, v, inp.cu_q[0], inp.cu_k, inp.max_q[0], inp.max_k,
                                                 softmax_scale=cfg["scale"], causal=cfg["causal"],
                                                 deterministic=cfg["deterministic"], return_attn_probs=True,
                                                 **features)
        outs, lses = [out], [lse]
    elif entry == "grouped":
        outs, lses = rfa.grouped_flash_attn_varlen_func(q, k, v, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k,
                                                        seqused_k_list=inp.seqused, softmax_scale=cfg["scale"],
                                                        causal=cfg["causal"], return_lse=True,
                                                        deterministic=cfg["deterministic"], **features)
    elif entry == "grouped_python":
        outs, lses = _flash_attn_varlen_forward_grouped(q, k, v, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k,
                                                         seqused_k_list=inp.seqused, softmax_scale=cfg["scale"],
                                                         causal=cfg["causal"], **features)
    elif entry == "op":
        G = len(q)
        seqused = list(inp.seqused) if inp.seqused is not None else [None] * G
        kwargs = feature_kwargs(cfg["window"], cfg["softcap"], sinks, window_as=list)
        scale = 0.0 if cfg["scale"] is None else float(cfg["scale"])
        outs, lses = torch.ops.ring_flash_attn.grouped_fwd(q, k, v, inp.cu_q, inp.cu_k, seqused, inp.max_q,
                                                          inp.max_k, scale, cfg["causal"], cfg["deterministic"],
                                                          **kwargs)
    else:
        raise ValueError(f"entry: unknown entry point {entry!r}")
    loss = sum((o.double() * d).sum() for o, d in zip(outs, inp.dout))
    if cfg["lse_loss"]:
        loss = loss + sum((torch.where(torch.isfinite(l), l, torch.zeros_like(l)).double() * d).sum()
                          for l, d in zip(lses, inp.dlse))
    return _results(loss, q, k, v, sinks, outs, lses)


def score_magnitude(cfg: dict, inp: SingleInputs) -> float:
    """The largest |score| of a (query, key) pair the case's mask lets attend: |scale * q.k| of
    each query head with its KV head, per sequence, over the visible pairs (keys up to seqused_k;
    the softcap bounds it by the softcap). A softmax recomputed from a stored float32 LSE, as
    every FlashAttention backward recomputes it, rounds each exponent score - lse at that
    magnitude: the error of P = exp(score - lse), and of the gradients, grows with it (fp32 at
    D = 256 with a scale of 0.85 and queries of amplitude 3: scores near 100, dK off by 8e-5 where
    PyTorch's fp32 softmax, which never subtracts an LSE, is off by 1.4e-5)."""
    D, Hk = cfg["D"], cfg["Hk"]
    scale = cfg["scale"] if cfg["scale"] is not None else 1.0 / math.sqrt(D)
    cu_k = inp.cu_k.tolist()
    best = 0.0
    for g, q in enumerate(inp.q):
        cu_q = inp.cu_q[g].tolist()
        used = None if inp.seqused is None or inp.seqused[g] is None else inp.seqused[g].tolist()
        for b in range(len(cu_k) - 1):
            lk = cu_k[b + 1] - cu_k[b] if used is None else used[b]
            qb = q[cu_q[b]:cu_q[b + 1]]
            kb = inp.k[cu_k[b]:cu_k[b] + lk]
            if qb.shape[0] == 0 or kb.shape[0] == 0:
                continue
            allowed = visible_pairs(qb.shape[0], kb.shape[0], cfg["causal"], tuple(cfg["window"]), 0, qb.device)
            if not allowed.any():
                continue
            scores = torch.einsum("nhrd,mhd->hrnm", qb.view(qb.shape[0], Hk, -1, D), kb).abs() * scale
            best = max(best, scores[..., allowed].max().item())
    if cfg["softcap"] > 0:
        best = min(best, cfg["softcap"])
    return best


def _compare(name: str, got: Tensor, ref_hi: Tensor, ref_lp: Optional[Tensor], dtype: torch.dtype,
             rounding: float = 0.0, scores: float = 0.0) -> Optional[str]:
    """None when `got` passes against the float64 reference (FlashAttention's rule for fp16 /
    bf16: at most twice the error of the same math in that dtype plus one rounding, plus twice
    `rounding`, the error the rounded O alone brings into a gradient; a tight bound for fp32 /
    fp64, widened in proportion to the largest |score| past 16 (score_magnitude)), else what
    failed."""
    if tuple(got.shape) != tuple(ref_hi.shape):
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(ref_hi.shape)}"
    if got.numel() == 0:
        return None
    g64, r64 = got.detach().double(), ref_hi.detach().double()
    if torch.isnan(g64).any():
        return f"{name}: NaN"
    err = (g64 - r64).abs().max().item()
    scale = max(1.0, r64.abs().max().item())
    if dtype in LOW_PRECISION:
        base = (ref_lp.detach().double() - r64).abs().max().item()
        bound = 2.0 * (base + rounding) + torch.finfo(dtype).eps * scale
    else:
        # The gradients sum over more terms than the outputs (x4); exponents rounded at |score|.
        bound = TIGHT_TOL[dtype] * scale * 4 * max(1.0, scores / 16.0)
    if not err <= bound:
        return f"{name}: max|got - ref| = {err:.3e} > {bound:.3e} (max|ref| {r64.abs().max().item():.3e})"
    return None


def _compare_lse(name: str, got: Tensor, ref: Tensor) -> Optional[str]:
    if got.dtype != torch.float32:
        return f"{name}: dtype {got.dtype}, expected torch.float32"
    if tuple(got.shape) != tuple(ref.shape):
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if torch.isnan(got).any():
        return f"{name}: NaN"
    ninf, ninf_ref = torch.isneginf(got), torch.isneginf(ref)
    if not torch.equal(ninf, ninf_ref):
        return f"{name}: -inf at {int(ninf.sum())} entries, the reference at {int(ninf_ref.sum())}"
    finite = ~ninf_ref
    if finite.any():
        err = (got[finite].double() - ref[finite].double()).abs().max().item()
        bound = 1e-4 * max(1.0, ref[finite].abs().max().item())
        if not err <= bound:
            return f"{name}: max|lse - ref| = {err:.3e} > {bound:.1e}"
    return None


def check_single(cfg: dict) -> List[str]:
    """Runs one configuration; returns the list of failures (empty: it passed)."""
    inp = SingleInputs(cfg)
    ref = reference_single(cfg, inp, torch.float64)
    got = run_single(cfg, inp)
    scores = score_magnitude(cfg, inp)
    lp = rounded = None
    if inp.dtype in LOW_PRECISION:
        lp = reference_single(cfg, inp, inp.dtype)
        rounded = reference_single(cfg, inp, torch.float64, rounded_out=got["out"])
    failures = []

    def cmp(name, x, r, r_lp):
        base, _, index = name.partition("[")
        gap = 0.0
        if rounded is not None and base in ("dq", "dk", "dv", "dsinks"):
            r_rounded = rounded[base] if not index else rounded[base][int(index[:-1])]
            gap = (r_rounded.double() - r.double()).abs().max().item() if r.numel() else 0.0
        msg = _compare(name, x, r, r_lp, inp.dtype, gap, scores)
        if msg:
            failures.append(msg)

    for g in range(len(inp.q)):
        if got["out"][g].dtype != inp.dtype:
            failures.append(f"out[{g}]: dtype {got['out'][g].dtype}, expected {inp.dtype}")
        cmp(f"out[{g}]", got["out"][g], ref["out"][g], lp and lp["out"][g])
        msg = _compare_lse(f"lse[{g}]", got["lse"][g], ref["lse"][g])
        if msg:
            failures.append(msg)
        cmp(f"dq[{g}]", got["dq"][g], ref["dq"][g], lp and lp["dq"][g])
    cmp("dk", got["dk"], ref["dk"], lp and lp["dk"])
    cmp("dv", got["dv"], ref["dv"], lp and lp["dv"])
    if ref["dsinks"] is not None:
        # float32 sinks whose gradient sums rowsum(dO * O) over every row of a head: float32's
        # bound for fp32 / fp64 data, the low-precision rule against the same math in the dtype
        # (O rounded to it, as the library's O is) for fp16 / bf16
        if inp.dtype in LOW_PRECISION:
            cmp("dsinks", got["dsinks"], ref["dsinks"], lp["dsinks"])
        else:
            r = ref["dsinks"]
            err = (got["dsinks"].double() - r).abs().max().item()
            bound = 1e-4 * max(1.0, r.abs().max().item())
            if not err <= bound or torch.isnan(got["dsinks"]).any():
                failures.append(f"dsinks: max|got - ref| = {err:.3e} > {bound:.1e}")
    return failures
