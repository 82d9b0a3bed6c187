"""``ring_flash_attn.check_errors`` without a GPU: the API surface, the decoding of the error bits
into the library's phrases, the message, the read-and-clear of a word, and the all-clear path of
CPU calls (which validate metadata values themselves and raise at the call).

The GPU side (the kernels setting the bits) is test/test_metadata_errors_gpu.py.
"""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

import ring_flash_attn
from ring_flash_attn import _lib, _metadata_errors, check_errors, flash_attn_varlen_func, ops

# bit -> how the library's phrase for it starts
PHRASES = {
    _lib.METADATA_CU_SEQLENS_Q_FIRST: "cu_seqlens_q[0] of some group is not 0",
    _lib.METADATA_CU_SEQLENS_Q_DECREASING: "cu_seqlens_q of some group decreases",
    _lib.METADATA_CU_SEQLENS_Q_PAST_END: "cu_seqlens_q[batch_size] of some group exceeds",
    _lib.METADATA_CU_SEQLENS_K_FIRST: "cu_seqlens_k[0] is not 0",
    _lib.METADATA_CU_SEQLENS_K_DECREASING: "cu_seqlens_k decreases",
    _lib.METADATA_CU_SEQLENS_K_PAST_END: "cu_seqlens_k[batch_size] exceeds",
    _lib.METADATA_SEQUSED_K_RANGE: "seqused_k of some group is negative or exceeds",
}


@pytest.fixture
def fake_word(monkeypatch):
    """An error word on the CPU registered as device 0's, as a GPU call would leave it."""
    word = torch.zeros(1, dtype=torch.int32)
    monkeypatch.setattr(_metadata_errors, "_words", {0: word})
    monkeypatch.setattr(_metadata_errors, "_pointers", {0: word.data_ptr()})
    return word


def test_check_errors_is_public_and_typed():
    assert "check_errors" in ring_flash_attn.__all__
    assert ring_flash_attn.check_errors is check_errors
    sig = inspect.signature(check_errors)
    assert list(sig.parameters) == ["device"] and sig.parameters["device"].default is None
    hints = typing.get_type_hints(check_errors)
    assert hints["return"] is type(None)
    assert set(typing.get_args(hints["device"])) == {torch.device, str, int, type(None)}
    doc = inspect.getdoc(check_errors)
    assert "RING_FLASH_ATTN_CHECK_METADATA=1" in doc and "RuntimeError" in doc and "CPU" in doc


def test_each_bit_decodes_to_its_own_phrase():
    assert sum(PHRASES) == _lib.METADATA_ALL_ERRORS
    kinds = {}
    for bit, start in PHRASES.items():
        (kind,) = _metadata_errors.error_kinds(bit)
        assert kind.startswith(start), (bit, kind)
        assert kind == _lib.describe_metadata_errors(bit)
        kinds[bit] = kind
    assert len(set(kinds.values())) == len(PHRASES)
    both = _lib.METADATA_SEQUSED_K_RANGE | _lib.METADATA_CU_SEQLENS_Q_DECREASING
    assert _metadata_errors.error_kinds(both) == [kinds[_lib.METADATA_CU_SEQLENS_Q_DECREASING],
                                                  kinds[_lib.METADATA_SEQUSED_K_RANGE]]
    assert _lib.describe_metadata_errors(both) == "; ".join(_metadata_errors.error_kinds(both))
    # Bits the library does not define are named, never dropped (bit 31 as a negative int32 too).
    assert _metadata_errors.error_kinds(1 << 9) == ["unknown bits 0x200"]
    assert _metadata_errors.error_kinds(-(2**31)) == ["unknown bits 0x80000000"]
    assert _metadata_errors.error_kinds(0) == []


