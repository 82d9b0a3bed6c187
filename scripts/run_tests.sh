#!/usr/bin/env bash
# Installs the package and runs every test this machine can run: GoogleTest (CTest) and pytest.
# GPU tests run when a GPU is present and are skipped otherwise. Exit code != 0 on any failure,
# including a pytest run that collects no test (exit code 5).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$RFA_ROOT"

echo "[tests] GoogleTest through CTest"
ctest --test-dir build/pip --output-on-failure -j "$(nproc)"

echo "[tests] pytest"
cd "$RFA_ROOT/test"  # import the INSTALLED package, not python/ from the tree
set +e
"$PY" -m pytest -q -p no:cacheprovider -m "not stress" "$@" .
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "[tests] pytest collected no tests: the set-up is broken" >&2
  exit 1
fi
exit $rc
