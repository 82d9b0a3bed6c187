"""ring_flash_attn: context-parallel exact attention on libringattn (a CUDA C++ library with a C ABI).

Importing the package registers the ``torch.ops.ring_flash_attn`` custom ops; the native library
is loaded on first use (see ``ring_flash_attn._lib`` for where it is looked for).
"""

from . import ops
from .grouped import flash_attn_varlen_func, grouped_flash_attn_varlen_func

__version__ = "0.1.0"

__all__ = [
    "flash_attn_varlen_func",
    "grouped_flash_attn_varlen_func",
    "library_version",
    "ops",
]


def library_version() -> str:
    """Version string of the loaded libringattn (loads it)."""
    from . import _lib

    return _lib.version()
