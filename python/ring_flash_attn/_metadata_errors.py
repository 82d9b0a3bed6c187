"""Malformed sequence metadata on the GPU, reported without a host sync (``check_errors``).

GPU calls do not read ``cu_seqlens`` / ``seqused_k`` values on the host unless
``RING_FLASH_ATTN_CHECK_METADATA=1`` asks for it (that check copies them and synchronises). Without
it the kernels clamp every sequence to its tensor: malformed values give wrong outputs and
gradients for the sequences concerned, but no memory outside the tensors is touched. To make
them visible anyway, every GPU call of the package passes the library an error word of its
device (``ringattn_exec.metadata_errors``): one int32 tensor per device, allocated on the first
call there. The library's work-list kernels, which read every one of these values, OR one bit per
kind of error into it (``ringattn_metadata_error`` in ``ringattn.h``): the same conditions that
the host check rejects. ``check_errors()`` reads and clears the words when the caller chooses.

CUDA graphs: a captured call keeps the word's address, so replays report into it like eager
calls. The word is allocated outside any capture; a call captured on a device where no call ran
before has no word to report into (it passes NULL and warns once): run one call on the device
before capturing (the warm-up iterations that capture needs anyway do this).
"""

from __future__ import annotations

import threading
import warnings
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

from . import _lib

__all__ = ["check_errors"]

ENV_CHECK_METADATA = "RING_FLASH_ATTN_CHECK_METADATA"

_lock = threading.Lock()
_words: Dict[int, Tensor] = {}  # CUDA device index -> int32 [1], the error word of that device
_pointers: Dict[int, int] = {}  # CUDA device index -> data pointer of its word (per-call fast path)
_warned_capture = False


def word_pointer(device_index: int) -> Optional[int]:
    """The address of the error word of CUDA device ``device_index`` for a call's
    ``ringattn_exec.metadata_errors``; allocates the word (zeroed, on the device's current stream)
    on the first call. None (NULL: no report) when the first call is being captured into a CUDA
    graph (see the module docstring)."""
    pointer = _pointers.get(device_index)
    if pointer is not None:
        return pointer
    with torch.cuda.device(device_index):
        capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        _warn_capture(device_index)
        return None
    with _lock:
        if device_index not in _pointers:
            word = torch.zeros(1, dtype=torch.int32, device=torch.device("cuda", device_index))
            _words[device_index] = word
            _pointers[device_index] = word.data_ptr()
        return _pointers[device_index]


def _warn_capture(device_index: int) -> None:
    global _warned_capture
    if _warned_capture:
        return
    _warned_capture = True
    warnings.warn(
        f"ring_flash_attn: the first call on cuda:{device_index} is being captured into a CUDA graph, "
        "so it has no metadata error word yet: the captured calls will not report malformed "
        "cu_seqlens / seqused_k to ring_flash_attn.check_errors(). Run one call on the device before "
        "capturing to enable the report.",
        RuntimeWarning,
        stacklevel=4,
    )


def error_kinds(bits: int) -> List[str]:
    """What each set bit of an error word means, in bit order (the library's phrases)."""
    bits = int(bits) & 0xFFFFFFFF
    return [_lib.describe_metadata_errors(1 << bit) for bit in range(32) if bits >> bit & 1]


def error_message(found: Dict[str, int]) -> str:
    """The RuntimeError message of ``check_errors`` for the non-zero words ``found`` (device name
    -> bits)."""
    lines = [
        "ring_flash_attn: GPU attention calls since the last check_errors() were given malformed "
        "sequence metadata (cu_seqlens / seqused_k as the kernels received them); their outputs and "
        "gradients are wrong for the sequences concerned:"
    ]
    for device, bits in found.items():
        lines.append(f"  {device}: " + "; ".join(error_kinds(bits)))
    lines.append(
        f"Set {ENV_CHECK_METADATA}=1 to find which call and argument: every call then checks these "
        "values on the host before it runs (it synchronises) and raises a ValueError naming the "
        "argument, with the expected and the actual value."
    )
    return "\n".join(lines)


def _read_and_clear(word: Tensor) -> int:
    """The bits of ``word`` after all work queued on its device, which is then zeroed."""
    if word.is_cuda:
        torch.cuda.synchronize(word.device)
    snapshot = word.clone()
    word.zero_()
    return int(snapshot.item()) & 0xFFFFFFFF


def _device_indices(device: Union[torch.device, str, int, None]) -> List[int]:
    if device is None:
        return sorted(_words)
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise ValueError(f"device: expected None, a torch.device, a device string or a CUDA index, got {device!r}")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cpu":
        return []
    if dev.type != "cuda":
        raise ValueError(f"device: expected a CUDA or CPU device (or None for every device), got {dev}")
    if not _words:  # no GPU call yet (and CUDA perhaps not even initialised)
        return []
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return [index] if index in _words else []


def check_errors(device: Union[torch.device, str, int, None] = None) -> None:
    """Raise if GPU calls since the last check were given malformed sequence metadata.

    Without ``RING_FLASH_ATTN_CHECK_METADATA=1``, GPU calls never read ``cu_seqlens_q``,
    ``cu_seqlens_k`` or ``seqused_k`` values on the host (no sync): malformed ones (a first entry
    other than 0, a decrease, a last entry past the tensor's tokens, a ``seqused_k`` entry below 0
    or above its sequence's keys) give wrong outputs and gradients for the sequences concerned,
    without touching memory outside the tensors. The kernels record each kind of error in a small
    per-device error word; this function reads it, clears it, and raises if anything was recorded.
    Call it where a sync costs little (every N steps, at a checkpoint, in a test).

    Args:
        device: the CUDA device to check (``torch.device``, ``"cuda:1"``, ``1``; ``"cuda"`` is the
            current device), or None for every device this process has run calls on. A CPU device
            has nothing to check: CPU calls always validate the values and raise ValueError at the
            call.

    Returns:
        None when no error was recorded.

    Raises:
        RuntimeError: naming each device and each kind of error recorded since the last check
            (e.g. "cu_seqlens_q of some group decreases"), and how to find the call
            (``RING_FLASH_ATTN_CHECK_METADATA=1``). The words are cleared first, so a second call
            returns None unless new errors were recorded.
        ValueError: ``device`` is neither None, a CPU device nor a CUDA device.

    Synchronises the devices it checks (``torch.cuda.synchronize``), so that calls issued on any
    stream before it are included. Calls running concurrently on another thread may report to
    the next check.
    """
    found = {}
    for index in _device_indices(device):
        bits = _read_and_clear(_words[index])
        if bits:
            found[f"cuda:{index}"] = bits
    if found:
        raise RuntimeError(error_message(found))
    return None
