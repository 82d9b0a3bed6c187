"""ctypes binding of ``libringattn`` (include/ringattn/ringattn.h).

The library is plain C: ``_abi`` mirrors every struct of the header field by field (same order,
same fixed-width types; generated from the header), and this module declares
``argtypes``/``restype`` once and loads the shared object lazily on first use, so
``import ring_flash_attn`` works (and ``torch.compile`` can trace the ops through their fake
kernels) on a machine where the library was not built.

Search order for the shared object:
  1. the path in the environment variable ``RING_FLASH_ATTN_LIBRARY``;
  2. ``libringattn.so`` next to this file (where ``pip install .`` puts it).
"""

from __future__ import annotations

import ctypes
import math
import numbers
import os
import threading
from pathlib import Path
from typing import Callable, List, Optional

# The ctypes mirrors of the header's structs, generated from it (scripts/dev/gen_abi_mirror.py).
from ._abi import KV, BwdGroup, BwdParams, Exec, FwdGroup, FwdParams, Problem  # noqa: F401 (re-exported)

# ---- constants (keep in step with ringattn.h) ------------------------------------------------

ABI_VERSION = 4
MAX_GROUPS = 16

INT32_MAX = 2**31 - 1
# The smallest positive normal and the largest finite float32.
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38

STATUS_OK = 0
STATUS_INVALID_ARGUMENT = 1
STATUS_UNSUPPORTED = 2
STATUS_CUDA_ERROR = 3
STATUS_INTERNAL_ERROR = 4

_STATUS_NAMES = {
    STATUS_OK: "OK",
    STATUS_INVALID_ARGUMENT: "INVALID_ARGUMENT",
    STATUS_UNSUPPORTED: "UNSUPPORTED",
    STATUS_CUDA_ERROR: "CUDA_ERROR",
    STATUS_INTERNAL_ERROR: "INTERNAL_ERROR",
}

DTYPE_FP32 = 0
DTYPE_FP16 = 1
DTYPE_BF16 = 2
DTYPE_FP64 = 3

DEVICE_CPU = 0
DEVICE_CUDA = 1

TIER_AUTO = 0
TIER_SM80 = 80
TIER_SM90 = 90

# ringattn_metadata_error: bits GPU calls set in *ringattn_exec.metadata_errors.
METADATA_CU_SEQLENS_Q_FIRST = 1 << 0
METADATA_CU_SEQLENS_Q_DECREASING = 1 << 1
METADATA_CU_SEQLENS_Q_PAST_END = 1 << 2
METADATA_CU_SEQLENS_K_FIRST = 1 << 3
METADATA_CU_SEQLENS_K_DECREASING = 1 << 4
METADATA_CU_SEQLENS_K_PAST_END = 1 << 5
METADATA_SEQUSED_K_RANGE = 1 << 6
METADATA_ALL_ERRORS = 0x7F

ENV_LIBRARY = "RING_FLASH_ATTN_LIBRARY"
LIBRARY_NAME = "libringattn.so"

# ---- narrowing to the C types (checked, never wrapped or rounded to a different meaning) --------


def int32_value(value, name: str, what: str, minimum: int = 0) -> int:
    """`value` as a Python int for an int32_t field: ValueError naming `name` unless it is an int
    (not a bool) in [minimum, 2**31 - 1] (ctypes would silently wrap it modulo 2**32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected a Python int ({what}), got {value!r} of type {type(value).__name__}")
    value = int(value)
    if not minimum <= value <= INT32_MAX:
        raise ValueError(f"{name}: expected an int in [{minimum}, {INT32_MAX}] ({what}), got {value}")
    return value


def float32_scale(value, name: str = "softmax_scale") -> float:
    """A softmax scale for the float field: ValueError naming `name` unless it is a real number
    > 0 whose float32 rounding is finite and normal (1e-50 would round to 0.0, 1e39 to inf)."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name}: expected a positive float, got {value!r}")
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a positive float, got {value!r}") from None
    narrowed = ctypes.c_float(scale).value
    if not (scale > 0.0 and math.isfinite(scale) and FLOAT32_MIN_NORMAL <= narrowed <= FLOAT32_MAX):
        raise ValueError(
            f"{name}: expected a positive finite float whose float32 value is a normal number "
            f"(between {FLOAT32_MIN_NORMAL:.9g} and {FLOAT32_MAX:.9g}), got {value!r}"
            + (f" (float32: {narrowed!r})" if math.isfinite(scale) and scale > 0.0 else "")
        )
    return scale


# ---- loading -----------------------------------------------------------------------------------

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


def candidate_paths() -> List[Path]:
    """The places the loader looks for the shared library, in order."""
    paths = []
    env = os.environ.get(ENV_LIBRARY)
    if env:
        paths.append(Path(env))
    paths.append(Path(__file__).resolve().parent / LIBRARY_NAME)
    return paths


