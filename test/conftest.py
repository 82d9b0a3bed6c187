"""pytest configuration: markers, GPU skipping and the import path of the package.

Markers:
  gpu     needs a CUDA device; skipped when torch.cuda.is_available() is False.
  stress  long-running, large inputs; deselect with -m "not stress".
  eight_ranks  runs 8 gloo processes (the CPU context-parallel tests); part of the default run,
          deselect with -m "not eight_ranks" where time is short.

The package is imported from python/ when it is not installed; the native library is found as
ring_flash_attn._lib documents (RING_FLASH_ATTN_LIBRARY, then next to the package).
"""

from __future__ import annotations

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_PYTHON_DIR = os.path.join(os.path.dirname(_HERE), "python")

if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # reference.py, cases.py
try:
    import ring_flash_attn  # noqa: F401
except ImportError:
    sys.path.insert(0, _PYTHON_DIR)


@pytest.fixture(scope="module")
def spawn_root(tmp_path_factory, request) -> str:
    """A fresh temporary folder per test module, named after it, under which the module's spawned
    gloo ranks write their results and logs (test/dist_harness.py)."""
    return str(tmp_path_factory.mktemp(request.module.__name__))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "stress: long-running, large-input tests")
    config.addinivalue_line("markers", "eight_ranks: runs 8 gloo processes (CPU context-parallel tests)")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
