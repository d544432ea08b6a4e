#!/usr/bin/env bash
# Set up everything on a fresh machine (build tools, the default model
# Qwen2.5-Coder-0.5B-Instruct, a release build) and run elpis-server on it. Arguments pass
# through: `scripts/run.sh` serves MCP on stdio, `scripts/run.sh chat "Hi"`
# talks to the model. Set ELPIS_MODEL_PATH to serve another GGUF model.
# Only the server writes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/prepare.sh
exec target/release/elpis-server "$@"
