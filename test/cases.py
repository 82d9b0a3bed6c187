"""Test inputs and the accuracy pass rule shared by the pytest files."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from reference import grouped_attention_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def case_dict(base: dict, overrides: dict, **fixed) -> dict:
    """A distributed test case as a plain dict (it travels to the spawned ranks): the module's
    defaults `base`, then the case's `overrides`, then its `fixed` fields (id, lengths ...)."""
    c = dict(base)
    c.update(overrides)
    c.update(fixed)
    return c


def case_maker(base: dict) -> Callable[..., dict]:
    """The case constructor of a distributed test module whose cases are global sequence lengths
    and overrides of the module's defaults `base`: make(case_id, lens, **overrides) ->
    case_dict(base, overrides, id=case_id, lens=list(lens))."""
    def make(case_id: str, lens: Sequence[int], **overrides) -> dict:
        return case_dict(base, overrides, id=case_id, lens=list(lens))
    return make


def feature_kwargs(window=(-1, -1), softcap: float = 0.0, sinks: Optional[Tensor] = None,
                   window_as: Callable = tuple) -> dict:
    """The ``window_size`` / ``softcap`` / ``sinks`` keywords of a call, only those set (a window
    other than (-1, -1), a non-zero softcap, sinks given); ``window_as`` makes the window the type
    the callee takes (a tuple for the public functions, a list for the op)."""
    kw = {}
    if tuple(window) != (-1, -1):
        kw["window_size"] = window_as(window)
    if softcap:
        kw["softcap"] = softcap
    if sinks is not None:
        kw["sinks"] = sinks
    return kw


def cu_seqlens(lengths: Sequence[int], device="cpu") -> Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def global_packed_batch(case: dict, gen: torch.Generator) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The global packed batch of a distributed test case (the same on every rank): cu_seqlens of
    case["lens"] and float64 normals q, k, v, dout [total, H, D] (q and dout with case["Hq"] heads,
    k and v with case["Hk"], D = case["D"]), drawn from `gen` in the order q, dout, k, v.
    Returns (cu_seqlens, q, k, v, dout)."""
    cu = cu_seqlens(case["lens"])
    total = int(cu[-1])
    q, dout = (torch.randn(total, case["Hq"], case["D"], generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(total, case["Hk"], case["D"], generator=gen, dtype=torch.float64) for _ in range(2))
    return cu, q, k, v, dout


def packed_reference(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, cu: Tensor, softmax_scale=None, causal=True,
                     window=(-1, -1), softcap: float = 0.0, sinks: Optional[Tensor] = None):
    """Single-process attention of a whole packed batch (q [T, Hq, D], k / v [T, Hk, D], the same
    cu_seqlens for queries and keys) on float64 copies of the inputs, and its gradients for the
    output gradient dout by autograd: (out [T, Hq, D], lse [Hq, T], (dq, dk, dv[, dsinks]))."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    if sinks is not None:
        leaves.append(sinks.detach().double().requires_grad_(True))
    (out,), (lse,) = grouped_attention_reference([leaves[0]], leaves[1], leaves[2], [cu], cu, None, softmax_scale,
                                                 causal, tuple(window), softcap,
                                                 leaves[3] if sinks is not None else None)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out, lse, grads


def single_process_batch(seed: int, lens: Sequence[int] = (5, 7, 4), num_heads_q: int = 4, num_heads_k: int = 2,
                         head_dim: int = 8):
    """A small packed float64 batch for a scheme's single-process path (no process group): cu_seqlens
    of `lens`, q [T, Hq, D], k, v [T, Hk, D] as leaves that require grad, and dout like q, drawn
    from `seed` in the order q, k, v, dout. Returns (cu_seqlens, q, k, v, dout)."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = torch.randn(T, num_heads_q, head_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(T, num_heads_k, head_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(T, num_heads_k, head_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(T, num_heads_q, head_dim, generator=gen, dtype=torch.float64)
    return cu_seqlens(lens), q, k, v, dout


def assert_single_process_matches(out: Tensor, lse: Tensor, grads: Sequence[Tensor], batch, causal: bool,
                                  tol: float = 1e-10) -> None:
    """A single-process call's out, lse [Hq, T] and gradients (dq, dk, dv) on single_process_batch's
    `batch` are within `tol` of the float64 reference's (max |x - ref| / max(1, max |ref|))."""
    from dist_harness import rel_err

    cu, q, k, v, dout = batch
    ref_out, ref_lse, ref_grads = packed_reference(q, k, v, dout, cu, None, causal)
    assert rel_err(out, ref_out) <= tol
    assert rel_err(lse, ref_lse) <= tol
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(g, rg) <= tol, name


