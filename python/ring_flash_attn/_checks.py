"""Checks of flash-attn arguments shared by the single-device API (grouped.py) and the
context-parallel schemes (whose other checks are ``cp/validation.py``)."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

from . import _lib

NO_WINDOW = (-1, -1)


def check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap=0.0,
                              causal: Optional[bool] = None) -> Tuple[Tuple[int, int], float]:
    """flash-attn arguments: NotImplementedError naming the first one that is not supported
    (dropout_p, then alibi_slopes); ValueError for a malformed window_size or softcap. Returns
    ``(window_size, softcap)`` validated. ``causal``: when given, a window reaching right of the
    diagonal is refused with it (see check_window_size)."""
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: dropout is not supported (got {dropout_p}); pass 0.0")
    window = check_window_size(window_size, causal)
    cap = check_softcap(softcap)
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported; pass None")
    return window, cap


def check_window_size(window_size, causal: Optional[bool] = None) -> Tuple[int, int]:
    """window_size as flash-attn takes it: a (left, right) pair of ints, each -1 (unbounded) or
    >= 0. Returns it as a tuple of ints; ValueError naming window_size for anything else (an int,
    a string, a triple, floats, -2). With ``causal`` True the right side must be -1 or 0: causal
    already bounds it at the diagonal, and a window reaching further right would contradict it."""
    try:
        pair = tuple(window_size)
    except TypeError:
        pair = None
    if (pair is None or isinstance(window_size, (str, bytes)) or len(pair) != 2
            or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in pair)):
        raise ValueError(f"window_size: expected a (left, right) pair of ints (-1 for unbounded), "
                         f"got {window_size!r}")
    left, right = int(pair[0]), int(pair[1])
    if left < -1 or right < -1:
        raise ValueError(f"window_size: expected each side -1 (unbounded) or >= 0, got {(left, right)}")
    if causal and right > 0:
        raise ValueError(f"window_size: expected a right side of -1 or 0 with causal=True (causal means no key "
                         f"right of the diagonal), got {(left, right)}")
    return left, right


def check_softcap(softcap) -> float:
    """softcap as flash-attn takes it: a real number >= 0, 0 meaning off, whose float32 value (the
    kernels' field) is 0 or a finite normal number. Returns it as a float; ValueError naming
    softcap for anything else (negative, NaN, inf, a bool, a string, 1e-45 or 1e39: float32
    subnormal or infinite)."""
    if isinstance(softcap, (bool, str, bytes)) or not isinstance(softcap, numbers.Real):
        raise ValueError(f"softcap: expected a float >= 0 (0 = off), got {softcap!r}")
    value = float(softcap)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"softcap: expected a finite float >= 0 (0 = off), got {softcap!r}")
    if value != 0.0 and not 2e-38 <= value <= 3e38:  # else float32 rounds it to a normal number
        _lib.float32_scale(value, "softcap")  # raises unless its float32 value is normal, naming softcap
    return value
