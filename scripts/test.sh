#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), then runs every test: the C++
# GoogleTest suite through ctest, a short fuzz run of the file parsers
# (scripts/fuzz.sh, MOEYARD_FUZZ_SECONDS per target, default 15; 0 skips it),
# then the Python tests through pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k opcheck).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh" || { echo "[test] setup failed"; exit 1; }
source "$ROOT/scripts/env.sh"
BUILD=${MOEYARD_BUILD_DIR:-$ROOT/build}

echo "[test] C++ tests (ctest)"
ctest --test-dir "$BUILD" --output-on-failure -j"$(nproc)" --timeout 600
cpp_rc=$?

fuzz_rc=0
if [ "${MOEYARD_FUZZ_SECONDS:-15}" != 0 ]; then
  echo "[test] fuzz harnesses (scripts/fuzz.sh)"
  bash "$ROOT/scripts/fuzz.sh" "${MOEYARD_FUZZ_SECONDS:-15}"
  fuzz_rc=$?
fi

echo "[test] Python tests (pytest)"
cd "$ROOT"
python -m pytest tests/python -q "$@"
py_rc=$?

echo "[test] ctest exit $cpp_rc, fuzz exit $fuzz_rc, pytest exit $py_rc"
[ $cpp_rc -eq 0 ] && [ $fuzz_rc -eq 0 ] && [ $py_rc -eq 0 ]