def _declare(lib: ctypes.CDLL) -> None:
    """Set argtypes/restype once, so every call is type-checked by ctypes."""
    status = ctypes.c_int  # C enums are int-sized
    _i32 = ctypes.c_int32
    _i32p = ctypes.POINTER(ctypes.c_int32)
    decls = {
        "ringattn_grouped_fwd": (status, [ctypes.POINTER(FwdParams)]),
        "ringattn_grouped_bwd": (status, [ctypes.POINTER(BwdParams)]),
        "ringattn_fwd_workspace_size": (
            status,
            [ctypes.POINTER(FwdParams), ctypes.POINTER(ctypes.c_size_t)],
        ),
        "ringattn_bwd_workspace_size": (
            status,
            [ctypes.POINTER(BwdParams), ctypes.POINTER(ctypes.c_size_t)],
        ),
        "ringattn_last_error": (ctypes.c_char_p, []),
        "ringattn_describe_metadata_errors": (ctypes.c_char_p, [ctypes.c_uint32]),
        "ringattn_version": (ctypes.c_char_p, []),
        "ringattn_abi_version": (_i32, []),
        "ringattn_cuda_compiled": (_i32, []),
        "ringattn_compiled_archs": (_i32, [_i32p, _i32]),
        "ringattn_supported_head_dims": (_i32, [_i32, _i32p, _i32]),
        "ringattn_check_support": (status, [_i32, _i32, _i32, _i32]),
    }
    for name, (restype, argtypes) in decls.items():
        fn = getattr(lib, name)  # AttributeError names the missing symbol
        fn.restype = restype
        fn.argtypes = argtypes


def _load() -> ctypes.CDLL:
    tried = []
    for path in candidate_paths():
        if not path.is_file():
            tried.append(f"{path} (not found)")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            tried.append(f"{path} ({e})")
            continue
        try:
            _declare(lib)
        except AttributeError as e:
            raise RuntimeError(
                f"ring_flash_attn: {path} is not a compatible libringattn ({e}). "
                "Rebuild it with `pip install .` from the repository root."
            ) from e
        abi = lib.ringattn_abi_version()
        if abi != ABI_VERSION:
            raise RuntimeError(
                f"ring_flash_attn: {path} has C ABI version {abi}, but this Python package "
                f"expects version {ABI_VERSION}. Rebuild the library with `pip install .` from "
                "the repository root (or point RING_FLASH_ATTN_LIBRARY at a matching build)."
            )
        return lib
    raise RuntimeError(
        "ring_flash_attn: cannot load the native library libringattn.so. Looked in:\n  "
        + "\n  ".join(tried)
        + f"\nBuild and install it with `pip install .` from the repository root, or build it "
        "with CMake (cmake -S . -B build -G Ninja && cmake --build build) and set "
        f"{ENV_LIBRARY}=/path/to/libringattn.so."
    )


def get() -> ctypes.CDLL:
    """The loaded library (loaded on first call). Raises RuntimeError if it cannot be found."""
    global _lib
    lib = _lib
    if lib is None:
        with _lock:
            if _lib is None:
                _lib = _load()
            lib = _lib
    return lib


def is_available() -> bool:
    """True if the native library can be loaded."""
    try:
        get()
    except RuntimeError:
        return False
    return True


# ---- status handling ---------------------------------------------------------------------------


def last_error() -> str:
    msg = get().ringattn_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def check(status: int, what: str = "", rename: Optional[Callable[[str], str]] = None) -> None:
    """Raise the Python exception matching a ``ringattn_status``, with the library's message.

    INVALID_ARGUMENT -> ValueError, UNSUPPORTED -> NotImplementedError (the message starts with
    the argument's name, as the library wrote it or as ``rename`` maps it to the caller's
    names); anything else that is not OK -> RuntimeError, prefixed with ``what`` (the operation,
    e.g. "ring_flash_attn forward") and suffixed with the status name.
    """
    if status == STATUS_OK:
        return
    message = last_error() or "(no message)"
    if rename is not None:
        message = rename(message)
    if status == STATUS_INVALID_ARGUMENT:
        raise ValueError(message)
    if status == STATUS_UNSUPPORTED:
        raise NotImplementedError(message)
    name = _STATUS_NAMES.get(status, f"status {status}")
    raise RuntimeError(f"{what}: {message} [{name}]" if what else f"{message} [{name}]")


# ---- queries -----------------------------------------------------------------------------------


def version() -> str:
    return get().ringattn_version().decode()


def abi_version() -> int:
    return int(get().ringattn_abi_version())


def cuda_compiled() -> bool:
    return bool(get().ringattn_cuda_compiled())


def _int_list(fn, *args) -> List[int]:
    cap = 64
    buf = (ctypes.c_int32 * cap)()
    n = fn(*args, buf, cap)
    return [int(buf[i]) for i in range(min(n, cap))]


def describe_metadata_errors(bits: int) -> str:
    """The library's description of ringattn_metadata_error ``bits`` (one phrase per set bit,
    joined by "; "; "" for 0; bits it does not define are named as unknown)."""
    msg = get().ringattn_describe_metadata_errors(int(bits) & 0xFFFFFFFF)
    return msg.decode("utf-8", "replace") if msg else ""


def compiled_archs() -> List[int]:
    """SM architectures the GPU kernels are compiled for (empty for a CPU-only build)."""
    return _int_list(get().ringattn_compiled_archs)


def supported_head_dims(device_type: int) -> List[int]:
    """Head dims the backend of ``device_type`` (DEVICE_CPU / DEVICE_CUDA) has kernels for."""
    return _int_list(get().ringattn_supported_head_dims, device_type)


def check_support(device_type: int, device_index: int, dtype: int, head_dim: int) -> None:
    """Raise (see ``check``) unless (device, dtype, head_dim) can run here."""
    check(get().ringattn_check_support(device_type, device_index, dtype, head_dim), "ring_flash_attn support query")
