#!/usr/bin/env bash
# Set up everything on a fresh machine (build tools, the test model) and run
# the whole suite: unit tests, and integration tests that drive the real
# binary over stdio on the real model. Release profile: llama.cpp is built
# once, optimised, and shared with scripts/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
ELPIS_MODEL_PATH="$(bash scripts/fetch-model.sh)"
export ELPIS_MODEL_PATH
unset ELPIS_QUIET

cargo build --release --all-targets
# Two test threads: each test spawns its own server; more would only fight
# over the cores.
cargo test --release -- --test-threads="${ELPIS_TEST_THREADS:-2}"
