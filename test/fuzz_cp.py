"""Random context-parallel cases for test_fuzz_cpu.py: a configuration drawn from a seed (the same
on every rank), the scheme's call on the rank's shard, and the comparison of the rank's rows of
out, LSE, dQ, dK, dV and the sinks' gradient (summed over the ranks) with reference.py's float64
attention of the whole global batch (autograd through it for the gradients).

Schemes and forms: ring and zigzag ring (batched with per-row real lengths, varlen; plain, kv-
and qkv-packed), stripe (batched), llama3 and zigzag llama3 (varlen; plain / kv / qkv packed;
zigzag llama3's three implementations; heads_k_stride), Ulysses (varlen, batched) and the hybrid
(every mesh of the world, each K/V scheme across). Lengths of 1, primes, lengths that do not
divide N or 2N; GQA / MQA; windows (0, small, past the sequence, one-sided), softcap, sinks,
causal or not; float64, float32, bfloat16, float16."""

from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from cases import LOW_PRECISION, cu_seqlens
from reference import grouped_attention_reference

SCHEMES = ("ring", "zigzag", "stripe", "llama3", "zigzag_llama3", "ulysses", "hybrid")
KV_SCHEMES = ("zigzag_llama3", "llama3", "zigzag_ring")
# schemes whose padding rows (where the layout cannot cut the packed total evenly) form a sequence
# of their own: they attend to each other, their outputs are meaningless, they need dout = 0
OWN_SEQUENCE_PADDING = ("llama3", "ulysses", "hybrid")
LENGTHS = (0, 1, 1, 2, 3, 5, 7, 8, 11, 12, 13, 16, 17, 23, 24, 31, 37, 64, 67, 97, 131)

# the value of the expanded output gradient (that of out.sum() * 0.75)
EXPANDED_DOUT = 0.75

# against the float64 reference, relative to max(1, max |ref|): the ring merges go through the
# kernels' float32 LSE, so float64 data is float32-accurate there
TOL = {"float64": 2e-6, "float32": 5e-5}


