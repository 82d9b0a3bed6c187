"""Randomized checks of the public entry points on the CPU backend (a fuzz test).

Regressions first: minimal cases of the defects the fuzz found, fixed since.
"""

from __future__ import annotations

import pytest
import torch

import ring_flash_attn as rfa


def _no_default_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a default process group is initialised in this process")


# ---- regressions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2])
def test_zigzag_llama3_grouped_python_one_row_per_group(length):
    """zigzag llama3 with use_grouped_attention on a batch whose two query groups hold one row
    each (one sequence of at most 2N tokens): the backward handed the kernel a transposed view
    of the LSE (a reshape of [2, Hq, 1] to [Hq, 2] is a view with strides (1, Hq)) and raised
    "lse_list[0]: expected a contiguous tensor"."""
    _no_default_group()
    gen = torch.Generator().manual_seed(length)
    cu = torch.tensor([0, length], dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, k_slice = rfa.zigzag_llama3_prepare_cu_seqlens(cu, True, 0, 1)
    rows = int(cu_q[-1])  # 2: one row per group, the second a padding row when length is 1
    q = torch.randn(rows, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(rows, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(rows, 4, 8, generator=gen, dtype=torch.float64)
    results = []
    for flags in ({}, {"use_grouped_attention": True}):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = rfa.zigzag_llama3_flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, max_k, 1, k_slice, causal=True,
                                                       **flags)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, dout)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
