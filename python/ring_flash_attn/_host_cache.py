"""Per-call host work kept small: per-shape call plans, environment settings, the eager gate.

A library call is described by C structs (``_lib.FwdParams`` / ``_lib.BwdParams`` and their
group arrays). Everything in them except the data pointers and the CUDA stream is fixed by the
call's *key*: the type, dtype, device, shape and strides of every tensor argument, the scalar
arguments, and the settings read from the environment. The ops (``ops.py``) build the structs
through the full validation on the first call with a key, keep them in a ``PlanCache`` under
that key, and on a later call with an equal key only write the new data pointers (and stream)
and call the library, which validates the structs again in C (pointer alignment, overlapping
outputs, metadata values on the CPU) at every call.

The cache holds no tensor (keys are tuples of types, dtypes, devices, sizes and ints; plans hold
ctypes structs and ints), is bounded (least recently used entries are evicted) and per thread
(a plan's structs are written at every call, so two threads never share one).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

import torch
import torch.autograd.forward_ad as _forward_ad

__all__ = ["PlanCache", "EnvSetting", "current_raw_stream", "eager_dispatch_ok", "clear_plan_caches"]

# Plans per cache and thread: a model has a few distinct attention shapes per step (one per layer
# kind and pass); a varlen workload whose lengths change every step misses anyway.
PLAN_CACHE_CAPACITY = 64

_epoch_lock = threading.Lock()
_epoch = 0  # bumped by clear_plan_caches(); a cache whose epoch differs empties itself


def clear_plan_caches() -> None:
    """Forget every cached call plan, in every thread (each thread's cache empties itself at its
    next lookup). Only needed when something a key does not describe changes the structs, e.g. a
    test that replaces ``ops._exec``."""
    global _epoch
    with _epoch_lock:
        _epoch += 1


class _ThreadPlans(threading.local):
    def __init__(self) -> None:
        self.entries: "OrderedDict[Hashable, Any]" = OrderedDict()
        self.epoch = _epoch


class PlanCache:
    """A bounded least-recently-used map key -> plan, one per thread."""

    def __init__(self, capacity: int = PLAN_CACHE_CAPACITY) -> None:
        self.capacity = capacity
        self._local = _ThreadPlans()

    def _entries(self) -> "OrderedDict[Hashable, Any]":
        local = self._local
        if local.epoch != _epoch:
            local.entries.clear()
            local.epoch = _epoch
        return local.entries

    def get(self, key: Hashable) -> Optional[Any]:
        entries = self._entries()
        plan = entries.get(key)
        if plan is not None:
            entries.move_to_end(key)
        return plan

    def put(self, key: Hashable, plan: Any) -> None:
        entries = self._entries()
        entries[key] = plan
        entries.move_to_end(key)
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries())

    def clear(self) -> None:
        """Empties this thread's cache."""
        self._entries().clear()


_UNSET = object()


class EnvSetting:
    """An environment variable read at every call, cheaply: a lookup in ``os.environ``'s own
    dict (``os.environ.get`` costs about 1 us), the parsed value kept until the raw string
    changes. Reads what ``os.environ`` holds, like ``os.environ.get`` (so ``monkeypatch.setenv``
    and ``os.environ[...] = ...`` take effect at the next call). ``parse(raw or None)`` may raise;
    a value that does not parse is never kept."""

    __slots__ = ("name", "_key", "_parse", "_last")

    def __init__(self, name: str, parse: Callable[[Optional[str]], Any]) -> None:
        self.name = name
        encodekey = getattr(os.environ, "encodekey", None)
        self._key = encodekey(name) if encodekey is not None else name
        self._parse = parse
        self._last = (_UNSET, None)  # (raw value, parsed value), replaced as one object

    def get(self) -> Any:
        try:
            raw = os.environ._data.get(self._key)  # type: ignore[attr-defined]
        except AttributeError:  # os.environ replaced by a plain mapping
            raw = os.environ.get(self.name)
        last = self._last
        if raw is last[0] or raw == last[0]:
            return last[1]
        text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        value = self._parse(text)
        self._last = (raw, value)
        return value


def _current_raw_stream_fallback(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


# The current CUDA stream of a device as an int (cudaStream_t), without building a torch.cuda.Stream.
current_raw_stream: Callable[[int], int] = getattr(torch._C, "_cuda_getCurrentRawStream",
                                                   _current_raw_stream_fallback)

_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_tracing_state = torch._C._get_tracing_state
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_profiler_enabled = torch._C._autograd._profiler_enabled


def eager_dispatch_ok() -> bool:
    """True when a call may skip PyTorch's dispatcher: nothing would see the custom op other than
    its kernel. False under torch.compile / torch.export tracing, torch.jit tracing, a
    TorchFunctionMode or TorchDispatchMode (FakeTensorMode, make_fx, FlopCounterMode, ...),
    torch.func transforms, forward-mode AD and the autograd profiler (which records the op by
    name): there the ops go through ``torch.ops`` as before. The caller also checks that every
    tensor argument is a plain ``torch.Tensor`` (or ``nn.Parameter``), not a subclass."""
    return not (torch.compiler.is_compiling() or _dispatch_stack_len() or _function_mode_enabled()
                or _tracing_state() is not None or _functorch_active() or _profiler_enabled()
                or _forward_ad._current_level >= 0)
