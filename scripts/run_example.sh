#!/usr/bin/env bash
# Installs the package and runs the example: on the GPU when there is one, else a small run on
# the CPU backend.
export RINGATTN_BUILD_TESTS="${RINGATTN_BUILD_TESTS:-OFF}"
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$RFA_ROOT"
exec "$PY" example_grouped_attention.py "$@"
