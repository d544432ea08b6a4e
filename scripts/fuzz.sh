#!/usr/bin/env bash
# A long run of the property-based hostile-input test (CI runs 300 cases):
#   scripts/fuzz.sh [CASES] [SEED]   (default 5000 cases, a fresh seed each run;
#   the seed is printed, and passing it again replays the same cases)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ELPIS_MODEL_PATH="$(bash scripts/fetch-model.sh)"
export ELPIS_MODEL_PATH
seed="${2:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
echo "fuzz: seed $seed" >&2
ELPIS_FUZZ_SEED="$seed" ELPIS_FUZZ_CASES="${1:-5000}" cargo test --release --test hostile -- --nocapture random_lines