def varlen_call_args(**over) -> dict:
    """Keyword arguments of a scheme's varlen function on a valid packed float64 batch (sequences of
    6 and 10 tokens, 4 query / 2 KV heads, head dim 8), with `over` on top (the bad one of an error
    test, or the scheme's own arguments)."""
    cu = cu_seqlens([6, 10])
    args = dict(q=torch.randn(16, 4, 8, dtype=torch.float64), k=torch.randn(16, 2, 8, dtype=torch.float64),
                v=torch.randn(16, 2, 8, dtype=torch.float64), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=10,
                max_seqlen_k=10)
    args.update(over)
    return args


# Bad arguments that every context-parallel scheme's varlen function refuses alike, applied to
# varlen_call_args' batch: (overrides, exception, message pattern).
VARLEN_ARGUMENT_ERRORS = [
    (dict(alibi_slopes=torch.zeros(4)), NotImplementedError, r"alibi_slopes"),
    (dict(dropout_p=0.1), NotImplementedError, r"dropout_p"),
    (dict(cu_seqlens_k=cu_seqlens([6, 10]).long()), ValueError, r"cu_seqlens_k: expected dtype torch.int32"),
    (dict(cu_seqlens_q=cu_seqlens([16])), ValueError, r"cu_seqlens_q: expected 3 entries"),
    (dict(k=torch.randn(16, 2, 8)), ValueError, r"k: expected dtype torch.float64"),
    (dict(k=torch.randn(14, 2, 8, dtype=torch.float64), v=torch.randn(14, 2, 8, dtype=torch.float64)),
     ValueError, r"k: expected 16 local tokens"),
    (dict(q=torch.randn(16, 3, 8, dtype=torch.float64)), ValueError, r"q: expected a number of heads divisible"),
    (dict(max_seqlen_q=torch.tensor(10)), ValueError, r"max_seqlen_q: expected a Python int"),
]


def assert_packed_forms_need_4d(kvpacked, qkvpacked, *scheme_args) -> None:
    """A scheme's kvpacked and qkvpacked varlen functions, given 3-D tensors where they take the
    packed 4-D ones, raise ValueError naming kv / qkv (`scheme_args`: what follows max_seqlen_k)."""
    import pytest

    a = varlen_call_args()
    with pytest.raises(ValueError, match=r"kv: expected a 4-D tensor"):
        kvpacked(a["q"], a["k"], a["cu_seqlens_q"], a["cu_seqlens_k"], 10, 10, *scheme_args)
    with pytest.raises(ValueError, match=r"qkv: expected a 4-D tensor"):
        qkvpacked(a["q"], a["cu_seqlens_q"], a["cu_seqlens_k"], 10, 10, *scheme_args)


