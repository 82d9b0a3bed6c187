"""The C++ kernels of the ops (``libringattn_torch``), used when they can be loaded.

``libringattn_torch`` (csrc/torch_shim) implements ``torch.ops.ring_flash_attn.grouped_fwd`` and
``grouped_bwd`` for CPU and CUDA in C++, over PyTorch's stable ABI (one binary for every PyTorch
from 2.10 on), linking libringattn directly: the checks, struct filling, output allocation and
library call of the Python kernels (``ops._run_fwd`` / ``ops._run_bwd``) without Python. Where it
cannot be loaded, the Python kernels are registered instead and call libringattn through ctypes,
as they always did; ``implementation()`` says which of the two is active.

Where the library is looked for:
  * ``RING_FLASH_ATTN_TORCH_SHIM=0``: nowhere (the ctypes path);
  * ``RING_FLASH_ATTN_TORCH_SHIM=/path/to/libringattn_torch.so``: that file (a warning when it
    cannot be used);
  * otherwise ``libringattn_torch.so`` in the folder of the libringattn that ``_lib`` loads
    (``RING_FLASH_ATTN_LIBRARY``), then next to this file (where ``pip install .`` puts it).
It is used only with torch >= 2.10, a loadable libringattn of the same C ABI version, and when it
links that very libringattn (not a second copy). The choice is made once, at import.

Errors: a call the C++ kernel does not take itself (a check fails, the library refuses it, ...) is
handed unchanged to the op ``ring_flash_attn::_grouped_fwd_python`` / ``_grouped_bwd_python``,
whose kernel is the Python one: it runs the call, or reports its exception to the C++ kernel
(``ringattn_torch_shim_report_error``), which raises it again with the same message: a ValueError
stays a ValueError; other exceptions arrive as RuntimeError (PyTorch's stable ABI cannot raise
NotImplementedError from C++; NotImplementedError is a RuntimeError subclass, and the CPU backend
never raises it). The package's eager calls (``eager_calls``) run the same C++ kernels through
``_grouped_fwd_native`` / ``_grouped_bwd_native`` (no autograd wrapper) and re-run a failed call on
the Python path, so their exceptions keep their exact type.

CUDA is opt-in for now (``cuda_opted_in``): with RING_FLASH_ATTN_TORCH_SHIM unset, the C++ kernels
serve CPU tensors only and CUDA calls keep the Python kernels, until the GPU test suite has run
the C++ kernels' CUDA path; ``RING_FLASH_ATTN_TORCH_SHIM=1`` (or a path) turns them on for CUDA.

CUDA: the C++ kernels read the device's current stream themselves, and each device's metadata
error word (``_metadata_errors``) once the Python path has created it: the first call on a device
takes the Python path, which creates the word and hands it over (``_share_error_words``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from . import _lib, _metadata_errors

__all__ = ["implementation", "details", "counts", "cuda_opted_in", "ENV_TORCH_SHIM", "LIBRARY_NAME"]

ENV_TORCH_SHIM = "RING_FLASH_ATTN_TORCH_SHIM"
LIBRARY_NAME = "libringattn_torch.so"
MIN_TORCH = (2, 10)

# The ops whose CPU and CUDA kernels the C++ library registers (ringattn_torch_shim_register);
# each also gets `_<name>_python` (the Python kernel, for the calls the C++ kernel hands over) and
# `_<name>_native` (the C++ kernel without autograd, for the eager path).
SHIM_OPS = ("grouped_fwd", "grouped_bwd")

_VALUE_ERROR = 1
_OTHER_ERROR = 2

_lock = threading.Lock()
_shim: Optional[ctypes.CDLL] = None
_path: Optional[Path] = None
_reason = "not loaded yet"
_cuda_registered = False
_shared_words: dict = {}


def cuda_opted_in() -> bool:
    """Whether the C++ kernels also serve CUDA tensors: only when RING_FLASH_ATTN_TORCH_SHIM is
    ``1`` or a path. By default CUDA calls keep the Python kernels until this project's GPU test
    suite has run the C++ kernels' CUDA path (they are built and tested on CPU; see
    docs/build-and-ci.md)."""
    return os.environ.get(ENV_TORCH_SHIM, "") not in ("", "0")


def implementation(device_type: str = "cpu") -> str:
    """``"torch_shim"`` when the ops' kernels for `device_type` ("cpu" or "cuda") are
    libringattn_torch's C++ ones, ``"ctypes"`` when they are the Python kernels (libringattn
    through ctypes)."""
    if _shim is None or (device_type == "cuda" and not _cuda_registered):
        return "ctypes"
    return "torch_shim"


def details() -> str:
    """Which kernels the ops use, and why (the library's path, or why it is not used)."""
    if _shim is not None:
        cuda = ("CPU and CUDA" if _cuda_registered else
                f"CPU only; CUDA calls use the Python kernels unless {ENV_TORCH_SHIM}=1")
        return f"torch_shim: C++ kernels of {LIBRARY_NAME} at {_path} ({cuda})"
    return f"ctypes: Python kernels calling libringattn through ctypes ({_reason})"


def counts() -> Tuple[int, int]:
    """(calls the C++ kernels ran, calls they handed to the Python kernels) in this process;
    (0, 0) on the ctypes path."""
    if _shim is None:
        return 0, 0
    native, python = ctypes.c_int64(0), ctypes.c_int64(0)
    _shim.ringattn_torch_shim_counts(ctypes.byref(native), ctypes.byref(python))
    return native.value, python.value


@contextlib.contextmanager
def python_path_forced() -> Iterator[None]:
    """For tests: inside, every call of the C++ kernels takes the Python path (as the first call
    on a CUDA device does), so its results and errors can be compared. No effect on the ctypes
    path."""
    if _shim is None:
        yield
        return
    _shim.ringattn_torch_shim_force_python_path(1)
    try:
        yield
    finally:
        _shim.ringattn_torch_shim_force_python_path(0)


def candidate_paths() -> List[Path]:
    """Where the library is looked for (empty when RING_FLASH_ATTN_TORCH_SHIM=0)."""
    setting = os.environ.get(ENV_TORCH_SHIM, "")
    if setting == "0":
        return []
    if setting not in ("", "1"):
        return [Path(setting)]
    paths = []
    library = os.environ.get(_lib.ENV_LIBRARY)
    if library:
        paths.append(Path(library).parent / LIBRARY_NAME)
    paths.append(Path(__file__).resolve().parent / LIBRARY_NAME)
    return paths


def _declare(shim: ctypes.CDLL) -> None:
    decls = {
        "ringattn_torch_shim_abi_version": (ctypes.c_int32, []),
        "ringattn_torch_shim_linked_entry_point": (ctypes.c_void_p, []),
        "ringattn_torch_shim_register": (ctypes.c_int32, [ctypes.c_char_p, ctypes.c_int32]),
        "ringattn_torch_shim_set_metadata_error_word": (ctypes.c_int32, [ctypes.c_int32, ctypes.c_void_p]),
        "ringattn_torch_shim_report_error": (None, [ctypes.c_int32, ctypes.c_char_p]),
        "ringattn_torch_shim_counts": (None, [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]),
        "ringattn_torch_shim_force_python_path": (None, [ctypes.c_int32]),
    }
    for name, (restype, argtypes) in decls.items():
        fn = getattr(shim, name)
        fn.restype = restype
        fn.argtypes = argtypes


def _open(path: Path) -> Tuple[Optional[ctypes.CDLL], str]:
    """The library at `path` if it is usable with the loaded libringattn, else (None, why)."""
    try:
        shim = ctypes.CDLL(str(path))
        _declare(shim)
    except (OSError, AttributeError) as e:
        return None, f"{path} cannot be loaded: {e}"
    lib = _lib.get()
    abi = shim.ringattn_torch_shim_abi_version()
    if abi != _lib.ABI_VERSION:
        return None, f"{path} was built for C ABI version {abi}, the package expects {_lib.ABI_VERSION}"
    linked = shim.ringattn_torch_shim_linked_entry_point()
    loaded = ctypes.cast(lib.ringattn_grouped_fwd, ctypes.c_void_p).value
    if linked != loaded:
        return None, f"{path} links another copy of libringattn than the one loaded ({_lib.candidate_paths()[0]})"
    return shim, ""


def _share_error_words(shim: ctypes.CDLL) -> None:
    """Hands the C++ kernels each CUDA device's metadata error word that the Python path created."""
    for index, pointer in list(_metadata_errors._pointers.items()):
        if _shared_words.get(index) != pointer:
            shim.ringattn_torch_shim_set_metadata_error_word(index, pointer)
            _shared_words[index] = pointer


def _reporting_kernel(kernel: Callable, failed_result: Callable, shim: ctypes.CDLL) -> Callable:
    """The kernel of ``_<op>_python``: `kernel` (the op's Python kernel), whose exception is
    reported to the C++ kernel that handed the call over instead of raised through the dispatcher
    (which would turn it into an error code); returns failed_result() then."""
    report = shim.ringattn_torch_shim_report_error

    def run(*args):
        try:
            result = kernel(*args)
        except Exception as error:  # handed back to the C++ kernel, which raises it
            kind = _VALUE_ERROR if isinstance(error, ValueError) else _OTHER_ERROR
            report(kind, str(error).encode("utf-8", "backslashreplace"))
            return failed_result()
        _share_error_words(shim)
        return result

    return run


def _bwd_as_one_list(kernel: Callable) -> Callable:
    """grouped_bwd's Python kernel returning [*dq_list, dk, dv]: the schema of
    ``_grouped_bwd_python`` has one output type (the C++ kernel calls it through
    torch_call_dispatcher, which in torch 2.10 and 2.11 converts each output with the type of the
    output at the other end of the list; outputs of one type are unaffected)."""

    def run(*args):
        dq_list, dk, dv = kernel(*args)
        return [*dq_list, dk, dv]

    return run


# Per op: the return type of its `_<name>_python` op (None: the op's own), how its Python kernel
# is adapted to it, and what that kernel returns after reporting an exception.
_PYTHON_OPS = {
    "grouped_fwd": (None, lambda kernel: kernel, lambda: ([], [])),
    "grouped_bwd": ("Tensor[]", _bwd_as_one_list, lambda: []),
}


def eager_calls(run_fwd: Callable, run_bwd: Callable) -> Tuple[Callable, Callable]:
    """The kernels of the package's eager calls when the C++ kernels are loaded: the same
    arguments and results as `run_fwd` / `run_bwd` (ops._run_fwd / ops._run_bwd, the Python
    kernels' bodies), running the C++ kernels through the ops ``_grouped_fwd_native`` /
    ``_grouped_bwd_native``, which have no autograd wrapper (the eager path runs them without
    grad or inside its own autograd.Function). A call that raises runs again on the Python path,
    which raises its exact exception (NotImplementedError too, which the C++ kernels cannot
    raise); libringattn writes nothing on a refused call, so running it again is safe."""
    native_fwd = torch.ops.ring_flash_attn._grouped_fwd_native.default
    native_bwd = torch.ops.ring_flash_attn._grouped_bwd_native.default

    python_on_cuda = not _cuda_registered

    def fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
            softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list):
        if python_on_cuda and k.is_cuda:
            return run_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
                           max_seqlen_k, softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list)
        try:
            return native_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
                              max_seqlen_k, softmax_scale, causal, False, window_size, softcap, sinks,
                              diagonal_shift_list)
        except Exception:  # the Python path raises this call's exception
            pass
        return run_fwd(q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list,
                       max_seqlen_k, softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list)

    def bwd(*args):
        if python_on_cuda and args[2].is_cuda:  # args[2]: k
            return run_bwd(*args)
        try:
            return native_bwd(*args)
        except Exception:  # the Python path raises this call's exception
            pass
        return run_bwd(*args)

    return fwd, bwd


