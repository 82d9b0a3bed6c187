# Sourced by scripts/run_tests.sh and scripts/run_example.sh: picks the Python environment and
# installs the package into it.
#
# Environment: $RING_FLASH_ATTN_PYTHON if set (use that interpreter as is), else the venv at
# ${RING_FLASH_ATTN_VENV:-$HOME/.cache/ring-flash-attn/venv}, created on first use. PyPI's torch
# wheel brings several GB of CUDA libraries, so an existing environment is reused: on a fresh
# machine the first run downloads and installs torch (about 1.5 min here), later runs take seconds.
set -euo pipefail
RFA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RFA_TORCH_VERSION="${RING_FLASH_ATTN_TORCH:-torch==2.11.0}"
# transformers: for the HuggingFace adapter's tests (test/test_hf_adapter_cpu.py); the package
# itself does not need it. About 35 s on a fresh environment, see docs/build-and-ci.md.
RFA_TRANSFORMERS_VERSION="${RING_FLASH_ATTN_TRANSFORMERS:-transformers==5.24.0}"

if [ -n "${RING_FLASH_ATTN_PYTHON:-}" ]; then
  PY="$RING_FLASH_ATTN_PYTHON"
else
  venv="${RING_FLASH_ATTN_VENV:-$HOME/.cache/ring-flash-attn/venv}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv"
    python3 -m venv "$venv"
  fi
  PY="$venv/bin/python"
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $RFA_TORCH_VERSION into $("$PY" -c 'import sys; print(sys.prefix)') (first run: a large download)"
  "$PY" -m pip install -q "$RFA_TORCH_VERSION"
fi
"$PY" -m pip install -q numpy pytest "scikit-build-core>=0.10" "$RFA_TRANSFORMERS_VERSION"

# Build libringattn with CMake (CUDA kernels when nvcc is present) and install the package.
if [ -z "${RINGATTN_ENABLE_CUDA:-}" ]; then
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    export RINGATTN_ENABLE_CUDA=ON
    export PATH="$PATH:/usr/local/cuda/bin"
  else
    export RINGATTN_ENABLE_CUDA=OFF
  fi
fi
export RINGATTN_BUILD_TESTS="${RINGATTN_BUILD_TESTS:-ON}"
echo "[setup] building libringattn (CUDA=$RINGATTN_ENABLE_CUDA, archs ${RINGATTN_CUDA_ARCHS:-80;90a}) and installing ring_flash_attn"
t0=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$PY" -m pip install -q --no-build-isolation --no-deps "$RFA_ROOT"
echo "[setup] build + install took $(( $(date +%s) - t0 )) s"
unset RING_FLASH_ATTN_LIBRARY  # test the installed library, not a stray one
