"""Malformed sequence metadata on the GPU without metadata checks (marker ``gpu``).

With ``RING_FLASH_ATTN_CHECK_METADATA`` unset, GPU calls never read cu_seqlens / seqused_k on the
host; the work-list kernels record each kind of malformed value in the device's error word and
``ring_flash_attn.check_errors()`` raises naming exactly those kinds (then the word is clear).
Each case runs on both kernel tiers (``RING_FLASH_ATTN_TIER`` auto and sm80), forward and
backward separately. Small shapes: the file takes seconds.
"""

from __future__ import annotations

import pytest
import torch

from ring_flash_attn import _lib, _metadata_errors, _torch_shim, check_errors, flash_attn_varlen_func, grouped_flash_attn_varlen_func

pytestmark = pytest.mark.gpu

BITS = [
    _lib.METADATA_CU_SEQLENS_Q_FIRST,
    _lib.METADATA_CU_SEQLENS_Q_DECREASING,
    _lib.METADATA_CU_SEQLENS_Q_PAST_END,
    _lib.METADATA_CU_SEQLENS_K_FIRST,
    _lib.METADATA_CU_SEQLENS_K_DECREASING,
    _lib.METADATA_CU_SEQLENS_K_PAST_END,
    _lib.METADATA_SEQUSED_K_RANGE,
]
HQ, HK, D = 2, 1, 64
DTYPE = torch.bfloat16


@pytest.fixture(autouse=True)
def no_host_checks(monkeypatch):
    """Metadata checks off (the default hot path) and a clear word at the start of each test."""
    monkeypatch.delenv("RING_FLASH_ATTN_CHECK_METADATA", raising=False)
    try:
        check_errors()
    except RuntimeError:
        pass  # left by an earlier test of the session


@pytest.fixture(params=["auto", "sm80"])
def tier(request, monkeypatch):
    monkeypatch.setenv("RING_FLASH_ATTN_TIER", request.param)
    return request.param