def load(library: torch.library.Library, schemas: dict, kernels: dict) -> bool:
    """Registers libringattn_torch's kernels for the ops in SHIM_OPS if it is usable (see the
    module docstring); True then. `schemas` and `kernels` map each op name to its schema string
    and Python kernel; the private ops ``_<name>_python`` and ``_<name>_native`` are defined in
    `library` with the same schema. False (nothing registered): the caller registers the Python
    kernels of those ops. RuntimeError if a usable library fails to register (some kernels may be
    registered already then)."""
    global _shim, _path, _reason, _cuda_registered
    with_cuda = cuda_opted_in()
    with _lock:
        if _shim is not None:
            return True
        paths = candidate_paths()
        if not paths:
            _reason = f"{ENV_TORCH_SHIM}=0"
            return False
        if torch.__version__ < MIN_TORCH:
            _reason = f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}"
            return False
        if not _lib.is_available():
            _reason = "libringattn cannot be loaded"
            return False
        explicit = os.environ.get(ENV_TORCH_SHIM, "") not in ("", "1")
        shim, why = None, ""
        for path in paths:
            if not path.is_file():
                why = f"{path} not found"
                continue
            shim, why = _open(path)
            if shim is not None:
                break
        if shim is None:
            _reason = why or "not found"
            if explicit or "not found" not in why:
                warnings.warn(f"ring_flash_attn: not using {LIBRARY_NAME}: {why}; the ops use the ctypes path",
                              RuntimeWarning, stacklevel=3)
            return False
        for name in SHIM_OPS:
            schema = schemas[name]
            returns, adapt, failed_result = _PYTHON_OPS[name]
            python_schema = schema.replace(f"{name}(", f"_{name}_python(", 1)
            if returns is not None:
                python_schema = python_schema[: python_schema.rindex("->")] + f"-> {returns}"
            library.define(python_schema)
            library.define(schema.replace(f"{name}(", f"_{name}_native(", 1))
            python_kernel = _reporting_kernel(adapt(kernels[name]), failed_result, shim)
            for key in ("CPU", "CUDA"):
                library.impl(f"_{name}_python", python_kernel, key)
            if shim.ringattn_torch_shim_register(name.encode(), 1 if with_cuda else 0) != 0:
                raise RuntimeError(f"ring_flash_attn: {path} could not register its kernel of {name} "
                                   "(see PyTorch's log above); set RING_FLASH_ATTN_TORCH_SHIM=0 to use the ctypes path")
            if not with_cuda:  # CUDA keeps the Python kernel (and the eager path its Python body)
                library.impl(name, kernels[name], "CUDA")
                library.impl(f"_{name}_native", kernels[name], "CUDA")
        _shim, _path, _cuda_registered = shim, path, with_cuda
        _reason = ""
        return True
