"""The ctypes mirrors of include/ringattn/ringattn.h and the library loader.

The struct layouts are checked against the C compiler's own sizeof/offsetof of the real header
(skipped when no C compiler is found), every member of a struct member too (``kv.k`` of
``ringattn_fwd_params``), so a header change that the Python mirror misses fails here rather
than as memory corruption.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ring_flash_attn import _lib

REPO = Path(__file__).resolve().parent.parent
INCLUDE = REPO / "include"

STRUCTS = {
    "ringattn_exec": _lib.Exec,
    "ringattn_problem": _lib.Problem,
    "ringattn_kv": _lib.KV,
    "ringattn_fwd_group": _lib.FwdGroup,
    "ringattn_fwd_params": _lib.FwdParams,
    "ringattn_bwd_group": _lib.BwdGroup,
    "ringattn_bwd_params": _lib.BwdParams,
}


# ringattn_metadata_error bits: C name -> the _lib constant.
METADATA_CONSTANTS = {
    "RINGATTN_METADATA_CU_SEQLENS_Q_FIRST": _lib.METADATA_CU_SEQLENS_Q_FIRST,
    "RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING": _lib.METADATA_CU_SEQLENS_Q_DECREASING,
    "RINGATTN_METADATA_CU_SEQLENS_Q_PAST_END": _lib.METADATA_CU_SEQLENS_Q_PAST_END,
    "RINGATTN_METADATA_CU_SEQLENS_K_FIRST": _lib.METADATA_CU_SEQLENS_K_FIRST,
    "RINGATTN_METADATA_CU_SEQLENS_K_DECREASING": _lib.METADATA_CU_SEQLENS_K_DECREASING,
    "RINGATTN_METADATA_CU_SEQLENS_K_PAST_END": _lib.METADATA_CU_SEQLENS_K_PAST_END,
    "RINGATTN_METADATA_SEQUSED_K_RANGE": _lib.METADATA_SEQUSED_K_RANGE,
    "RINGATTN_METADATA_ALL_ERRORS": _lib.METADATA_ALL_ERRORS,
}


def _member_paths(struct) -> list:
    """``member.field`` of every field of every struct-typed member of ctypes struct `struct`."""
    return [f"{name}.{inner}" for name, ctype in struct._fields_ if issubclass(ctype, ctypes.Structure)
            for inner, _ in ctype._fields_]


def _compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    cc = _compiler()
    if cc is None or not (INCLUDE / "ringattn" / "ringattn.h").is_file():
        pytest.skip("needs a C compiler and include/ringattn/ringattn.h")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "ringattn/ringattn.h"',
             'int main(void) {']
    for cname, struct in STRUCTS.items():
        lines.append(f'  printf("{cname} sizeof %zu\\n", sizeof({cname}));')
        for field, _ in struct._fields_:
            lines.append(f'  printf("{cname} {field} %zu\\n", offsetof({cname}, {field}));')
        for path in _member_paths(struct):
            lines.append(f'  printf("{cname} {path} %zu\\n", offsetof({cname}, {path}));')
    for const in ("RINGATTN_ABI_VERSION", "RINGATTN_MAX_GROUPS", "RINGATTN_STATUS_INVALID_ARGUMENT",
                  "RINGATTN_STATUS_UNSUPPORTED", "RINGATTN_STATUS_CUDA_ERROR",
                  "RINGATTN_STATUS_INTERNAL_ERROR", "RINGATTN_DTYPE_FP32", "RINGATTN_DTYPE_FP16",
                  "RINGATTN_DTYPE_BF16", "RINGATTN_DTYPE_FP64", "RINGATTN_DEVICE_CPU",
                  "RINGATTN_DEVICE_CUDA", "RINGATTN_TIER_AUTO", "RINGATTN_TIER_SM80", "RINGATTN_TIER_SM90",
                  *METADATA_CONSTANTS):
        lines.append(f'  printf("const {const} %d\\n", (int){const});')
    lines += ["  return 0;", "}"]
    d = tmp_path_factory.mktemp("abi")
    src, exe = d / "layout.c", d / "layout"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run([cc, "-std=c99", f"-I{INCLUDE}", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    layout = {}
    for line in out.splitlines():
        a, b, c = line.split()
        layout[(a, b)] = int(c)
    return layout


@pytest.mark.parametrize("cname", list(STRUCTS))
def test_struct_layout_matches_header(c_layout, cname):
    struct = STRUCTS[cname]
    assert ctypes.sizeof(struct) == c_layout[(cname, "sizeof")], f"sizeof({cname})"
    for field, _ in struct._fields_:
        assert getattr(struct, field).offset == c_layout[(cname, field)], f"{cname}.{field}"
    for path in _member_paths(struct):
        outer, inner = path.split(".")
        offset = getattr(struct, outer).offset + getattr(dict(struct._fields_)[outer], inner).offset
        assert offset == c_layout[(cname, path)], f"{cname}.{path}"


def test_constants_match_header(c_layout):
    names = {
        "RINGATTN_ABI_VERSION": _lib.ABI_VERSION,
        "RINGATTN_MAX_GROUPS": _lib.MAX_GROUPS,
        "RINGATTN_STATUS_INVALID_ARGUMENT": _lib.STATUS_INVALID_ARGUMENT,
        "RINGATTN_STATUS_UNSUPPORTED": _lib.STATUS_UNSUPPORTED,
        "RINGATTN_STATUS_CUDA_ERROR": _lib.STATUS_CUDA_ERROR,
        "RINGATTN_STATUS_INTERNAL_ERROR": _lib.STATUS_INTERNAL_ERROR,
        "RINGATTN_DTYPE_FP32": _lib.DTYPE_FP32,
        "RINGATTN_DTYPE_FP16": _lib.DTYPE_FP16,
        "RINGATTN_DTYPE_BF16": _lib.DTYPE_BF16,
        "RINGATTN_DTYPE_FP64": _lib.DTYPE_FP64,
        "RINGATTN_DEVICE_CPU": _lib.DEVICE_CPU,
        "RINGATTN_DEVICE_CUDA": _lib.DEVICE_CUDA,
        "RINGATTN_TIER_AUTO": _lib.TIER_AUTO,
        "RINGATTN_TIER_SM80": _lib.TIER_SM80,
        "RINGATTN_TIER_SM90": _lib.TIER_SM90,
        **METADATA_CONSTANTS,
    }
    for name, value in names.items():
        assert c_layout[("const", name)] == value, name


def test_loaded_library_reports_abi_and_queries():
    assert _lib.abi_version() == _lib.ABI_VERSION
    assert isinstance(_lib.version(), str) and _lib.version()
    dims = _lib.supported_head_dims(_lib.DEVICE_CPU)
    assert 64 in dims and 128 in dims
    if not _lib.cuda_compiled():
        assert _lib.compiled_archs() == []
    _lib.check_support(_lib.DEVICE_CPU, 0, _lib.DTYPE_FP32, 64)  # does not raise


def test_missing_library_message(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "libringattn.so"
    monkeypatch.setattr(_lib, "candidate_paths", lambda: [missing])
    with pytest.raises(RuntimeError) as info:
        _lib._load()
    msg = str(info.value)
    assert str(missing) in msg and "not found" in msg
    assert "pip install ." in msg and _lib.ENV_LIBRARY in msg


def test_env_var_is_searched_first(monkeypatch, tmp_path):
    path = tmp_path / "custom" / "libringattn.so"
    monkeypatch.setenv(_lib.ENV_LIBRARY, str(path))
    paths = _lib.candidate_paths()
    assert paths[0] == path
    assert paths[1] == Path(_lib.__file__).resolve().parent / _lib.LIBRARY_NAME


_STUB = r"""
#include <stddef.h>
#include <stdint.h>
int ringattn_grouped_fwd(const void* p) { return 0; }
int ringattn_grouped_bwd(const void* p) { return 0; }
int ringattn_fwd_workspace_size(const void* p, size_t* b) { return 0; }
int ringattn_bwd_workspace_size(const void* p, size_t* b) { return 0; }
const char* ringattn_last_error(void) { return ""; }
const char* ringattn_describe_metadata_errors(uint32_t bits) { return ""; }
const char* ringattn_version(void) { return "stub"; }
int32_t ringattn_abi_version(void) { return 999; }
int32_t ringattn_cuda_compiled(void) { return 0; }
int32_t ringattn_compiled_archs(int32_t* a, int32_t c) { return 0; }
int32_t ringattn_supported_head_dims(int32_t d, int32_t* a, int32_t c) { return 0; }
int ringattn_check_support(int32_t a, int32_t b, int32_t c, int32_t d) { return 0; }
"""


def test_abi_version_mismatch_is_refused(monkeypatch, tmp_path):
    cc = _compiler()
    if cc is None:
        pytest.skip("needs a C compiler")
    src, so = tmp_path / "stub.c", tmp_path / "libringattn.so"
    src.write_text(_STUB)
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    monkeypatch.setattr(_lib, "candidate_paths", lambda: [so])
    with pytest.raises(RuntimeError, match=rf"C ABI version 999.*expects version {_lib.ABI_VERSION}.*pip install \."):
        _lib._load()


def test_package_ships_py_typed():
    """PEP 561 marker: type checkers use the package's hints. scikit-build-core puts every file of
    the wheel.packages folder that git does not ignore into the wheel, py.typed included."""
    package = REPO / "python" / "ring_flash_attn"
    assert (package / "py.typed").is_file()
    assert 'wheel.packages = ["python/ring_flash_attn"]' in (REPO / "pyproject.toml").read_text()
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a checkout to ask whether py.typed is ignored")
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(package / "py.typed")])
    assert ignored.returncode == 1, "py.typed is git-ignored, so the wheel would leave it out"
