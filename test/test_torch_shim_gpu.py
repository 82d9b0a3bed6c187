"""libringattn_torch's C++ kernels on a GPU (marker ``gpu``; the CPU side is test_torch_shim_cpu.py).

What only a GPU shows: the C++ kernels find the current CUDA stream themselves (a side stream, a
CUDA graph captured through torch.ops), take over from the Python path once the device's
metadata error word exists, report malformed metadata into that word, read
RING_FLASH_ATTN_TIER / RING_FLASH_ATTN_CHECK_METADATA at every call, and compute the same bits as
the Python kernels.
"""

from __future__ import annotations

import re

import pytest
import torch

from cases import cu_seqlens
from ring_flash_attn import _lib, _torch_shim, check_errors, ops_implementation
from ring_flash_attn import ops as rfa_ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ops_implementation("cuda") != "torch_shim",
                       reason="the ops use the Python kernels (test_torch_shim_cpu.py checks which is active)"),
]


def _counted(fn):
    before = _torch_shim.counts()
    result = fn()
    after = _torch_shim.counts()
    return result, (after[0] - before[0], after[1] - before[1])


def _args(seed: int, dtype=torch.bfloat16, deterministic=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)

    q_list = [randn(300, 8, 128), randn(200, 8, 128)]
    k, v = randn(512, 2, 128), randn(512, 2, 128)
    cu_q = [cu_seqlens([200, 100], "cuda"), cu_seqlens([120, 80], "cuda")]
    cu_k = cu_seqlens([300, 212], "cuda")
    return (q_list, k, v, cu_q, cu_k, [None, None], [200, 120], 300, 0.0, True, deterministic)


def _warm_up():
    """One call on the device, so that its metadata error word exists (the first call on a device
    takes the Python path, which creates the word and hands it to the C++ kernels)."""
    rfa_ops.grouped_fwd(*_args(0))


@pytest.mark.parametrize("deterministic", [False, True])
def test_cpp_kernels_run_and_match_the_python_kernels(deterministic):
    _warm_up()
    args = _args(1, deterministic=deterministic)
    (outs, lses), calls = _counted(lambda: rfa_ops.grouped_fwd(*args))
    assert calls == (1, 0)
    expected_outs, expected_lses = rfa_ops._grouped_fwd_kernel(*args)
    douts = [torch.randn_like(o) for o in outs]
    bwd_args = (douts, args[0], args[1], args[2], outs, lses, *args[3:])
    grads, calls = _counted(lambda: rfa_ops.grouped_bwd(*bwd_args))
    assert calls == (1, 0)
    expected_grads = rfa_ops._grouped_bwd_kernel(*bwd_args)
    for a, b in zip([*outs, *lses], [*expected_outs, *expected_lses]):
        assert not a.isnan().any() and torch.equal(a, b)
    for a, b in zip([*grads[0], grads[1], grads[2]], [*expected_grads[0], expected_grads[1], expected_grads[2]]):
        assert not a.isnan().any()
        if deterministic:
            assert torch.equal(a, b)
        else:  # tier 2 adds dQ with TMA reduce-add, whose order is not fixed
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_side_stream_and_graph_capture_through_torch_ops():
    _warm_up()
    args = _args(2, deterministic=True)
    expected_outs, _ = rfa_ops._grouped_fwd_kernel(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The side stream writes the queries late: a kernel launched on any other stream would read
        # them before they are written.
        late_q = [torch.empty_like(q) for q in args[0]]
        torch.cuda._sleep(50_000_000)
        for dst, src in zip(late_q, args[0]):
            dst.copy_(src)
        (outs, _), calls = _counted(lambda: rfa_ops.grouped_fwd(late_q, *args[1:]))
    torch.cuda.current_stream().wait_stream(side)
    assert calls == (1, 0)
    for a, b in zip(outs, expected_outs):
        assert torch.equal(a, b)

    static_q = [q.clone() for q in args[0]]
    graph_args = (static_q, *args[1:])
    with torch.cuda.stream(side):
        rfa_ops.grouped_fwd(*graph_args)  # warm-up on the capturing stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = rfa_ops.grouped_fwd(*graph_args)
    new_q = [torch.randn_like(q) for q in static_q]
    for dst, src in zip(static_q, new_q):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    fresh, _ = rfa_ops._grouped_fwd_kernel(new_q, *args[1:])
    for a, b in zip(captured, fresh):
        assert torch.equal(a, b)


def test_malformed_metadata_is_reported_by_a_cpp_call(monkeypatch):
    monkeypatch.delenv("RING_FLASH_ATTN_CHECK_METADATA", raising=False)
    _warm_up()
    try:
        check_errors()
    except RuntimeError:
        pass  # left by an earlier test
    args = list(_args(3))
    args[3] = [args[3][0], torch.tensor([0, 150, 90], dtype=torch.int32, device="cuda")]  # decreasing
    _, calls = _counted(lambda: rfa_ops.grouped_fwd(*args))
    assert calls == (1, 0)
    with pytest.raises(RuntimeError, match=re.escape(_lib.describe_metadata_errors(_lib.METADATA_CU_SEQLENS_Q_DECREASING))):
        check_errors()
    # With the host check on, the same call is refused with the Python path's ValueError.
    monkeypatch.setenv("RING_FLASH_ATTN_CHECK_METADATA", "1")
    error, calls = _counted(lambda: pytest.raises(ValueError, rfa_ops.grouped_fwd, *args))
    assert calls == (0, 1) and "cu_seqlens_q_list[1]" in str(error.value)


def test_tier_settings_are_read_at_every_call(monkeypatch):
    _warm_up()
    args = _args(4)
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", " SM80 ")  # Python's spelling rules: blanks, case
    (sm80, _), calls = _counted(lambda: rfa_ops.grouped_fwd(*args))
    assert calls == (1, 0)
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm80")
    expected, _ = rfa_ops._grouped_fwd_kernel(*args)
    for a, b in zip(sm80, expected):
        assert torch.equal(a, b)
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", "sm75")
    error, calls = _counted(lambda: pytest.raises(ValueError, rfa_ops.grouped_fwd, *args))
    assert calls == (0, 1) and "RING_FLASH_ATTN_TIER" in str(error.value)
