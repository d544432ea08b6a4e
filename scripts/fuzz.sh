#!/usr/bin/env bash
# A long run of the property-based hostile-input test (CI runs 300 cases):
#   scripts/fuzz.sh [CASES]   (default 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ELPIS_MODEL_PATH="$(bash scripts/fetch-model.sh)"
export ELPIS_MODEL_PATH
ELPIS_FUZZ_CASES="${1:-5000}" cargo test --release --test hostile -- --nocapture random_lines