def _cu(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def _qkv(total_q: int, total_k: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(total_q, HQ, D, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    k = torch.randn(total_k, HK, D, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    v = torch.randn(total_k, HK, D, device="cuda", dtype=DTYPE, generator=gen).requires_grad_()
    return q, k, v


def _assert_reports(expected_bits: int) -> None:
    """check_errors() raises naming exactly the kinds of ``expected_bits``, then the word is clear."""
    with pytest.raises(RuntimeError) as info:
        check_errors()
    msg = str(info.value)
    for bit in BITS:
        phrase = _lib.describe_metadata_errors(bit)
        assert (phrase in msg) == bool(expected_bits & bit), f"{phrase!r} expected {bool(expected_bits & bit)} in:\n{msg}"
    assert "cuda:" in msg and "RING_FLASH_ATTN_CHECK_METADATA=1" in msg
    assert check_errors() is None


def _forward_then_backward(expected_bits: int, run_forward) -> None:
    """The forward reports ``expected_bits``; after the check, its backward reports them again."""
    out = run_forward()
    if expected_bits:
        _assert_reports(expected_bits)
    else:
        assert check_errors() is None
    out.backward(torch.randn_like(out))
    if expected_bits:
        _assert_reports(expected_bits)
    else:
        assert check_errors() is None


def _varlen(cu_q, cu_k, total_q=64, total_k=64, seed=0):
    """A flash_attn_varlen_func call, its tensors made up front (host-to-device copies sync)."""
    q, k, v = _qkv(total_q, total_k, seed)
    cu_q, cu_k = _cu(cu_q), _cu(cu_k)
    return lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 40, causal=True)


def test_well_formed_calls_leave_the_word_clear(tier):
    _forward_then_backward(0, _varlen([0, 20, 40, 64], [0, 24, 40, 64]))
    # Empty sequences and sequences short of the tensors' ends are well formed.
    _forward_then_backward(0, _varlen([0, 0, 30, 50], [0, 24, 24, 60]))
    assert check_errors(torch.device("cuda")) is None
    assert check_errors(torch.cuda.current_device()) is None


def test_non_monotonic_cu_seqlens_q(tier):
    _forward_then_backward(_lib.METADATA_CU_SEQLENS_Q_DECREASING, _varlen([0, 40, 30, 64], [0, 24, 40, 64]))
    # A negative entry inside is a decrease too.
    _forward_then_backward(_lib.METADATA_CU_SEQLENS_Q_DECREASING, _varlen([0, -5, 30, 64], [0, 24, 40, 64]))


def test_first_entry_not_zero(tier):
    _forward_then_backward(_lib.METADATA_CU_SEQLENS_Q_FIRST, _varlen([3, 20, 40, 64], [0, 24, 40, 64]))
    _forward_then_backward(_lib.METADATA_CU_SEQLENS_K_FIRST, _varlen([0, 20, 40, 64], [2, 24, 40, 64]))


def test_cu_seqlens_past_the_tokens(tier):
    _forward_then_backward(_lib.METADATA_CU_SEQLENS_K_PAST_END, _varlen([0, 20, 40, 64], [0, 24, 40, 80]))
    _forward_then_backward(_lib.METADATA_CU_SEQLENS_Q_PAST_END, _varlen([0, 20, 40, 65], [0, 24, 40, 64]))


def test_cu_seqlens_k_decreasing(tier):
    _forward_then_backward(_lib.METADATA_CU_SEQLENS_K_DECREASING, _varlen([0, 20, 40, 64], [0, 30, 24, 64]))


def _grouped(seqused_1, seed=1):
    """Two groups over keys of lengths [32, 32]; group 1 sees seqused_1 keys of each sequence."""
    q0, k, v = _qkv(48, 64, seed)
    q1 = _qkv(40, 1, seed + 100)[0]
    cu_q, cu_k = [_cu([0, 24, 48]), _cu([0, 16, 40])], _cu([0, 32, 64])
    used = [None, _cu(seqused_1)]

    def run():
        outs = grouped_flash_attn_varlen_func([q0, q1], k, v, cu_q, cu_k, [24, 24], 32,
                                              seqused_k_list=used, causal=True)
        return torch.cat(outs)

    return run


def test_seqused_k_out_of_range(tier):
    _forward_then_backward(0, _grouped([32, 7]))
    _forward_then_backward(_lib.METADATA_SEQUSED_K_RANGE, _grouped([33, 7]))
    _forward_then_backward(_lib.METADATA_SEQUSED_K_RANGE, _grouped([12, -1]))


def test_kinds_accumulate_until_checked():
    with torch.no_grad():
        _varlen([0, 40, 30, 64], [0, 24, 40, 64])()
        _varlen([0, 20, 40, 64], [0, 24, 40, 64])()  # well formed: adds nothing, clears nothing
        _grouped([33, 7])()
    _assert_reports(_lib.METADATA_CU_SEQLENS_Q_DECREASING | _lib.METADATA_SEQUSED_K_RANGE)


def test_reporting_needs_no_host_sync():
    _varlen([0, 20, 40, 64], [0, 24, 40, 64])()  # the device's word exists from here on
    assert check_errors() is None
    run = _varlen([0, 40, 30, 64], [0, 24, 40, 80])
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run()
        out.backward(torch.randn_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_reports(_lib.METADATA_CU_SEQLENS_Q_DECREASING | _lib.METADATA_CU_SEQLENS_K_PAST_END)


def test_host_check_names_the_argument_instead(monkeypatch):
    monkeypatch.setenv("RING_FLASH_ATTN_CHECK_METADATA", "1")
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[2\].*expected >= cu_seqlens_q\[1\] \(40\).*got 30"):
        _varlen([0, 40, 30, 64], [0, 24, 40, 64])()
    assert check_errors() is None


def test_cuda_graph_replays_report():
    q, k, v = (t.detach() for t in _qkv(64, 64, 3))
    good, bad = _cu([0, 20, 40, 64]), _cu([0, 40, 30, 64])
    cu_q, cu_k = good.clone(), _cu([0, 24, 40, 64])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocates the word outside the capture)
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 24, 24, causal=True)
    torch.cuda.current_stream().wait_stream(side)
    assert check_errors() is None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 24, 24, causal=True)
    graph.replay()
    assert check_errors() is None
    cu_q.copy_(bad)
    graph.replay()
    _assert_reports(_lib.METADATA_CU_SEQLENS_Q_DECREASING)
    cu_q.copy_(good)
    graph.replay()
    assert check_errors() is None


def test_first_call_inside_a_capture_warns_and_passes_no_word(monkeypatch):
    q, k, v = (t.detach() for t in _qkv(64, 64, 4))
    cu_q, cu_k = _cu([0, 40, 30, 64]), _cu([0, 24, 40, 64])
    flash_attn_varlen_func(q, k, v, cu_k, cu_k, 40, 40, causal=True)  # warm-up, well formed
    assert check_errors() is None
    # As if no call had run on the device yet (monkeypatch restores the real word afterwards),
    # in the C++ op kernels too when they serve CUDA (RING_FLASH_ATTN_TORCH_SHIM=1): they hold
    # the word the Python path handed them, and take the Python path while they have none.
    index = q.device.index
    real_pointer = _metadata_errors._pointers[index]
    shim = _torch_shim._shim if _torch_shim._cuda_registered else None
    monkeypatch.setattr(_metadata_errors, "_words", {})
    monkeypatch.setattr(_metadata_errors, "_pointers", {})
    monkeypatch.setattr(_metadata_errors, "_warned_capture", False)
    if shim is not None:
        monkeypatch.setattr(_torch_shim, "_shared_words", {})
        assert shim.ringattn_torch_shim_set_metadata_error_word(index, None) == 0
    try:
        graph = torch.cuda.CUDAGraph()
        with pytest.warns(RuntimeWarning, match="being captured into a CUDA graph"):
            with torch.cuda.graph(graph):
                flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 40, causal=True)
        graph.replay()
        torch.cuda.synchronize()
        assert _metadata_errors._words == {}
        assert check_errors() is None
    finally:
        if shim is not None:  # the C++ kernels get the real word back
            shim.ringattn_torch_shim_set_metadata_error_word(index, real_pointer)


