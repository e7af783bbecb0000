#!/usr/bin/env bash
# Multi-node without SLURM: run this on every node with the same RDZV_ENDPOINT (host:port of node 0).
# Usage: NNODES=2 GPUS=8 RDZV_ENDPOINT=node0:29400 SHARDS=shards/m RUN=runs/m cluster/torchrun_multi_node.sh [flags]
set -euo pipefail
: "${SHARDS:?set SHARDS}" ; : "${RUN:?set RUN}" ; : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}"
args=(train --shards "$SHARDS" --out "$RUN" --preset "${PRESET:-fast-h100}" --no-progress)
[ -n "${DEV:-}" ] && args+=(--dev-shards "$DEV")
[ -f "$RUN/checkpoints/last.pt" ] && args+=(--resume)
# pre-flight: the environment is checked on this host before any GPU hour is spent (PREFLIGHT=0 skips it)
if [ "${PREFLIGHT:-1}" != 0 ]; then "${LMUASR:-lmuasr}" doctor --path "$RUN" --min-free-gb "${MIN_FREE_GB:-20}" || { echo "pre-flight failed (see above; PREFLIGHT=0 skips it)" >&2; exit 1; }; fi
exec torchrun --nnodes "${NNODES:-1}" --nproc-per-node "${GPUS:-8}" --rdzv-backend c10d \
  --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-lmuasr}" -m lmu_asr.cli "${args[@]}" "$@"
