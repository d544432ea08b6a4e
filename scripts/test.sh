#!/usr/bin/env bash
# Set up everything on a fresh machine (build tools, the test model) and run
# the whole suite: unit tests, integration tests that drive the real binary
# over stdio on the real model, the replayed sessions, and Psyche's own
# client library (the official MCP Python SDK) against the server. Release
# profile: llama.cpp is built once, optimised, and shared with scripts/run.sh.
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

# The client Psyche uses: the MCP Python SDK, pinned, in a cached venv.
venv="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}/mcp-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import mcp" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "mcp==2.3.0"
fi
"$venv/bin/python" scripts/psyche-client-check.py target/release/elpis-server