def test_message_names_each_device_and_kind_and_the_check():
    msg = _metadata_errors.error_message({
        "cuda:0": _lib.METADATA_CU_SEQLENS_Q_DECREASING,
        "cuda:3": _lib.METADATA_CU_SEQLENS_K_PAST_END | _lib.METADATA_SEQUSED_K_RANGE,
    })
    lines = msg.splitlines()
    assert lines[1] == "  cuda:0: " + _lib.describe_metadata_errors(_lib.METADATA_CU_SEQLENS_Q_DECREASING)
    assert lines[2] == "  cuda:3: " + _lib.describe_metadata_errors(
        _lib.METADATA_CU_SEQLENS_K_PAST_END | _lib.METADATA_SEQUSED_K_RANGE)
    assert "RING_FLASH_ATTN_CHECK_METADATA=1" in lines[-1]


def test_check_errors_reads_raises_and_clears(fake_word):
    assert check_errors() is None
    fake_word.fill_(_lib.METADATA_CU_SEQLENS_Q_DECREASING | _lib.METADATA_CU_SEQLENS_K_PAST_END)
    with pytest.raises(RuntimeError) as info:
        check_errors()
    msg = str(info.value)
    assert "cuda:0: " + PHRASES[_lib.METADATA_CU_SEQLENS_Q_DECREASING] in msg
    assert PHRASES[_lib.METADATA_CU_SEQLENS_K_PAST_END] in msg
    for bit in (_lib.METADATA_CU_SEQLENS_Q_FIRST, _lib.METADATA_SEQUSED_K_RANGE, _lib.METADATA_CU_SEQLENS_K_FIRST):
        assert PHRASES[bit] not in msg
    assert int(fake_word.item()) == 0
    assert check_errors() is None  # cleared: nothing new since


def test_check_errors_device_argument(fake_word):
    fake_word.fill_(_lib.METADATA_SEQUSED_K_RANGE)
    # A CPU device, or a CUDA device without a word, has nothing to report; the word stays set.
    assert check_errors("cpu") is None
    assert check_errors(torch.device("cpu")) is None
    assert check_errors("cuda:5") is None
    assert check_errors(5) is None
    assert int(fake_word.item()) == _lib.METADATA_SEQUSED_K_RANGE
    with pytest.raises(RuntimeError, match="seqused_k of some group"):
        check_errors(torch.device("cuda", 0))
    fake_word.fill_(_lib.METADATA_CU_SEQLENS_K_FIRST)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_k\[0\] is not 0"):
        check_errors(0)
    for bad in ("meta", True, 1.5):
        with pytest.raises(ValueError, match="device: expected"):
            check_errors(bad)


def _varlen_inputs(cu_q, cu_k, total_q, total_k):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(total_q, 2, 32, generator=gen)
    k = torch.randn(total_k, 1, 32, generator=gen)
    v = torch.randn(total_k, 1, 32, generator=gen)
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    cu_k = torch.tensor(cu_k, dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def test_cpu_calls_validate_at_the_call_and_leave_nothing_to_check():
    # Well formed: runs, nothing recorded.
    q, k, v, cu_q, cu_k = _varlen_inputs([0, 5, 12], [0, 9, 16], 12, 16)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 9, causal=True)
    assert torch.isfinite(out).all()
    assert check_errors() is None
    assert check_errors("cpu") is None
    # Malformed (decreasing cu_seqlens_q, cu_seqlens_k past its tokens): a ValueError at the call,
    # naming the argument; still nothing for check_errors.
    q, k, v, cu_q, cu_k = _varlen_inputs([0, 9, 5], [0, 9, 16], 12, 16)
    with pytest.raises(ValueError, match=r"cu_seqlens_q.*\[2\].*expected >= .*\(9\)"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 9, causal=True)
    q, k, v, cu_q, cu_k = _varlen_inputs([0, 5, 12], [0, 9, 20], 12, 16)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[2\].*expected <= the number of tokens in the tensor \(16\), got 20"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 9, causal=True)
    assert check_errors() is None


def test_cpu_exec_passes_no_word():
    ex, check_metadata = ops._exec(torch.device("cpu"))
    assert not ex.metadata_errors  # NULL
    assert check_metadata == 1
