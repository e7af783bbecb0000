#!/usr/bin/env bash
# The GPU kit: every GPU measurement of lmu-asr in one call of at most ~8 minutes, on a machine with a CUDA torch,
# numpy, pyarrow, click, tqdm and matplotlib and nothing else (no lhotse, webdataset, soundfile, zstandard, DALI,
# PyYAML, network). Runs from a checkout without installing it.
#   OUT=bench/results/h100 bash bench/gpu.sh            # on the GPU machine
#   OUT=/tmp/kit bash bench/gpu.sh --smoke              # the same stages at CPU size (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:=bench/results/gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
smoke=()
device=()
[ "${1:-}" = "--smoke" ] && smoke=(--smoke) && device=(--device cpu) && shift
# further arguments go to lmuasr bench gpu, e.g. --stages ctc,checkpointing
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
exec python3 -m lmu_asr.cli bench gpu --out "$OUT" "${smoke[@]}" "${device[@]}" "$@"
