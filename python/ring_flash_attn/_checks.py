"""The check of flash-attn arguments supported only at their defaults, shared by the single-device
API (grouped.py) and the context-parallel schemes (whose other checks are ``cp/validation.py``)."""

from __future__ import annotations

import numbers


def check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap=0.0) -> None:
    """flash-attn arguments supported only at their defaults: NotImplementedError naming the first
    one that is not (in this order: dropout_p, window_size, softcap, alibi_slopes)."""
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: dropout is not supported (got {dropout_p}); pass 0.0")
    window = check_window_size(window_size)
    if window != (-1, -1):
        raise NotImplementedError(f"window_size: sliding-window attention is not supported yet "
                                  f"(got {window}); pass (-1, -1)")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap: logit soft-capping is not supported yet (got {softcap}); pass 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported; pass None")


def check_window_size(window_size) -> tuple:
    """window_size as flash-attn takes it: a (left, right) pair of ints, -1 meaning unbounded.
    Returns it as a tuple; ValueError naming window_size for anything else (an int, a string,
    a triple, floats)."""
    try:
        pair = tuple(window_size)
    except TypeError:
        pair = None
    if (pair is None or isinstance(window_size, (str, bytes)) or len(pair) != 2
            or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in pair)):
        raise ValueError(f"window_size: expected a (left, right) pair of ints (-1 for unbounded), "
                         f"got {window_size!r}")
    return tuple(int(x) for x in pair)
