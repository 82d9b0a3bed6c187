"""Stress tests of the grouped kernels (markers ``gpu`` and ``stress``; the README's test command
deselects ``stress``; run them with ``pytest test/test_grouped_flash_attention_stress.py``).

Long sequences cannot be checked against a dense fp32 reference (the score matrix alone would be
tens of GB), so these tests check a sample of query rows of every group (the first, the last and
random rows) against an fp32 reference over all keys those rows see, with the same pass rule as
the unit tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func

pytestmark = [pytest.mark.gpu, pytest.mark.stress]
FLOOR = 1e-4


def _rows_reference(q_rows, k, v, row_index, seqlen_q, seqlen_k, causal, dtype):
    """Attention of selected query rows of one sequence, in `dtype`.

    q_rows [R, Hq, D]; k, v [Lk, Hk, D]; row_index [R] positions within the sequence."""
    hq, hk = q_rows.shape[1], k.shape[1]
    kk = k.to(dtype).repeat_interleave(hq // hk, dim=1)
    vv = v.to(dtype).repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("rhd,khd->hrk", q_rows.to(dtype), kk) / math.sqrt(q_rows.shape[-1])
    if causal:
        j = torch.arange(seqlen_k, device=k.device)[None, :]
        allowed = j <= row_index[:, None] + (seqlen_k - seqlen_q)
        s = s.masked_fill(~allowed[None], float("-inf"))
    # A row that sees no key (Lq > Lk, bottom-right causal) has O = 0: softmax over only -inf
    # gives NaN, which is replaced by 0 here (the kernel output itself is checked for NaN).
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(dtype)
    return torch.einsum("hrk,khd->rhd", p, vv)


def _check_sampled(out, q, k, v, seqlen_k, causal=True, samples=96, name=""):
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    lq = q.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(lq + seqlen_k)
    rows = torch.cat([torch.tensor([0, lq - 1]), torch.randint(0, lq, (samples,), generator=gen)]).to(q.device)
    ref32 = _rows_reference(q[rows], k[:seqlen_k], v[:seqlen_k], rows, lq, seqlen_k, causal, torch.float32)
    ref_lp = _rows_reference(q[rows], k[:seqlen_k], v[:seqlen_k], rows, lq, seqlen_k, causal, q.dtype)
    err = (out[rows].float() - ref32).abs().max().item()
    base = (ref_lp.float() - ref32).abs().max().item()
    assert err <= 2 * base + FLOOR, f"{name}: max err {err:.3e} > 2 * {base:.3e} + {FLOOR}"


def _zigzag_groups(L, N, r, hq=32, hk=8, d=128, dtype=torch.bfloat16):
    c = L // (2 * N)
    lk = [(r + 1) * c, (2 * N - r) * c]
    q = [torch.randn(c, hq, d, device="cuda", dtype=dtype) for _ in range(2)]
    k = torch.randn(max(lk), hk, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    cu_q = torch.tensor([0, c], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, max(lk)], dtype=torch.int32, device="cuda")
    used = [torch.tensor([n], dtype=torch.int32, device="cuda") for n in lk]
    return q, k, v, cu_q, cu_k, used, lk, c


class TestGroupedFlashAttentionLargeScales:
    @pytest.mark.parametrize("seqlen", [65536, 131072])
    def test_long_zigzag_rank(self, seqlen):
        torch.manual_seed(seqlen)
        for r in (0, 7):
            q, k, v, cu_q, cu_k, used, lk, c = _zigzag_groups(seqlen, 8, r)
            outs = grouped_flash_attn_varlen_func(q, k, v, [cu_q, cu_q], cu_k, [c, c], max(lk), seqused_k_list=used)
            for g in range(2):
                _check_sampled(outs[g], q[g], k, v, lk[g], name=f"L={seqlen} r={r} group {g}")

    @pytest.mark.parametrize("num_groups", [8, 16])
    def test_many_groups(self, num_groups):
        torch.manual_seed(num_groups)
        L = 32768
        c = L // num_groups
        q = [torch.randn(c, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(num_groups)]
        k = torch.randn(L, 4, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu_q = torch.tensor([0, c], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, L], dtype=torch.int32, device="cuda")
        used = [torch.tensor([(g + 1) * c], dtype=torch.int32, device="cuda") for g in range(num_groups)]
        outs = grouped_flash_attn_varlen_func(q, k, v, [cu_q] * num_groups, cu_k, [c] * num_groups, L,
                                              seqused_k_list=used)
        for g in range(num_groups):
            _check_sampled(outs[g], q[g], k, v, (g + 1) * c, samples=32, name=f"group {g}")

    def test_large_batch_varlen(self):
        torch.manual_seed(1)
        gen = torch.Generator().manual_seed(2)
        lengths = torch.randint(1, 2048, (256,), generator=gen).tolist()
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
        total = cu[-1].item()
        q = [torch.randn(total, 8, 128, device="cuda", dtype=torch.float16) for _ in range(2)]
        k = torch.randn(total, 2, 128, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        half = torch.tensor([max(1, n // 2) for n in lengths], dtype=torch.int32, device="cuda")
        outs = grouped_flash_attn_varlen_func(q, k, v, [cu, cu], cu, [max(lengths)] * 2, max(lengths),
                                              seqused_k_list=[half, None])
        for b in (0, 17, 255):
            s, e = cu[b].item(), cu[b + 1].item()
            for g, lk in ((0, int(half[b])), (1, e - s)):
                _check_sampled(outs[g][s:e], q[g][s:e], k[s:e], v[s:e], lk, samples=16, name=f"seq {b} group {g}")

    def test_no_memory_growth(self):
        torch.manual_seed(3)
        q, k, v, cu_q, cu_k, used, lk, c = _zigzag_groups(16384, 2, 0)
        args = (q, k, v, [cu_q, cu_q], cu_k, [c, c], max(lk))
        grouped_flash_attn_varlen_func(*args, seqused_k_list=used)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        for _ in range(100):
            outs = grouped_flash_attn_varlen_func(*args, seqused_k_list=used)
            del outs
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == start

    def test_extreme_values(self):
        torch.manual_seed(4)
        # Large logits in fp16 (scores ~ 1e4), values near fp16's max magnitude.
        q = torch.randn(1024, 8, 128, device="cuda", dtype=torch.float16) * 12
        k = torch.randn(4096, 8, 128, device="cuda", dtype=torch.float16) * 12
        v = (torch.rand(4096, 8, 128, device="cuda", dtype=torch.float16) * 2 - 1) * 60000
        cu_q = torch.tensor([0, 1024], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, 4096], dtype=torch.int32, device="cuda")
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1024, 4096, causal=True)
        assert torch.isfinite(out).all()
        _check_sampled(out, q, k, v, 4096, name="extreme")

    def test_all_keys_masked_rows(self):
        # Lq > Lk with bottom-right causal: row i sees keys j <= i - (Lq - Lk), so the first
        # Lq - Lk = 4000 rows see no key -> O = 0, LSE = -inf.
        torch.manual_seed(5)
        q = torch.randn(5000, 4, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1000, 4, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu_q = torch.tensor([0, 5000], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, 1000], dtype=torch.int32, device="cuda")
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5000, 1000, causal=True, return_attn_probs=True)
        assert torch.equal(out[:4000], torch.zeros_like(out[:4000]))
        assert torch.isinf(lse[:, :4000]).all() and (lse[:, :4000] < 0).all()
        assert torch.isfinite(lse[:, 4000:]).all()
        _check_sampled(out[4000:], q[4000:], k, v, 1000, name="rows that see keys")

    def test_imbalanced_groups(self):
        # One group of 1 query over 64K keys next to one of 16K queries over 1K keys.
        torch.manual_seed(6)
        q = [torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16),
             torch.randn(16384, 32, 128, device="cuda", dtype=torch.bfloat16)]
        k = torch.randn(65536, 8, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu = [torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
              torch.tensor([0, 16384], dtype=torch.int32, device="cuda")]
        cu_k = torch.tensor([0, 65536], dtype=torch.int32, device="cuda")
        used = [None, torch.tensor([1024], dtype=torch.int32, device="cuda")]
        outs = grouped_flash_attn_varlen_func(q, k, v, cu, cu_k, [1, 16384], 65536, seqused_k_list=used, causal=False)
        _check_sampled(outs[0], q[0], k, v, 65536, causal=False, samples=1, name="1 x 64K")
        _check_sampled(outs[1], q[1], k, v, 1024, causal=False, name="16K x 1K")
