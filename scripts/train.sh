#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), prepares the built-in corpus (byte
# shards of the Python standard library's sources) once, and trains
# configs/tiny.yaml. Extra arguments go to `moeyard train`, e.g.
#   scripts/train.sh --set train.steps=50 --resume never --overwrite
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
if [ ! -f data/builtin/train.bin ]; then
  python scripts/prepare_data.py --builtin --out data/builtin --max-bytes 20000000
fi
exec "${MOEYARD_BUILD_DIR:-$ROOT/build}/moeyard" train --config configs/tiny.yaml "$@"
