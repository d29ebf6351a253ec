#!/usr/bin/env bash
# The main job on embedded defaults: installs what it needs, then runs `quiver up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/quiver up "$@"
