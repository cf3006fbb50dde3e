#!/usr/bin/env bash
# Builds the libFuzzer harnesses of the file-format parsers (tests/fuzz/:
# token shards, safetensors headers) with clang + ASan + UBSan and runs each
# one. Fails on any crash, sanitizer report, leak, timeout or out-of-memory;
# the input that caused it is kept under the build directory.
#
#   scripts/fuzz.sh              15 s per target (what scripts/test.sh runs)
#   scripts/fuzz.sh 600          600 s per target
#   scripts/fuzz.sh --runs 1000000   that many executions per target
#
#   MOEYARD_FUZZ_BUILD_DIR  build directory (default $MOEYARD_BUILD_DIR/fuzz,
#                           else <repo>/build/fuzz); its corpus/ grows from
#                           run to run
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${MOEYARD_FUZZ_BUILD_DIR:-${MOEYARD_BUILD_DIR:-$ROOT/build}/fuzz}
log() { printf '[fuzz] %s\n' "$*"; }

limit=(-max_total_time="${1:-15}")
if [ "${1:-}" = "--runs" ]; then
  limit=(-runs="${2:?--runs needs a number}")
fi

# 1. A clang whose libFuzzer and sanitizer runtimes link (Debian: clang and
#    libclang-rt-dev), nlohmann_json, CMake.
probe() {
  local cxx
  for cxx in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    command -v "$cxx" >/dev/null || continue
    if echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
        "$cxx" -x c++ -fsanitize=fuzzer,address,undefined - -o "$BUILD/.probe" 2>/dev/null; then
      CXX_FUZZ=$(command -v "$cxx")
      return 0
    fi
  done
  return 1
}
mkdir -p "$BUILD"
if ! probe || [ ! -f /usr/include/nlohmann/json.hpp ] || ! command -v cmake >/dev/null; then
  log "installing clang, libFuzzer, nlohmann-json, cmake"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    clang libclang-rt-dev nlohmann-json3-dev cmake >/dev/null
  probe || { log "no clang with libFuzzer after installing it"; exit 1; }
fi

# 2. Build.
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
if ! grep -q "CMAKE_CXX_COMPILER:.*=$CXX_FUZZ\$" "$BUILD/CMakeCache.txt" 2>/dev/null; then
  rm -rf "$BUILD/CMakeCache.txt" "$BUILD/CMakeFiles"
  cmake -S "$ROOT/tests/fuzz" -B "$BUILD" "${gen[@]}" \
    -DCMAKE_CXX_COMPILER="$CXX_FUZZ" >/dev/null
fi
log "building with $CXX_FUZZ"
cmake --build "$BUILD" -j"$(nproc)" >/dev/null

# 3. Seeds (valid files), then each target from its corpus.
python3 "$ROOT/tests/fuzz/make_seeds.py" "$BUILD/seeds"
mkdir -p "$BUILD/crashes"
rc=0
for target in token_shard safetensors; do
  corpus="$BUILD/corpus/$target"
  mkdir -p "$corpus"
  # New inputs go to the first directory; the others are read: seeds and
  # the inputs of past failures (tests/fuzz/regressions/).
  dirs=("$corpus" "$BUILD/seeds/$target")
  [ -d "$ROOT/tests/fuzz/regressions/$target" ] && dirs+=("$ROOT/tests/fuzz/regressions/$target")
  extra=()
  [ -f "$ROOT/tests/fuzz/$target.dict" ] && extra+=(-dict="$ROOT/tests/fuzz/$target.dict")
  out="$BUILD/$target.log"
  if "$BUILD/fuzz_$target" "${dirs[@]}" "${limit[@]}" \
      "${extra[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$BUILD/crashes/$target-" >"$out" 2>&1; then
    runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$out" | grep -oE '[0-9]+$' || echo "?")
    secs=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$out" | grep -oE 'in [0-9]+' | grep -oE '[0-9]+' || echo "?")
    log "fuzz_$target: $runs executions in ${secs}s, 0 crashes (corpus $(ls "$corpus" | wc -l) inputs)"
  else
    rc=1
    tail -n 60 "$out"
    log "fuzz_$target FAILED: see $out; reproduce with $BUILD/fuzz_$target <input> (inputs in $BUILD/crashes/)"
  fi
done
exit $rc