def _float32_value(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def draw_cp(seed: int, world_size: int, scheme: Optional[str] = None) -> dict:
    """A random context-parallel configuration for `world_size` ranks (a plain dict)."""
    rng = random.Random(seed * 7919 + world_size)
    N = world_size
    # one rank: no process group (the functions' single-process path), so no hybrid mesh
    scheme = scheme or rng.choice(SCHEMES if N > 1 else SCHEMES[:-1])
    form = "varlen"
    if scheme in ("ring", "zigzag"):
        form = rng.choice(["batched", "varlen"])
    elif scheme == "stripe":
        form = "batched"
    elif scheme == "ulysses":
        form = rng.choice(["batched", "varlen", "varlen"])
    packed = rng.choice([None, None, "kv", "qkv"])
    if scheme == "hybrid":
        packed = rng.choice([None, "kv"])
    # heads: the all-to-all schemes split Hq over the ranks of their all-to-all group
    mesh = None
    if scheme == "hybrid":
        U = rng.choice([d for d in range(1, N + 1) if N % d == 0])
        mesh = (U, N // U, rng.choice(KV_SCHEMES))
    U = N if scheme == "ulysses" else (mesh[0] if mesh else 1)
    if packed == "qkv":
        Hk = rng.choice([1, 2]) * U
        Hq = Hk
    elif U > 1:
        Hk = rng.choice([d for d in (1, 2, 3, 4, 6) if d % U == 0 or U % d == 0])
        Hq = U * Hk * rng.choice([1, 2]) if Hk < U else Hk * rng.choice([1, 2])
        if Hq % U:
            Hq *= U
    else:
        Hk = rng.choice([1, 1, 2, 3, 4])
        Hq = Hk * (1 if packed == "qkv" else rng.choice([1, 2, 3, 4]))
    B = rng.choice([1, 1, 2, 3, 5])
    lens = [rng.choice(LENGTHS) for _ in range(B)]
    if scheme == "ulysses" and form == "batched":
        S = N * rng.choice([1, 2, 3, 5, 8])
        lens = [S] * B
    causal = rng.random() < 0.6
    longest = max(lens)
    window = (-1, -1)
    if rng.random() < 0.5:
        def side():
            return rng.choice([-1, 0, 1, 2, rng.randrange(0, longest + 1), longest + 5])
        window = (side(), rng.choice([-1, 0]) if causal else side())
    dtype = rng.choice(["float64", "float64", "float32", "float32", "bfloat16", "float16"])
    hs = 1
    if scheme in ("llama3", "zigzag_llama3"):
        hs = rng.choice([d for d in range(1, Hk + 1) if Hk % d == 0])
    D = 8 * rng.choice([1, 2, 3, 4, 8])
    # how the rank's inputs and output gradient are laid out: dense, or strided views (a slice of
    # a wider projection; the expanded gradient of out.sum(); a transposed gradient)
    layout = rng.choice(["dense", "dense", "strided", "expanded_dout", "transposed_dout"])
    if layout == "expanded_dout" and scheme in OWN_SEQUENCE_PADDING:
        layout = "dense"  # padding rows that are a sequence of their own must get dout = 0
    chunk = None  # the all-to-all schemes' chunk of KV heads
    if scheme in ("ulysses", "hybrid"):
        local = max(Hk, U) // U
        chunk = rng.choice([None] + [d for d in range(1, local + 1) if local % d == 0])
    return dict(seed=seed, world_size=N, scheme=scheme, form=form, packed=packed, mesh=mesh, Hq=Hq, Hk=Hk, D=D,
                lens=lens, causal=causal, window=window,
                softcap=rng.choice([0.0, 0.0, _float32_value(rng.uniform(0.5, 4.0))]),
                sinks=rng.random() < 0.35,
                scale=None if rng.random() < 0.7 else _float32_value(rng.uniform(0.05, 1.5)),
                impl=rng.choice([None, "fused", "grouped"]) if scheme == "zigzag_llama3" else None,
                hs=hs, dtype=dtype, layout=layout, chunk=chunk, deterministic=rng.random() < 0.2,
                grad_reduce=rng.random() < 0.2 and scheme in ("llama3", "zigzag_llama3"),
                return_lse=rng.random() < 0.8,
                # the max_seqlen arguments are hints: the results must not depend on them
                hints=rng.choice(["exact", "exact", "exact", "zero", "small", "large"]))


# ---- the global batch and its reference ------------------------------------------------------------


def global_batch(cfg: dict):
    """(cu, q, k, v, dout, sinks): the global packed batch, float64 values representable in the
    case's dtype; sinks float32 [Hq] or None."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    dtype = getattr(torch, cfg["dtype"])
    cu = cu_seqlens(cfg["lens"])
    T = sum(cfg["lens"])

    def rnd(h):
        return torch.randn(T, h, cfg["D"], generator=gen, dtype=torch.float64).to(dtype).double()

    q, k, v, dout = rnd(cfg["Hq"]), rnd(cfg["Hk"]), rnd(cfg["Hk"]), rnd(cfg["Hq"])
    sinks = (torch.randn(cfg["Hq"], generator=gen, dtype=torch.float32) + 0.5) if cfg["sinks"] else None
    return cu, q, k, v, dout, sinks


def reference(cfg: dict, q, k, v, dout, sinks, cu, dtype: torch.dtype,
              rounded_to: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """reference.py's attention of the global batch computed in `dtype` and its gradients.
    rounded_to: the gradients the exact backward gets when its ``D = rowsum(dO * O)`` reads O
    rounded to that dtype, as a low-precision backward does (see fuzz_single.reference_single)."""
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    s = None if sinks is None else sinks.to(dtype).requires_grad_(True)
    (out,), (lse,) = grouped_attention_reference([leaves[0]], leaves[1], leaves[2], [cu], cu, None, cfg["scale"],
                                                 cfg["causal"], tuple(cfg["window"]), cfg["softcap"], s)
    inputs = leaves + ([s] if s is not None else [])
    loss = (out * dout.to(dtype)).sum()
    if rounded_to is not None:
        shift = ((out.detach() - out.detach().to(rounded_to).to(dtype)) * dout.to(dtype)).sum(-1).t()  # [Hq, T]
        loss = loss + (torch.where(torch.isfinite(lse), lse.to(dtype), torch.zeros_like(lse, dtype=dtype)) * shift).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # empty sequences: unused
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2],
                dsinks=grads[3] if s is not None else None)


# ---- a rank's run --------------------------------------------------------------------------------


def _batched(x: Tensor, lens: List[int], S: int) -> Tensor:
    """Packed rows of B sequences -> [B, S, ...] (zero rows after each real length)."""
    out = x.new_zeros((len(lens), S) + tuple(x.shape[1:]))
    start = 0
    for b, n in enumerate(lens):
        out[b, :n] = x[start:start + n]
        start += n
    return out


class Meshes:
    """The hybrid meshes of a world, built once per spawn (collective: every rank builds every
    mesh in the same order): {(U, K, kv_scheme): HybridMesh}."""

    def __init__(self, world_size: int):
        import ring_flash_attn as rfa

        self.meshes = {}
        for U in range(1, world_size + 1):
            if world_size % U:
                continue
            for kv_scheme in KV_SCHEMES:
                self.meshes[(U, world_size // U, kv_scheme)] = rfa.hybrid_mesh(U, kv_scheme=kv_scheme, activate=False)


def _shard(cfg: dict, x: Tensor, cu: Tensor, rank: int, N: int, meshes: Optional[Meshes]) -> Tensor:
    """The rank's shard of the packed global rows x (natural order) in the scheme's layout."""
    import ring_flash_attn as rfa

    scheme, form, lens = cfg["scheme"], cfg["form"], cfg["lens"]
    if form == "batched":
        if scheme == "ulysses":
            S = lens[0]
            L = S // N
            return _batched(x, lens, S)[:, rank * L:(rank + 1) * L].clone()
        helper = {"ring": rfa.ring_shard, "zigzag": rfa.zigzag_shard, "stripe": rfa.stripe_shard}[scheme]
        return helper(_batched(x, lens, max(lens)), None, rank, N)
    if scheme == "ring":
        return rfa.ring_shard(x, cu, rank, N)
    if scheme in ("zigzag", "zigzag_llama3"):
        return rfa.zigzag_shard(x, cu, rank, N)
    if scheme == "llama3":
        return rfa.llama3_shard(x, cu, rank, N)
    if scheme == "ulysses":
        return rfa.ulysses_shard(x, cu, rank, N)
    if scheme == "hybrid":
        return rfa.hybrid_shard(x, cu, rank, meshes.meshes[tuple(cfg["mesh"])])
    raise ValueError(f"scheme: unknown {scheme!r}")


def _call(cfg: dict, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, rank: int, N: int, sinks, meshes):
    """The scheme on the rank's shard. Returns (out, lse, leaves, unpack): lse in the scheme's
    layout turned to [rows, Hq] (rows as out's leading dims flattened), unpack(grads of leaves)
    -> (dq, dk, dv) like q, k, v."""
    import ring_flash_attn as rfa

    scheme, form, packed = cfg["scheme"], cfg["form"], cfg["packed"]
    kw = dict(softmax_scale=cfg["scale"], causal=cfg["causal"], window_size=tuple(cfg["window"]),
              return_attn_probs=cfg["return_lse"])
    if cfg["deterministic"]:
        kw["deterministic"] = True
    if cfg["grad_reduce"]:
        kw["grad_reduce_dtype"] = q.dtype
    if cfg["softcap"]:
        kw["softcap"] = cfg["softcap"]
    if sinks is not None:
        kw["sinks"] = sinks
    lens = cfg["lens"]
    head_dim = -3  # the dim that packs k and v (or q, k and v): before the heads
    if scheme in ("ring", "zigzag", "stripe"):
        prefix = {"ring": "ring", "zigzag": "zigzag_ring", "stripe": "stripe"}[scheme]
        if form == "batched":
            args = ()
            kw["seqlens"] = lens
            names = (f"{prefix}_flash_attn_func", f"{prefix}_flash_attn_kvpacked_func",
                     f"{prefix}_flash_attn_qkvpacked_func")
        else:
            local_cu = (rfa.ring_local_cu_seqlens if scheme == "ring" else rfa.zigzag_local_cu_seqlens)(cu, N)
            args = (local_cu, int((local_cu[1:] - local_cu[:-1]).max()))
            kw["seqlens"] = cu[1:] - cu[:-1]
            names = (f"{prefix}_flash_attn_varlen_func", f"{prefix}_flash_attn_varlen_kvpacked_func",
                     f"{prefix}_flash_attn_varlen_qkvpacked_func")
    elif scheme in ("llama3", "zigzag_llama3"):
        prepare = (rfa.llama3_flash_attn_prepare_cu_seqlens if scheme == "llama3"
                   else rfa.zigzag_llama3_prepare_cu_seqlens)
        cu_q, cu_k, max_q, max_k, k_slice = prepare(cu, cfg["causal"], rank, N)
        args = (cu_q, cu_k, max_q, max_k, cfg["hs"], k_slice)
        if cfg["impl"] == "fused":
            kw["use_fused_kernel"] = True
        elif cfg["impl"] == "grouped":
            kw["use_grouped_attention"] = True
        names = (f"{scheme}_flash_attn_varlen_func", f"{scheme}_flash_attn_varlen_kvpacked_func",
                 f"{scheme}_flash_attn_varlen_qkvpacked_func")
    elif scheme == "ulysses":
        if form == "batched":
            args = ()
            kw["heads_k_stride"] = cfg["chunk"]
            names = ("ulysses_flash_attn_func", "ulysses_flash_attn_kvpacked_func", "ulysses_flash_attn_qkvpacked_func")
        else:
            cu_q, cu_k, max_q, max_k, k_slice = rfa.ulysses_prepare_cu_seqlens(cu, cfg["causal"], rank, N)
            args = (cu_q, cu_k, max_q, max_k, cfg["chunk"], k_slice)
            names = ("ulysses_flash_attn_varlen_func", "ulysses_flash_attn_varlen_kvpacked_func",
                     "ulysses_flash_attn_varlen_qkvpacked_func")
    else:  # hybrid
        mesh = meshes.meshes[tuple(cfg["mesh"])]
        cu_q, cu_k, max_q, max_k, k_slice = rfa.hybrid_prepare_cu_seqlens(cu, cfg["causal"], rank, mesh)
        args = (cu_q, cu_k, max_q, max_k, 1, k_slice)
        kw["group"] = mesh
        kw["ulysses_heads_k_stride"] = cfg["chunk"]
        names = ("hybrid_flash_attn_varlen_func", "hybrid_flash_attn_varlen_kvpacked_func",
                 "hybrid_flash_attn_varlen_qkvpacked_func")
    plain, kvpacked, qkvpacked = (getattr(rfa, n) for n in names)
    args = _with_hints(args, cfg["hints"], scheme)
    strided = cfg["layout"] == "strided"

    def leaf(t: Tensor):
        """(the input, the leaf its gradient lands in, the input's gradient from the leaf's)"""
        if not strided:
            x = t.detach().requires_grad_(True)
            return x, x, (lambda g: g)
        # a view into a buffer with one more head (non-dense token and head strides)
        buf = t.new_zeros(t.shape[:-2] + (t.shape[-2] + 1, t.shape[-1]))
        buf[..., 1:, :] = t
        buf.requires_grad_(True)
        return buf[..., 1:, :], buf, (lambda g: g[..., 1:, :])

    if packed == "kv":
        (q_in, lq, gq), (kv, lkv, gkv) = leaf(q), leaf(torch.stack([k, v], dim=head_dim))
        result = kvpacked(q_in, kv, *args, **kw)
        leaves, unpack = [lq, lkv], (lambda g: (gq(g[0]),) + tuple(gkv(g[1]).unbind(head_dim)))
    elif packed == "qkv":
        qkv, lqkv, gqkv = leaf(torch.stack([q, k, v], dim=head_dim))
        result = qkvpacked(qkv, *args, **kw)
        leaves, unpack = [lqkv], (lambda g: tuple(gqkv(g[0]).unbind(head_dim)))
    else:
        made = [leaf(t) for t in (q, k, v)]
        result = plain(*(m[0] for m in made), *args, **kw)
        leaves, unpack = [m[1] for m in made], (lambda g: tuple(m[2](x) for m, x in zip(made, g)))
    if not cfg["return_lse"]:
        return result, None, leaves, unpack
    out, lse, none = result
    assert none is None
    # lse: varlen [Hq, T]; batched [B, Hq, L] -> [B * L, Hq] like out's rows
    lse_rows = lse.transpose(-1, -2).reshape(-1, lse.shape[-2])
    return out, lse_rows, leaves, unpack


def _with_hints(args: tuple, hints: str, scheme: str) -> tuple:
    """The positional arguments of a varlen call with its max_seqlen hints replaced ("exact":
    as computed; "zero"; "small": a third; "large": 1000 more)."""
    if hints == "exact" or not args:
        return args
    change = {"zero": lambda m: 0, "small": lambda m: m // 3, "large": lambda m: m + 1000}[hints]
    positions = (1,) if scheme in ("ring", "zigzag") else (2, 3)  # (cu, max_seqlen) / (cu_q, cu_k, max_q, max_k, ...)
    return tuple(change(a) if i in positions else a for i, a in enumerate(args))


def run_cp_case(cfg: dict, rank: int, N: int, meshes: Optional[Meshes]) -> Dict[str, float]:
    """One configuration on this rank: {quantity: relative error} (-1 for a quantity that
    passes the low-precision rule's bound, see _error), plus "padding" checks."""
    import torch.distributed as dist

    dtype = getattr(torch, cfg["dtype"])
    cu, q, k, v, dout, sinks = global_batch(cfg)
    if cfg["layout"] == "expanded_dout":
        dout = torch.full_like(dout, EXPANDED_DOUT)
    ref = reference(cfg, q, k, v, dout, sinks, cu, torch.float64)
    lp = rounded = None
    if dtype in LOW_PRECISION:
        lp = reference(cfg, q, k, v, dout, sinks, cu, dtype)
        rounded = reference(cfg, q, k, v, dout, sinks, cu, torch.float64, rounded_to=dtype)
    T = q.shape[0]
    ids = _shard(cfg, torch.arange(1, T + 1, dtype=torch.float64)[:, None], cu, rank, N, meshes)
    ids = ids.reshape(-1).long() - 1  # -1: a padding row
    real = ids >= 0
    src = ids.clamp(min=0)

    def local(t: Tensor) -> Tensor:
        x = _shard(cfg, t, cu, rank, N, meshes).to(dtype)
        # padding rows: NaN (never read), except where the padding is a sequence of its own
        if cfg["scheme"] not in OWN_SEQUENCE_PADDING:
            flat = x.view((-1,) + tuple(x.shape[-2:]))
            flat[~real] = float("nan")
        return x

    ql, kl, vl = local(q), local(k), local(v)
    s = None if sinks is None else sinks.clone().requires_grad_(True)
    out, lse, leaves, unpack = _call(cfg, ql, kl, vl, cu, rank, N, s, meshes)
    dl = _shard(cfg, dout, cu, rank, N, meshes).to(dtype)  # padding rows: dout = 0
    if cfg["layout"] == "expanded_dout":  # the gradient of out.sum() * c
        dl = torch.full((), EXPANDED_DOUT, dtype=dtype).expand_as(out)
    elif cfg["layout"] == "transposed_dout":  # same values, the head dim not contiguous
        dl = dl.transpose(-1, -2).contiguous().transpose(-1, -2)
    grads = torch.autograd.grad(out, leaves + ([s] if s is not None else []), dl)
    dq, dk, dv = unpack(grads[:len(leaves)])
    results: Dict[str, float] = {}
    if out.dtype != dtype:
        results["out_dtype"] = float("inf")
    if s is not None:
        dsinks = grads[-1].clone()
        if dist.is_initialized():
            dist.all_reduce(dsinks)  # each rank's share: the sum is the gradient
        results["dsinks"] = _error(dsinks, ref["dsinks"], None if lp is None else lp["dsinks"], torch.float32, cfg,
                                   None if rounded is None else rounded["dsinks"])
    flat = lambda t: t.reshape((-1,) + tuple(t.shape[-2:]))  # noqa: E731
    for name, got in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        g = flat(got.detach())
        r = ref[name].index_select(0, src[real])
        r_lp = None if lp is None else lp[name].index_select(0, src[real])
        r_rounded = None if rounded is None or name == "out" else rounded[name].index_select(0, src[real])
        results[name] = _error(g[real], r, r_lp, dtype, cfg, r_rounded)
        if cfg["scheme"] not in OWN_SEQUENCE_PADDING and (~real).any():
            bad = g[~real]
            results[f"{name}_padding"] = float("inf") if not torch.equal(bad, torch.zeros_like(bad)) else 0.0
    if lse is None:
        return results
    lse_ref = ref["lse"].t().index_select(0, src[real])
    results["lse"] = _lse_error(lse[real], lse_ref)
    if cfg["scheme"] not in OWN_SEQUENCE_PADDING and (~real).any():
        pad = lse[~real]
        want = torch.full_like(pad, -math.inf) if sinks is None else sinks.expand_as(pad)
        results["lse_padding"] = 0.0 if torch.equal(pad, want) else float("inf")
    return results


def _error(got: Tensor, ref: Tensor, ref_lp: Optional[Tensor], dtype: torch.dtype, cfg: dict,
           ref_rounded: Optional[Tensor] = None) -> float:
    """max|got - ref| / max(1, max|ref|) for fp32 / fp64 (checked against TOL); for fp16 / bf16
    the same ratio when within FlashAttention's rule (2x the same math in the dtype + one
    rounding, plus 2x what the rounded O alone brings into a gradient: its distance to
    `ref_rounded`), else inf. NaN: inf."""
    if got.shape != ref.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    g, r = got.detach().double(), ref.detach().double()
    if torch.isnan(g).any():
        return float("inf")
    scale = max(1.0, r.abs().max().item())
    err = (g - r).abs().max().item()
    if cfg["dtype"] in ("bfloat16", "float16"):
        base = (ref_lp.detach().double() - r).abs().max().item()
        if ref_rounded is not None:
            base += (ref_rounded.detach().double() - r).abs().max().item()
        low = getattr(torch, cfg["dtype"])
        bound = 2.0 * base + torch.finfo(low).eps * scale
        return err / scale if err <= bound else float("inf")
    return err / scale


def _lse_error(got: Tensor, ref: Tensor) -> float:
    if got.dtype != torch.float32 or got.shape != ref.shape or torch.isnan(got).any():
        return float("inf")
    if not torch.equal(torch.isneginf(got), torch.isneginf(ref)):
        return float("inf")
    finite = ~torch.isneginf(ref)
    if not finite.any():
        return 0.0
    err = (got[finite].double() - ref[finite].double()).abs().max().item()
    return err / max(1.0, ref[finite].abs().max().item()) / 50.0  # LSE: float32, 1e-4 allowed as 2e-6 * 50


def tolerance(cfg: dict) -> float:
    """The bound on run_cp_case's values for the configuration."""
    return TOL.get(cfg["dtype"], 1.0)  # low precision: _error already applied the rule


# ---- bad arguments: a clear error on every rank before any communication ------------------------------


# (not isend / irecv: batch_isend_irecv checks that its ops name exactly those functions)
_COLLECTIVES = ("all_gather_into_tensor", "all_to_all_single", "batch_isend_irecv", "reduce_scatter_tensor",
                "all_gather", "all_reduce", "broadcast", "barrier")


class CountCollectives:
    """Counts the calls of torch.distributed's communication functions while active (the
    package calls them as ``dist.<name>``, so wrapping the module's attributes sees every one)."""

    def __enter__(self):
        import torch.distributed as dist

        self.calls: List[str] = []
        self._saved = {}
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                original = getattr(dist, name)
                self._saved[name] = original

                def counted(*args, _name=name, _original=original, **kwargs):
                    self.calls.append(_name)
                    return _original(*args, **kwargs)
                setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
        return False


def valid_calls(rank: int, N: int, meshes: Optional[Meshes]) -> Dict[str, Tuple[object, dict]]:
    """A valid float32 call of every scheme on this rank's shard of one small packed batch
    (sequences of 7 and 17 tokens, 4 query and 2 KV heads, head dim 8): {scheme: (function,
    keyword arguments)}."""
    import ring_flash_attn as rfa

    gen = torch.Generator().manual_seed(1234)
    cu = cu_seqlens([7, 17])  # a total the all-to-all schemes split over 2 and 3 ranks
    q_all = torch.randn(24, 4, 8, generator=gen)
    k_all, v_all = (torch.randn(24, 2, 8, generator=gen) for _ in range(2))
    calls = {}

    def shards(shard, *extra):
        return dict(zip("qkv", (shard(t, *extra) for t in (q_all, k_all, v_all))))

    for scheme, func, local in (("ring", rfa.ring_flash_attn_varlen_func, rfa.ring_local_cu_seqlens),
                                ("zigzag", rfa.zigzag_ring_flash_attn_varlen_func, rfa.zigzag_local_cu_seqlens)):
        shard = rfa.ring_shard if scheme == "ring" else rfa.zigzag_shard
        local_cu = local(cu, N)
        calls[scheme] = (func, dict(shards(shard, cu, rank, N), cu_seqlens=local_cu,
                                    max_seqlen=int(local_cu.diff().max()), causal=True, seqlens=cu.diff()))
    batched = torch.randn(2, 4 * N, 4, 8, generator=gen)
    kv_batched = torch.randn(2, 4 * N, 2, 8, generator=gen)
    calls["stripe"] = (rfa.stripe_flash_attn_func,
                       dict(q=rfa.stripe_shard(batched, None, rank, N), k=rfa.stripe_shard(kv_batched, None, rank, N),
                            v=rfa.stripe_shard(kv_batched, None, rank, N), causal=True,
                            seqlens=torch.tensor([4 * N, 4 * N - 1])))
    for scheme, func, prepare, shard in (
            ("llama3", rfa.llama3_flash_attn_varlen_func, rfa.llama3_flash_attn_prepare_cu_seqlens, rfa.llama3_shard),
            ("zigzag_llama3", rfa.zigzag_llama3_flash_attn_varlen_func, rfa.zigzag_llama3_prepare_cu_seqlens,
             rfa.zigzag_shard)):
        m = prepare(cu, True, rank, N)
        calls[scheme] = (func, dict(shards(shard, cu, rank, N), cu_seqlens_q=m[0], cu_seqlens_k=m[1],
                                    max_seqlen_q=m[2], max_seqlen_k=m[3], heads_k_stride=1, local_k_slice=m[4],
                                    causal=True))
    heads_split = 4 % N == 0 and (2 % N == 0 or N % 2 == 0)  # 4 query / 2 KV heads over N ranks
    if heads_split:
        m = rfa.ulysses_prepare_cu_seqlens(cu, True, rank, N)
        calls["ulysses"] = (rfa.ulysses_flash_attn_varlen_func,
                            dict(shards(rfa.ulysses_shard, cu, rank, N), cu_seqlens_q=m[0], cu_seqlens_k=m[1],
                                 max_seqlen_q=m[2], max_seqlen_k=m[3], heads_k_stride=None, local_k_slice=m[4],
                                 causal=True))
    if meshes is not None:
        mesh = meshes.meshes[(N, 1, "llama3") if heads_split else (1, N, "llama3")]
        m = rfa.hybrid_prepare_cu_seqlens(cu, True, rank, mesh)
        calls["hybrid"] = (rfa.hybrid_flash_attn_varlen_func,
                           dict(shards(rfa.hybrid_shard, cu, rank, mesh), cu_seqlens_q=m[0], cu_seqlens_k=m[1],
                                max_seqlen_q=m[2], max_seqlen_k=m[3], heads_k_stride=1, local_k_slice=m[4], causal=True,
                                group=mesh))
    return calls


def _strided_last(t: Tensor) -> Tensor:
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# (name, overrides from the valid call's keyword arguments, exception, message pattern): bad
# arguments every scheme refuses alike, on every rank, before any communication
BAD_ARGUMENTS = [
    ("k-dtype", lambda a: dict(k=a["k"].double()), ValueError, r"^k: expected dtype torch.float32"),
    ("q-int", lambda a: dict(q=a["q"].to(torch.int32), k=a["k"].to(torch.int32), v=a["v"].to(torch.int32)),
     ValueError, r"^q: expected dtype float16, bfloat16, float32 or float64, got torch.int32"),
    ("head-dim-12", lambda a: dict(q=a["q"].new_zeros(a["q"].shape[:-1] + (12,)),
                                   k=a["k"].new_zeros(a["k"].shape[:-1] + (12,)),
                                   v=a["v"].new_zeros(a["v"].shape[:-1] + (12,))), ValueError,
     r"^head_dim: expected a multiple of 8 in \[8, 256\] on CPU, got 12"),
    ("q-no-heads", lambda a: dict(q=a["q"][..., :0, :]), ValueError, r"^q: expected at least one head"),
    ("q-heads-not-a-multiple", lambda a: dict(q=a["q"][..., :3, :]), ValueError, r"^q: expected a number of heads"),
    ("sinks-shape", lambda a: dict(sinks=torch.zeros(3)), ValueError, r"^sinks: expected shape \(4,\)"),
    ("sinks-dtype", lambda a: dict(sinks=torch.zeros(4, dtype=torch.float64)), ValueError,
     r"^sinks: expected dtype torch.float32"),
    ("window-right-with-causal", lambda a: dict(window_size=(2, 3)), ValueError,
     r"^window_size: expected a right side of -1 or 0 with causal=True"),
    ("window-float", lambda a: dict(window_size=(1.5, 0)), ValueError, r"^window_size: expected a \(left, right\)"),
    ("softcap-negative", lambda a: dict(softcap=-1.0), ValueError, r"^softcap: expected a finite float >= 0"),
    ("softcap-inf", lambda a: dict(softcap=float("inf")), ValueError, r"^softcap: expected a finite float >= 0"),
    ("softcap-float32-subnormal", lambda a: dict(softcap=1e-45), ValueError,
     r"^softcap: expected .*float32 value is a normal number"),
    ("scale-nan", lambda a: dict(softmax_scale=float("nan")), ValueError, r"^softmax_scale: expected"),
    ("scale-float32-zero", lambda a: dict(softmax_scale=1e-50), ValueError, r"^softmax_scale: expected"),
    ("dropout", lambda a: dict(dropout_p=0.5), NotImplementedError, r"^dropout_p"),
]

def _decreasing(cu: Tensor) -> Tensor:
    """cu_seqlens whose second entry is past its third (-1 with a single sequence): not
    cumulative lengths."""
    bad = cu.clone()
    bad[1] = bad[2] + 1 if bad.shape[0] > 2 else -1
    return bad


# (name, scheme argument, overrides, exception, message pattern): bad metadata, checked by the
# schemes that take the argument
BAD_METADATA = [
    ("cu_seqlens-int64", "cu_seqlens", lambda a: dict(cu_seqlens=a["cu_seqlens"].long()), ValueError,
     r"^cu_seqlens: expected dtype torch.int32"),
    ("cu_seqlens-decreasing", "cu_seqlens", lambda a: dict(cu_seqlens=_decreasing(a["cu_seqlens"])), ValueError,
     r"^cu_seqlens: expected non-decreasing"),
    ("max_seqlen-negative", "max_seqlen", lambda a: dict(max_seqlen=-1), ValueError, r"^max_seqlen: expected"),
    ("seqlens-too-long", "seqlens", lambda a: dict(seqlens=a["seqlens"] + 100), ValueError, r"^seqlens: expected"),
    ("cu_seqlens_q-int64", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()), ValueError,
     r"^cu_seqlens_q: expected dtype torch.int32"),
    ("cu_seqlens_k-decreasing", "cu_seqlens_k", lambda a: dict(cu_seqlens_k=_decreasing(a["cu_seqlens_k"])),
     ValueError, r"^cu_seqlens_k: expected"),
    ("cu_seqlens_k-one-entry", "cu_seqlens_k", lambda a: dict(cu_seqlens_k=a["cu_seqlens_k"][:1]), ValueError,
     r"^cu_seqlens_k: expected"),
    ("max_seqlen_k-tensor", "max_seqlen_k", lambda a: dict(max_seqlen_k=torch.tensor(a["max_seqlen_k"])), ValueError,
     r"^max_seqlen_k: expected"),
    ("heads_k_stride-3", "heads_k_stride", lambda a: dict(heads_k_stride=3), ValueError, r"^heads_k_stride: expected"),
    ("local_k_slice-tuple", "local_k_slice", lambda a: dict(local_k_slice=(0, 4)), ValueError,
     r"^local_k_slice: expected a slice"),
]

# (name, overrides): layouts the single-device kernels do not take but every scheme does (it
# copies what it hands them), with the results of the same values in a dense layout
ODD_LAYOUTS = [
    ("q-head-dim-not-contiguous", lambda a: dict(q=_strided_last(a["q"]))),
    ("v-head-dim-not-contiguous", lambda a: dict(v=_strided_last(a["v"]))),
    ("sinks-strided", lambda a: dict(sinks=torch.linspace(-1.0, 1.0, 8)[::2])),
]


def bad_argument_items() -> List[Tuple[str, str]]:
    """(scheme, bad argument or odd layout name) of every check, in a fixed order (the same on
    every rank)."""
    schemes = ["ring", "zigzag", "stripe", "llama3", "zigzag_llama3", "ulysses", "hybrid"]
    return [(s, item[0]) for s in schemes for item in BAD_ARGUMENTS + BAD_METADATA + ODD_LAYOUTS]


def run_bad_argument(calls: Dict[str, Tuple[object, dict]], scheme: str, name: str) -> dict:
    """One bad call (or odd layout) on this rank: {"ok": whether it raised the expected error
    before any communication (an odd layout: ran and matched the dense layout's out and dq),
    "error": "Type: message" or None, "collectives": the communication calls made before it
    raised}."""
    import re

    if scheme not in calls:
        return {"ok": True, "skipped": True}
    func, kwargs = calls[scheme]
    metadata = {item[0]: item for item in BAD_METADATA}
    if name in metadata and metadata[name][1] not in kwargs:
        return {"ok": True, "skipped": True}  # the scheme has no such argument
    for item in BAD_ARGUMENTS + [(m[0],) + m[2:] for m in BAD_METADATA]:
        if item[0] == name:
            _, mutate, exc_type, pattern = item
            args = dict(kwargs)
            args.update(mutate(kwargs))
            error = None
            with CountCollectives() as counter:
                try:
                    func(**args)
                except Exception as e:  # noqa: BLE001 - judged below
                    error = e
            text = None if error is None else f"{type(error).__name__}: {error}"
            ok = (error is not None and type(error) is exc_type and re.search(pattern, str(error)) is not None
                  and not counter.calls)
            return {"ok": ok, "error": text, "collectives": list(counter.calls)}
    mutate = dict(ODD_LAYOUTS)[name]
    results = []
    try:
        for odd in (True, False):
            args = dict(kwargs)
            changed = mutate(kwargs)
            if not odd:
                changed = {k: v.contiguous() for k, v in changed.items()}
            args.update(changed)
            args["q"] = args["q"].detach().requires_grad_(True)
            out = func(**args)
            (dq,) = torch.autograd.grad(out, [args["q"]], torch.ones_like(out))
            results.append((out.detach(), dq))
    except Exception as e:  # noqa: BLE001 - reported
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "collectives": []}
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*results))
    return {"ok": same, "error": None if same else "the odd layout's results differ", "collectives": []}