# ---- work lists whose sums pass 2^32 (64-bit prefix sums, saturated offsets) ---------------------
# Malformed, overlapping cu_seqlens [0, T, 0, T, ..., T]: every other sequence spans the whole
# tensor (the others are empty once clamped), 2^20 of them of T = 2^20 tokens, so the tiles or key
# blocks add up to 2^33-2^34 (tiles of 64-128 rows, blocks of 64-128 keys): an int32 sum wraps to
# exactly 0 (an empty list) through negative offsets (items written out of bounds). The work list
# keeps the items below its capacity (what well-formed metadata could need): those are the first
# sequences', which cover every row of the tensor. About 0.3 GB of tensors per test.
_BIG_TOKENS = 1 << 20
_BIG_FULL = 1 << 20


def _overlapping_cu(full: int, tokens: int) -> list:
    return [0] + [tokens, 0] * (full - 1) + [tokens]


def _poison(numel: int = 128 << 20) -> None:
    """NaN in the caching allocator's free blocks, so an output the kernels never write stays NaN."""
    blob = torch.full((numel,), float("nan"), dtype=torch.float32, device="cuda")
    del blob


def test_query_tile_list_past_2_to_the_32_tiles(tier):
    """Every row of q lies in sequence 0, which sees no key: O = 0 and LSE = -inf on every row
    (none left NaN), the decrease is reported, and a well-formed call after it is unharmed."""
    batch = 2 * _BIG_FULL - 1
    cu_q = _cu(_overlapping_cu(_BIG_FULL, _BIG_TOKENS))
    cu_k = _cu([0] * batch + [1])  # one key, in the last sequence (whose tiles lie past the capacity)
    q, k, v = (t.detach() for t in _qkv(_BIG_TOKENS, 1, 5))
    assert check_errors() is None
    _poison()
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, _BIG_TOKENS, 1, causal=False, return_attn_probs=True)
    torch.cuda.synchronize()
    _assert_reports(_lib.METADATA_CU_SEQLENS_Q_DECREASING)
    assert bool((out == 0).all()), "rows left unwritten (NaN) or wrong"
    assert bool(torch.isneginf(lse).all()), "LSE rows left unwritten (NaN) or wrong"
    del out, lse, q, k, v
    _forward_then_backward(0, _varlen([0, 20, 40, 64], [0, 24, 40, 64]))


def test_key_block_list_past_2_to_the_32_blocks(tier):
    """Every key row lies in sequence 0, whose blocks no query sees: the backward's dK/dV list keeps
    the blocks below its capacity, so dK = dV = 0 on every row (none left NaN)."""
    batch = 2 * _BIG_FULL - 1
    cu_k = _cu(_overlapping_cu(_BIG_FULL, _BIG_TOKENS))
    cu_q = _cu([0] * batch + [1])  # one query, in the last sequence
    q, k, v = _qkv(1, _BIG_TOKENS, 6)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, _BIG_TOKENS, causal=False)
    torch.cuda.synchronize()
    _assert_reports(_lib.METADATA_CU_SEQLENS_K_DECREASING)
    _poison()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    _assert_reports(_lib.METADATA_CU_SEQLENS_K_DECREASING)
    assert bool((dk == 0).all()) and bool((dv == 0).all()), "key rows left unwritten (NaN) or wrong"
    assert bool(torch.isfinite(dq).all())
    del out, dq, dk, dv, q, k, v
    _forward_then_backward(0, _varlen([0, 20, 40, 64], [0, 24, 40, 64]))
