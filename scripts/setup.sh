#!/usr/bin/env bash
# Install polyalign (editable) with optional extras: `bash scripts/setup.sh` or `bash scripts/setup.sh dev`.
# On a machine without an NVIDIA GPU, torch is installed first within <2.14 so that pip keeps a CPU build
# instead of pulling several GB of CUDA wheels; GPU machines get whatever torch>=2.4 resolves to.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if ! command -v nvidia-smi >/dev/null 2>&1 && ! python3 -c "import torch" >/dev/null 2>&1; then
  python3 -m pip install -q "torch>=2.4,<2.14"
fi
python3 -m pip install -q -e ".${extras:+[$extras]}"
