"""The attention features a context-parallel scheme hands on to the attention it runs (softcap,
attention sinks; window_size is a parameter of every attention function and is always handed
on): the softcap checked here (the sinks by ``sinks.check_sinks``, which every scheme shares),
passed as keyword arguments only when set, so that an attention function that does not take a
feature yet refuses it with a clear error instead of a TypeError."""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional

from torch import Tensor

from .. import _checks

__all__ = ["accepts_keyword", "check_softcap", "feature_kwargs"]


def accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (a named parameter or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_softcap(softcap) -> float:
    """softcap is a finite real >= 0 (0: off) whose float32 value is 0 or normal, the kernels'
    rule (``_checks.check_softcap``, shared with the single-device functions); returns it as a
    float. Checked before any communication: the kernels would refuse it after."""
    return _checks.check_softcap(softcap)


def feature_kwargs(fn: Callable, fn_name: str, softcap: float, sinks: Optional[Tensor]) -> Dict[str, object]:
    """The keyword arguments of the features that are set (``softcap`` != 0, ``sinks`` given) for
    the attention function ``fn`` (named ``fn_name`` in errors). NotImplementedError naming the
    feature when ``fn`` does not take it. The sinks entry is a placeholder (True): the caller
    passes each call's slice of the sinks."""
    kwargs: Dict[str, object] = {}
    if softcap != 0.0:
        if not accepts_keyword(fn, "softcap"):
            raise NotImplementedError(f"softcap: {fn_name} does not take logit soft-capping in this build "
                                      f"(got {softcap}); pass 0.0")
        kwargs["softcap"] = softcap
    if sinks is not None:
        if not accepts_keyword(fn, "sinks"):
            raise NotImplementedError(f"sinks: {fn_name} does not take attention sinks in this build; pass None")
        kwargs["sinks"] = True
    return kwargs
