"""Test inputs and the accuracy pass rule shared by the pytest files."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

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


def cu_seqlens(lengths: Sequence[int], device="cpu") -> Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


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