@dataclass
class Case:
    q_list: List[Tensor]
    k: Tensor
    v: Tensor
    cu_seqlens_q_list: List[Tensor]
    cu_seqlens_k: Tensor
    seqused_k_list: Optional[List[Optional[Tensor]]]
    max_seqlen_q_list: List[int]
    max_seqlen_k: int
    seqlens_q: List[List[int]] = field(default_factory=list)
    seqlens_k: List[int] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return len(self.q_list)

    def api_args(self):
        """Positional arguments of grouped_flash_attn_varlen_func (without seqused_k_list)."""
        return (self.q_list, self.k, self.v, self.cu_seqlens_q_list, self.cu_seqlens_k,
                self.max_seqlen_q_list, self.max_seqlen_k)

    def op_args(self, softmax_scale=0.0, causal=True, deterministic=False):
        """Positional arguments of torch.ops.ring_flash_attn.grouped_fwd."""
        G = self.num_groups
        seqused = list(self.seqused_k_list) if self.seqused_k_list is not None else [None] * G
        return (self.q_list, self.k, self.v, self.cu_seqlens_q_list, self.cu_seqlens_k, seqused,
                self.max_seqlen_q_list, self.max_seqlen_k, softmax_scale, causal, deterministic)

    def to(self, dtype: torch.dtype, requires_grad: bool = False) -> "Case":
        """A copy with q/k/v converted to `dtype` (as leaves) and the same metadata."""

        def conv(t):
            return t.detach().to(dtype).requires_grad_(requires_grad)

        return Case([conv(q) for q in self.q_list], conv(self.k), conv(self.v),
                    self.cu_seqlens_q_list, self.cu_seqlens_k, self.seqused_k_list,
                    self.max_seqlen_q_list, self.max_seqlen_k, self.seqlens_q, self.seqlens_k)


@dataclass
class FeatureScenario:
    """A grouped varlen case of the score-feature tests (test_window_softcap_sinks_cpu.py,
    test_gpu_window_softcap_sinks.py): sequence lengths, heads, the mask (causal, window, per-group
    diagonal shifts, seqused_k), softcap and whether the heads have sink logits."""

    name: str
    seqlens_q: List[List[int]]  # [G][B]
    seqlens_k: List[int]
    hq: int = 4
    hk: int = 2
    dim: int = 32  # head dim of the CPU tests (the GPU tests run every head dim of their list)
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False
    seqused: Optional[List[Optional[List[int]]]] = None
    shifts: Optional[List[Optional[List[int]]]] = None
    extra_rows: int = 0  # rows after the last sequence, in every group
    q_amplitude: float = 1.0  # larger: scores reach the softcap
    scale: float = 0.0  # 0: 1 / sqrt(head dim)
    has_rows_without_keys: bool = False  # the case is built to have them (checked)


@dataclass
class FeatureInputs:
    """The tensors of a FeatureScenario: q per group [total_q_g, Hq, D], k / v [total_k, Hk, D],
    the metadata, sinks (float32 [Hq] or None) and, where the test draws them with the inputs,
    the output gradients (like q_list)."""

    q_list: List[Tensor]
    k: Tensor
    v: Tensor
    cu_q_list: List[Tensor]
    cu_k: Tensor
    seqused: Optional[List[Optional[Tensor]]]
    shifts: Optional[List[Optional[Tensor]]]
    sinks: Optional[Tensor]
    max_q: List[int]
    max_k: int
    douts: List[Tensor] = field(default_factory=list)

    def leaves(self, dtype: torch.dtype) -> Tuple[List[Tensor], Tensor, Tensor, Optional[Tensor]]:
        """q_list, k, v in `dtype` and float32 sinks, as fresh leaves that require grad."""
        def leaf(t):
            return t.detach().to(dtype).requires_grad_(True)
        sinks = None if self.sinks is None else self.sinks.detach().clone().requires_grad_(True)
        return [leaf(q) for q in self.q_list], leaf(self.k), leaf(self.v), sinks


