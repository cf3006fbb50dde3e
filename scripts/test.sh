#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), then runs every test: the C++
# GoogleTest suite through ctest, then the Python tests through pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k opcheck).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh" || { echo "[test] setup failed"; exit 1; }
source "$ROOT/scripts/env.sh"
BUILD=${MOEYARD_BUILD_DIR:-$ROOT/build}

echo "[test] C++ tests (ctest)"
ctest --test-dir "$BUILD" --output-on-failure -j"$(nproc)" --timeout 600
cpp_rc=$?

echo "[test] Python tests (pytest)"
cd "$ROOT"
python -m pytest tests/python -q "$@"
py_rc=$?

echo "[test] ctest exit $cpp_rc, pytest exit $py_rc"
[ $cpp_rc -eq 0 ] && [ $py_rc -eq 0 ]
