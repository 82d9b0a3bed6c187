"""Kernel-development overrides read from the environment (marker ``gpu``): a value the library
cannot take is reported, not silently ignored."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dist_harness import package_env

pytestmark = pytest.mark.gpu


_BAD_OVERRIDE_SCRIPT = r"""
import torch
from ring_flash_attn import grouped_flash_attn_varlen_func
from cases import cu_seqlens
gen = torch.Generator(device="cpu").manual_seed(5)
def randn(*shape):
    return torch.randn(*shape, generator=gen).to(device="cuda", dtype=torch.bfloat16).requires_grad_()
q, k, v = randn(256, 4, 64), randn(256, 2, 64), randn(256, 2, 64)
cu = cu_seqlens([200, 56], "cuda")
for _ in range(2):  # the second call must not report again
    out = grouped_flash_attn_varlen_func([q], k, v, [cu], cu, [200], 200)[0]
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
torch.cuda.synchronize()
assert torch.isfinite(out.float()).all() and all(torch.isfinite(g.float()).all() for g in grads)
print("DONE")
"""


@pytest.mark.parametrize("bad", ["abc", "12x", "0", "-3", "99999999999999999999"])
def test_bad_kernel_development_override_is_reported_not_silent(tmp_path, bad):
    """RING_FLASH_ATTN_TILE_HEAD_RUN / _KV_HEAD_RUN with a value the library cannot take: the call
    runs with the library's own choice, and stderr names the variable, the value and the range,
    once per process (csrc/cuda/tile_scheduler.h, env_override)."""
    env = package_env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), env["PYTHONPATH"]])
    env["RING_FLASH_ATTN_TILE_HEAD_RUN"] = bad
    env["RING_FLASH_ATTN_KV_HEAD_RUN"] = bad
    script = tmp_path / "bad_override.py"
    script.write_text(_BAD_OVERRIDE_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "DONE" in r.stdout, r.stderr[-3000:]
    line = f"ringattn: RING_FLASH_ATTN_TILE_HEAD_RUN='{bad}' ignored: expected an integer in [1, 1048575]"
    assert r.stderr.count(line) == 1, r.stderr[-3000:]
    if torch.cuda.get_device_capability()[0] == 9 and env.get("RING_FLASH_ATTN_TIER", "auto") in ("auto", "sm90"):
        kv_line = line.replace("TILE_HEAD_RUN", "KV_HEAD_RUN")
        assert r.stderr.count(kv_line) == 1, r.stderr[-3000:]
