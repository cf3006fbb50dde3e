#!/usr/bin/env bash
# Installs what moeyard needs and builds it. Idempotent: a second run with
# nothing changed takes seconds (package checks, ninja no-op, ccache).
#
#   MOEYARD_VENV       Python venv to use/create  (default ~/.cache/moeyard/venv)
#   MOEYARD_BUILD_DIR  CMake build directory      (default <repo>/build)
#   MOEYARD_CMAKE_ARGS extra CMake arguments, e.g. -DMOEYARD_WITH_CUDA=ON
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MOEYARD_VENV:-$HOME/.cache/moeyard/venv}
BUILD=${MOEYARD_BUILD_DIR:-$ROOT/build}
log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages (compiler toolchain and C++ libraries).
debs=(g++ cmake ninja-build ccache python3-venv libyaml-cpp-dev libspdlog-dev
      libfmt-dev nlohmann-json3-dev libcli11-dev libgtest-dev libgmock-dev
      libssl-dev libpcre2-dev libutf8proc-dev libgloo-dev)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. Python venv with the pinned requirements (reinstalled when they change).
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
if ! cmp -s "$ROOT/requirements.txt" "$VENV/.moeyard-requirements"; then
  log "installing Python packages (first time: a few minutes)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$ROOT/requirements.txt"
  cp "$ROOT/requirements.txt" "$VENV/.moeyard-requirements"
fi

# The venv's CMake (requirements.txt) builds; Debian's is too old for CUDA 13.
export PATH="$VENV/bin:$PATH"

# 3. Build (CMake + Ninja + ccache): libmoeyard, moeyard._C, the moeyard
#    executable and the GoogleTest suite.
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/moeyard/ccache}
# Paths relative to the checkout: a fresh clone elsewhere still hits the cache.
export CCACHE_BASEDIR="$ROOT" CCACHE_NOHASHDIR=1 CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
if [ ! -f "$BUILD/build.ninja" ] || ! grep -q "CMAKE_COMMAND:INTERNAL=$VENV/" "$BUILD/CMakeCache.txt" 2>/dev/null; then
  rm -rf "$BUILD"
  log "configuring $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DPython3_EXECUTABLE="$VENV/bin/python" \
    ${MOEYARD_CMAKE_ARGS:-} >/dev/null
fi
log "building"
# The build's own status (the filter's would hide a failed build).
{ cmake --build "$BUILD" -j"$(nproc)" 2>&1; echo $? >"$BUILD/.build_status"; } |
  grep -vE '^\[[0-9]+/[0-9]+\] (Building|Linking)' || true
if [ "$(cat "$BUILD/.build_status")" != 0 ]; then
  log "build failed"
  exit 1
fi
log "ready: venv $VENV, build $BUILD"
