#!/usr/bin/env bash
# Set up (if needed) and run the main job: a generation on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/turbo-cluster generate --local 2 --prompt "${PROMPT:-What is the capital of France? Answer in one sentence.}" --max-tokens 64 "$@"
