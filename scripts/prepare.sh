# Sourced by the other scripts: install the build tools, fetch the default
# model (Qwen2.5-Coder-0.5B-Instruct, an instruction-tuned model with native
# tool calls) unless ELPIS_MODEL_PATH names one (and export its path), and
# build the release binary. Everything goes to stderr: stdout stays the
# protocol's.
bash scripts/setup.sh
if [ -z "${ELPIS_MODEL_PATH:-}" ] && [ -z "${ELPIS_MODEL__PATH:-}" ]; then
    ELPIS_MODEL_PATH="$(bash scripts/fetch-model.sh qwen)"
    export ELPIS_MODEL_PATH
fi
if [ ! -x target/release/elpis-server ]; then
    echo "prepare: first build: compiling llama.cpp takes several minutes" >&2
fi
cargo build --release --bin elpis-server >&2