def make_case(
    seqlens_q: Sequence[Sequence[int]],
    seqlens_k: Sequence[int],
    num_heads_q: int,
    num_heads_k: int,
    head_dim: int,
    dtype: torch.dtype,
    seqused_k: Optional[Sequence[Optional[Sequence[int]]]] = None,
    seed: int = 0,
    device="cpu",
) -> Case:
    """Random inputs: seqlens_q[g][b] queries of group g in sequence b, seqlens_k[b] keys."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(device)

    B = len(seqlens_k)
    q_list = [randn(sum(lens), num_heads_q, head_dim) for lens in seqlens_q]
    total_k = sum(seqlens_k)
    k = randn(total_k, num_heads_k, head_dim)
    v = randn(total_k, num_heads_k, head_dim)
    for lens in seqlens_q:
        assert len(lens) == B
    seqused = None
    if seqused_k is not None:
        seqused = [None if s is None else torch.tensor(list(s), dtype=torch.int32, device=device)
                   for s in seqused_k]
    return Case(
        q_list=q_list,
        k=k,
        v=v,
        cu_seqlens_q_list=[cu_seqlens(lens, device) for lens in seqlens_q],
        cu_seqlens_k=cu_seqlens(seqlens_k, device),
        seqused_k_list=seqused,
        max_seqlen_q_list=[max(lens) for lens in seqlens_q],
        max_seqlen_k=max(seqlens_k),
        seqlens_q=[list(x) for x in seqlens_q],
        seqlens_k=list(seqlens_k),
    )


def reference(case: Case, dtype: torch.dtype, softmax_scale=None, causal=True, requires_grad=False):
    """Reference on the case's (already rounded) inputs, computed in `dtype`.

    Returns (case_in_dtype, out_list, lse_list)."""
    c = case.to(dtype, requires_grad=requires_grad)
    outs, lses = grouped_attention_reference(
        c.q_list, c.k, c.v, c.cu_seqlens_q_list, c.cu_seqlens_k, c.seqused_k_list,
        softmax_scale=softmax_scale, causal=causal)
    return c, outs, lses


# Tight absolute tolerances (relative to max(1, max|ref|)) for the high-precision dtypes,
# where the library's CPU backend should agree with the float64 reference to rounding.
TIGHT_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def assert_pass_rule(name: str, out: Tensor, ref_hi: Tensor, ref_lp: Optional[Tensor]) -> None:
    """FlashAttention's rule for low precision:
        max|out - ref_hi| <= 2 * max|ref_lp - ref_hi| + floor
    where ref_hi is the high-precision reference on the rounded inputs and ref_lp the same math in
    the test dtype; floor is one unit of rounding at the largest reference magnitude. For float32
    and float64 a plain tight tolerance. NaN never passes."""
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output"
    out64 = out.detach().double()
    ref64 = ref_hi.detach().double()
    if out.numel() == 0:
        return
    err = (out64 - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    if out.dtype in LOW_PRECISION:
        assert ref_lp is not None
        base = (ref_lp.detach().double() - ref64).abs().max().item()
        floor = torch.finfo(out.dtype).eps * scale
        bound = 2.0 * base + floor
        assert err <= bound, (
            f"{name} ({out.dtype}): max|out - ref| = {err:.3e} > 2 * {base:.3e} (same math in "
            f"{out.dtype}) + {floor:.1e}"
        )
    else:
        bound = TIGHT_TOL[out.dtype] * scale
        assert err <= bound, f"{name} ({out.dtype}): max|out - ref| = {err:.3e} > {bound:.1e}"


def assert_lse_close(name: str, lse: Tensor, ref: Tensor, tol: float = 1e-4) -> None:
    """LSE is float32 whatever the input dtype: -inf exactly where the reference has -inf (rows
    without keys), elsewhere close in absolute terms."""
    assert lse.dtype == torch.float32, f"{name}: dtype {lse.dtype}"
    assert lse.shape == ref.shape, f"{name}: shape {tuple(lse.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(lse).any(), f"{name}: NaN"
    ref = ref.detach().float()
    ninf_ref = torch.isneginf(ref)
    ninf = torch.isneginf(lse)
    assert torch.equal(ninf, ninf_ref), (
        f"{name}: -inf rows differ: {int(ninf.sum())} in the output, {int(ninf_ref.sum())} in the reference"
    )
    finite = ~ninf_ref
    if finite.any():
        err = (lse[finite].double() - ref[finite].double()).abs().max().item()
        bound = tol * max(1.0, ref[finite].abs().max().item())
        assert err <= bound, f"{name}: max|lse - ref| = {err:.3e} > {bound:.1e}"


def poison_like(t: Tensor) -> Tensor:
    """A tensor shaped like `t` filled with NaN (to catch unwritten outputs)."""
    return torch.full_like(t, math.nan)


def library_available() -> bool:
    """True when ring_flash_attn imports and libringattn loads (tests that run the library skip
    themselves otherwise, e.g. a benchmark test on a machine without a build)."""
    try:
        from ring_flash_attn import _lib
    except ImportError:
        return False
    return _lib.is_available()
