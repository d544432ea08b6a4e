#!/usr/bin/env bash
# Benchmark elpis-server against a raw llama-cpp-2 loop on the default model
# (or ELPIS_MODEL_PATH): prints a table of medians and writes bench.json.
# Arguments pass through, e.g. `scripts/bench.sh --runs 5 --out /tmp/b.json`;
# server settings through the environment, e.g. ELPIS_MODEL_PARALLEL=4.
# Run it on a quiet machine: numbers from a busy one mean little.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/prepare.sh
exec target/release/elpis-server bench "$@"
