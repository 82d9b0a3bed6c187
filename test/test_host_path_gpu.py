"""The host path on a GPU (marker ``gpu``): cached call plans (Python kernels) or the C++ kernels
(libringattn_torch) follow the current stream (graph capture of a forward + backward replays on
new inputs) and the kernel tier set at run time."""

from __future__ import annotations

import pytest
import torch

from cases import cu_seqlens
from ring_flash_attn import _torch_shim, grouped_flash_attn_varlen_func, ops_implementation
from ring_flash_attn import ops as rfa_ops

pytestmark = pytest.mark.gpu


def _inputs(seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device="cuda", dtype=torch.bfloat16)

    q_list = [randn(128, 4, 64), randn(96, 4, 64)]
    k, v = randn(256, 2, 64), randn(256, 2, 64)
    cu_q = [cu_seqlens([100, 28], "cuda"), cu_seqlens([60, 36], "cuda")]
    cu_k = cu_seqlens([160, 96], "cuda")
    return q_list, k, v, cu_q, cu_k


def test_graph_capture_of_forward_and_backward_with_cached_plans():
    q_list, k, v, cu_q, cu_k = _inputs(31)
    leaves = [t.requires_grad_() for t in (*q_list, k, v)]
    douts = [torch.randn_like(q) for q in q_list]

    def step():
        outs = grouped_flash_attn_varlen_func(leaves[:2], leaves[2], leaves[3], cu_q, cu_k, [100, 60], 160,
                                              deterministic=True)
        return [*outs, *torch.autograd.grad(outs, leaves, douts)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    native_before = _torch_shim.counts()[0]
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up on the side stream (as capture requires): the plans are cached here
            step()
    torch.cuda.current_stream().wait_stream(side)
    if ops_implementation("cuda") == "torch_shim":
        # The first call on the device may take the Python path (it creates the device's metadata
        # error word); the second ran the C++ kernels.
        assert _torch_shim.counts()[0] > native_before
    else:
        assert len(rfa_ops._FWD_PLANS) >= 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in leaves:
            t.normal_()
    graph.replay()
    torch.cuda.synchronize()
    fresh = step()
    for a, b in zip(captured, fresh):
        assert not torch.isnan(a).any()
        assert torch.equal(a, b), "graph replay differs from an eager call on the same inputs"


def test_tier_set_at_run_time_after_cached_calls(monkeypatch):
    rfa_ops.clear_plan_caches()
    q_list, k, v, cu_q, cu_k = _inputs(37)

    def call():
        return grouped_flash_attn_varlen_func(q_list, k, v, cu_q, cu_k, [100, 60], 160)

    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "auto")
    auto = call()
    call()
    plans = len(rfa_ops._FWD_PLANS)
    native = _torch_shim.counts()[0]
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm80")
    tier1 = call()
    if ops_implementation("cuda") == "torch_shim":
        assert _torch_shim.counts()[0] == native + 1  # the C++ kernel read the tier itself
    else:
        assert len(rfa_ops._FWD_PLANS) == plans + 1  # the tier is part of the key
    for a, b in zip(auto, tier1):
        assert (a.float() - b.float()).abs().max().item() < 2e-2
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm75")
    with pytest.raises(ValueError, match="RING_FLASH_ATTN_TIER"):
        call()
