#!/usr/bin/env bash
# Set up (if needed) and run the main job: a generation over 2 local nodes on the bundled
# model, with a TurboQuant KV cache of 5-bit keys and 3-bit values (4 bits a coordinate).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/turbo-cluster generate --local 2 --prompt "${PROMPT:-What is the capital of France? Answer in one sentence.}" --max-tokens 64 --k-bits 5 --v-bits 3 "$@"
