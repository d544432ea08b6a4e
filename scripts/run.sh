#!/usr/bin/env bash
# Set up everything on a fresh machine (build tools, the default model
# Qwen2.5-Coder-0.5B-Instruct, a release build) and run elpis-server on it. Arguments pass
# through: `scripts/run.sh` serves MCP on stdio, `scripts/run.sh chat "Hi"`
# talks to the model. Set ELPIS_MODEL_PATH to serve another GGUF model.
# `scripts/run.sh --gpu cuda|vulkan ...` sets up and builds for that GPU
# backend first (every layer that fits goes to the GPU: model.gpu_layers =
# auto). Only the server writes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

ELPIS_GPU=""
case "${1:-}" in
    --gpu) ELPIS_GPU="${2:-}"; shift 2 ;;
    --gpu=*) ELPIS_GPU="${1#--gpu=}"; shift ;;
esac
source scripts/prepare.sh
exec target/release/elpis-server "$@"
