# Sourced by the other scripts: install the build tools, fetch the default
# model (Qwen2.5-Coder-0.5B-Instruct, an instruction-tuned model with native
# tool calls) unless ELPIS_MODEL_PATH names one (and export its path), and
# build the release binary (with ELPIS_GPU=cuda or vulkan: that backend's
# build). Everything goes to stderr: stdout stays the protocol's.
bash scripts/setup.sh ${ELPIS_GPU:+--gpu "$ELPIS_GPU"}
if [ -z "${ELPIS_MODEL_PATH:-}" ] && [ -z "${ELPIS_MODEL__PATH:-}" ]; then
    ELPIS_MODEL_PATH="$(bash scripts/fetch-model.sh qwen)"
    export ELPIS_MODEL_PATH
fi
if [ ! -x target/release/elpis-server ]; then
    echo "prepare: first build: compiling llama.cpp takes several minutes" >&2
fi
cargo build --release --bin elpis-server ${ELPIS_GPU:+--features "$ELPIS_GPU"} >&2
