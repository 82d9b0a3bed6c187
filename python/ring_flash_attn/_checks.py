"""The check of flash-attn arguments supported only at their defaults, shared by the single-device
API (grouped.py) and the context-parallel schemes (whose other checks are ``cp/validation.py``)."""

from __future__ import annotations


def check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap=0.0) -> None:
    """flash-attn arguments supported only at their defaults: NotImplementedError naming the first
    one that is not (in this order: dropout_p, window_size, softcap, alibi_slopes)."""
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: dropout is not supported (got {dropout_p}); pass 0.0")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"window_size: sliding-window attention is not supported yet "
                                  f"(got {tuple(window_size)}); pass (-1, -1)")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap: logit soft-capping is not supported yet (got {softcap}); pass 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported; pass None")
