# Source this to use the built tree: venv on PATH, package importable.
#   source scripts/env.sh
_moeyard_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MOEYARD_VENV=${MOEYARD_VENV:-$HOME/.cache/moeyard/venv}
export PATH="$MOEYARD_VENV/bin:${MOEYARD_BUILD_DIR:-$_moeyard_root/build}:$PATH"
export PYTHONPATH="$_moeyard_root/python${PYTHONPATH:+:$PYTHONPATH}"
