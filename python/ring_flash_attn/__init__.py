"""ring_flash_attn: context-parallel exact attention on libringattn (a CUDA C++ library with a C ABI).

Importing the package registers the ``torch.ops.ring_flash_attn`` custom ops; the native library
is loaded on first use (see ``ring_flash_attn._lib`` for where it is looked for). The
context-parallel schemes live in ``ring_flash_attn.cp`` (one module per scheme, a registry of
them in ``ring_flash_attn.cp.registry``). The HuggingFace adapter (``ring_flash_attn.hf_adapter``)
imports transformers only when it is used.
"""

from typing import Optional

import torch

from . import ops
from ._metadata_errors import check_errors
from .grouped import flash_attn_varlen_func, grouped_flash_attn_varlen_func
from .cp.hybrid import (
    HF_ATTN_HYBRID,
    hybrid_flash_attn_varlen_func,
    hybrid_prepare_cu_seqlens,
    hybrid_shard,
    hybrid_unshard,
)
from .cp.llama3 import llama3_flash_attn_varlen_func
from .cp.llama3_layout import llama3_flash_attn_prepare_cu_seqlens, llama3_shard, llama3_unshard
from .cp.ring import (
    ring_flash_attn_func,
    ring_flash_attn_kvpacked_func,
    ring_flash_attn_qkvpacked_func,
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_kvpacked_func,
    ring_flash_attn_varlen_qkvpacked_func,
)
from .cp.mesh import (
    HybridLayout,
    HybridMesh,
    active_hybrid_mesh,
    choose_hybrid_degrees,
    choose_hybrid_layout,
    hybrid_mesh,
    hybrid_mesh_from_device_mesh,
    set_active_hybrid_mesh,
)
from .cp.packed import (
    hybrid_flash_attn_varlen_kvpacked_func,
    hybrid_flash_attn_varlen_qkvpacked_func,
    llama3_flash_attn_varlen_kvpacked_func,
    llama3_flash_attn_varlen_qkvpacked_func,
    ulysses_flash_attn_kvpacked_func,
    ulysses_flash_attn_qkvpacked_func,
    ulysses_flash_attn_varlen_kvpacked_func,
    ulysses_flash_attn_varlen_qkvpacked_func,
    zigzag_llama3_flash_attn_varlen_kvpacked_func,
    zigzag_llama3_flash_attn_varlen_qkvpacked_func,
)
from .cp.stripe import stripe_flash_attn_func, stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func
from .cp.ulysses import (
    HF_ATTN_ULYSSES,
    ulysses_flash_attn_func,
    ulysses_flash_attn_varlen_func,
    ulysses_prepare_cu_seqlens,
    ulysses_shard,
    ulysses_unshard,
)
from .cp.ring_layout import ring_local_cu_seqlens, ring_shard, ring_unshard
from .cp.stripe_layout import stripe_shard, stripe_unshard
from .cp.zigzag_layout import (
    zigzag_gather,
    zigzag_llama3_prepare_cu_seqlens,
    zigzag_local_cu_seqlens,
    zigzag_shard,
    zigzag_unshard,
)
from .cp.zigzag_llama3 import zigzag_llama3_flash_attn_varlen_func
from .cp.zigzag_ring import (
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func,
    zigzag_ring_flash_attn_qkvpacked_func,
    zigzag_ring_flash_attn_varlen_func,
    zigzag_ring_flash_attn_varlen_kvpacked_func,
    zigzag_ring_flash_attn_varlen_qkvpacked_func,
)
from .hf_adapter import (
    HF_ATTN_LLAMA3,
    HF_ATTN_ZIGZAG_LLAMA3,
    register_hf_attention,
    restore_hf_flash_attn,
    substitute_hf_flash_attn,
    update_ring_flash_attn_params,
    use_ring_attn,
)

__version__ = "0.1.0"

__all__ = [
    "HF_ATTN_LLAMA3",
    "HF_ATTN_ZIGZAG_LLAMA3",
    "check_errors",
    "flash_attn_varlen_func",
    "grouped_flash_attn_varlen_func",
    "library_version",
    "llama3_flash_attn_prepare_cu_seqlens",
    "llama3_flash_attn_varlen_func",
    "llama3_flash_attn_varlen_kvpacked_func",
    "llama3_flash_attn_varlen_qkvpacked_func",
    "llama3_shard",
    "llama3_unshard",
    "ops",
    "ops_implementation",
    "register_hf_attention",
    "restore_hf_flash_attn",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "ring_local_cu_seqlens",
    "ring_shard",
    "ring_unshard",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "stripe_shard",
    "stripe_unshard",
    "substitute_hf_flash_attn",
    "update_ring_flash_attn_params",
    "use_ring_attn",
    "zigzag_gather",
    "zigzag_llama3_flash_attn_varlen_func",
    "zigzag_llama3_flash_attn_varlen_kvpacked_func",
    "zigzag_llama3_flash_attn_varlen_qkvpacked_func",
    "zigzag_llama3_prepare_cu_seqlens",
    "zigzag_local_cu_seqlens",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "zigzag_ring_flash_attn_varlen_func",
    "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_flash_attn_varlen_qkvpacked_func",
    "zigzag_shard",
    "zigzag_unshard",
    # all-to-all (Ulysses) and the 2-D hybrid
    "HF_ATTN_HYBRID",
    "HF_ATTN_ULYSSES",
    "HybridLayout",
    "HybridMesh",
    "active_hybrid_mesh",
    "choose_hybrid_degrees",
    "choose_hybrid_layout",
    "hybrid_flash_attn_varlen_func",
    "hybrid_flash_attn_varlen_kvpacked_func",
    "hybrid_flash_attn_varlen_qkvpacked_func",
    "hybrid_mesh",
    "hybrid_mesh_from_device_mesh",
    "hybrid_prepare_cu_seqlens",
    "hybrid_shard",
    "hybrid_unshard",
    "set_active_hybrid_mesh",
    "ulysses_flash_attn_func",
    "ulysses_flash_attn_kvpacked_func",
    "ulysses_flash_attn_qkvpacked_func",
    "ulysses_flash_attn_varlen_func",
    "ulysses_flash_attn_varlen_kvpacked_func",
    "ulysses_flash_attn_varlen_qkvpacked_func",
    "ulysses_prepare_cu_seqlens",
    "ulysses_shard",
    "ulysses_unshard",
]


def library_version() -> str:
    """Version string of the loaded libringattn (loads it)."""
    from . import _lib

    return _lib.version()


def ops_implementation(device_type: Optional[str] = None) -> str:
    """Which kernels ``torch.ops.ring_flash_attn`` (and the public functions) run on tensors of
    `device_type` ("cpu" or "cuda"; default "cuda" when a GPU is available, else "cpu"):
    ``"torch_shim"`` for the C++ kernels of libringattn_torch (over PyTorch's stable ABI),
    ``"ctypes"`` for the Python kernels that call libringattn through ctypes (when
    RING_FLASH_ATTN_TORCH_SHIM=0, torch is older than 2.10, the C++ library was not built or cannot
    be loaded, or, for CUDA, unless RING_FLASH_ATTN_TORCH_SHIM=1: CUDA is opt-in until the GPU test
    suite has run it). ``ring_flash_attn._torch_shim.details()`` says which file, or why not."""
    from . import _torch_shim

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return _torch_shim.implementation(device_type)
