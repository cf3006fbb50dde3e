#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh) and runs the main job.
# Until the trainer lands (`moeyard train --config configs/tiny.yaml`), the
# main job is the MoE layer example: a small MoE layer trained for a few
# steps on CPU, printing its loss and routing statistics.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
exec python -m moeyard.examples.moe_layer "$@"
