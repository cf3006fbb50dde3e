#!/usr/bin/env bash
# Launches the moeyard executable on several processes with torchrun (one
# node or many). Usage:
#   scripts/launch.sh [--nproc N] [--nnodes M --node-rank R --master ADDR:PORT] -- SUBCOMMAND ARGS...
# e.g. scripts/launch.sh --nproc 4 -- dist-check
# Every process gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
# (docs/distributed.md). Set-up as in scripts/setup.sh (MOEYARD_SKIP_SETUP=1
# skips it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nproc=2 nnodes=1 node_rank=0 master="127.0.0.1:29500"
while (($#)); do
  case "$1" in
    --nproc) nproc=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master) master=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option $1 (see the header of this file)" >&2; exit 2 ;;
  esac
done
(($#)) || { echo "launch.sh: give the moeyard subcommand after --" >&2; exit 2; }
[ "${MOEYARD_SKIP_SETUP:-0}" = 1 ] || "$ROOT/scripts/setup.sh" >&2
source "$ROOT/scripts/env.sh"
exe="${MOEYARD_BUILD_DIR:-$ROOT/build}/moeyard"
exec torchrun --nproc-per-node "$nproc" --nnodes "$nnodes" --node-rank "$node_rank" \
  --master-addr "${master%:*}" --master-port "${master##*:}" --no-python "$exe" "$@"
