#!/usr/bin/env bash
# Set up everything on a fresh machine (build tools, the test model) and run
# the whole suite: unit tests, integration tests that drive the real binary
# over stdio on the real model, the replayed sessions, Psyche's own client
# library (the official MCP Python SDK) and the official MCP Inspector's CLI
# against the server. Release
# profile: llama.cpp is built once, optimised, and shared with scripts/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# Gemma 3 270M (a fast base model) wherever model quality does not matter;
# the two instruct models where it does (templates, native tool calls).
ELPIS_MODEL_PATH="$(bash scripts/fetch-model.sh gemma)"
ELPIS_QWEN_PATH="$(bash scripts/fetch-model.sh qwen)"
ELPIS_SMOLLM2_PATH="$(bash scripts/fetch-model.sh smollm2)"
export ELPIS_MODEL_PATH ELPIS_QWEN_PATH ELPIS_SMOLLM2_PATH
unset ELPIS_QUIET
# The checks' servers save no prompts to the user's cache (the prompt-cache
# tests use folders of their own).
export ELPIS_SERVER_PROMPT_CACHE_DISK_MIB=0

cargo build --release --all-targets
# Two test threads: each test spawns its own server; more would only fight
# over the cores.
cargo test --release -- --test-threads="${ELPIS_TEST_THREADS:-2}"

# The client Psyche uses: the MCP Python SDK, pinned, in a cached venv;
# jinja2, the reference engine chat templates are written for; the official
# openai SDK and Prometheus' own parser, for the OpenAI front door.
venv="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}/mcp-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import mcp, jinja2, openai, prometheus_client, gguf" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "mcp==2.3.0" "jinja2==3.1.6" \
        "openai==2.8.1" "prometheus-client==0.23.1" "gguf==0.19.0"
fi
"$venv/bin/python" scripts/psyche-client-check.py target/release/elpis-server
# The same client over streamable HTTP, and through the stdio bridge
# (`--remote`) to an HTTP server, as an unmodified Psyche would use it.
"$venv/bin/python" scripts/psyche-client-check.py target/release/elpis-server --http
"$venv/bin/python" scripts/psyche-client-check.py target/release/elpis-server --bridge

# The OpenAI API through the official SDK, on the default model (tool calls
# need its template).
"$venv/bin/python" scripts/openai-check.py target/release/elpis-server "$ELPIS_QWEN_PATH"

# Every test model with a chat template renders byte-equal to jinja2.
"$venv/bin/python" scripts/template-check.py target/release/elpis-server "$ELPIS_QWEN_PATH" "$ELPIS_SMOLLM2_PATH"

# The script a lent NVIDIA machine runs (scripts/gpu-check.sh), here on the
# CPU build with a tiny random-weight model: the model writer, the
# capabilities, the replayed sessions and the bench, end to end.
"$venv/bin/python" scripts/gpu-model.py vocab "$ELPIS_QWEN_PATH" target/vocab.gguf
PATH="$venv/bin:$PATH" OUT=target/gpu-check GPU_CHECK_BINARY=target/release/elpis-server GPU_CHECK_SHAPE=tiny \
    GPU_CHECK_VOCAB=target/vocab.gguf bash scripts/gpu-check.sh >&2

# The official MCP Inspector's CLI, pinned, in a cached npm prefix: lists and
# calls every tool and resource.
inspector="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}/inspector"
if [ ! -x "$inspector/node_modules/.bin/mcp-inspector" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "test: installing nodejs and npm for the MCP Inspector" >&2
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq nodejs npm >&2
    fi
    mkdir -p "$inspector"
    npm install --silent --no-audit --no-fund --prefix "$inspector" "@modelcontextprotocol/inspector@0.15.0" >&2
fi
python3 scripts/inspector-check.py "$inspector/node_modules/.bin/mcp-inspector" target/release/elpis-server
python3 scripts/inspector-check.py "$inspector/node_modules/.bin/mcp-inspector" target/release/elpis-server --http

# The GPU path on a real device backend: the Vulkan build set up from the
# registries and built, every layer offloaded to Mesa's lavapipe (a Vulkan
# device on the CPU; Mesa 25's, scripts/lavapipe.sh): the layers and device
# reported, the errors for counts that do not fit, Psyche's idle sessions,
# streams with quick calls and a cancel, a function call, steering,
# speculation and a prompt cache restored (tests/gpu.rs).
# ELPIS_GPU_TESTS=off skips it (it builds llama.cpp a second time, with
# ggml-vulkan's shaders: about 13 minutes here; lavapipe compiles its
# shaders as each is first used, about 8 minutes of the tests on a fresh
# machine, 2 once its disk cache holds them).
if [ "${ELPIS_GPU_TESTS:-vulkan}" = vulkan ]; then
    bash scripts/setup.sh --gpu vulkan
    lavapipe="$(bash scripts/lavapipe.sh)"
    # GALLIVM_PERF=nopt: lavapipe compiles shaders unoptimised, about a
    # fifth less time in all on a fresh machine (a few tokens run on them).
    (eval "$lavapipe" && GALLIVM_PERF=nopt cargo test --release --features vulkan --test gpu -- --test-threads=1)
    # The default (CPU) binary back in place for whoever runs it next.
    cargo build --release --bin elpis-server
fi
