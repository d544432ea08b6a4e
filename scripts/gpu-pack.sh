#!/usr/bin/env bash
# Pack what scripts/gpu-check.sh needs on an NVIDIA machine without Rust
# or network, into gpu-pack/ (ignored by git), under 64 MiB:
#   elpis-server.tar.xz  the CUDA build (for any x86-64 with AVX2, for the
#                        CUDA architectures setup.sh chose: 90 without a GPU
#                        here), stripped and compressed;
#   vocab.gguf           the default model's tokenizer and chat template
#                        alone (scripts/gpu-model.py writes the weights there);
#   gguf-*.whl           llama.cpp's gguf package, pinned.
# The CUDA build takes long on a small machine (ggml-cuda's kernels: about
# 110 minutes on 2 cores); it is cached in target/cuda.
#
#   bash scripts/gpu-pack.sh
#   GPU_PACK_BINARY=path/to/elpis-server bash scripts/gpu-pack.sh   # pack a given build
# Then, there: bash scripts/gpu-check.sh gpu-pack
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "gpu-pack: $*" >&2; }
pack=gpu-pack
limit_mib=64
gguf_version=0.19.0

binary="${GPU_PACK_BINARY:-}"
if [ -z "$binary" ]; then
    bash scripts/setup.sh --gpu cuda
    # Not this CPU's instruction set (.cargo/config.toml's target-cpu=native):
    # the GPU machine's CPU is another.
    log "building --features cuda into target/cuda (long the first time)"
    RUSTFLAGS="" CARGO_TARGET_DIR=target/cuda nice cargo build --release --features cuda --bin elpis-server >&2
    binary=target/cuda/release/elpis-server
fi
model="$(bash scripts/fetch-model.sh qwen)"

rm -rf "$pack"
mkdir -p "$pack"
staged="$(mktemp -d)"
trap 'rm -rf "$staged"' EXIT
cp "$binary" "$staged/elpis-server"
strip "$staged/elpis-server"
tar -cJf "$pack/elpis-server.tar.xz" -C "$staged" elpis-server

# gguf (and numpy, here only) in a venv of the pack's own.
venv="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}/gguf-venv"
if ! "$venv/bin/python" -c "import gguf" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "gguf==$gguf_version" >&2
fi
"$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$pack" "gguf==$gguf_version" >&2
"$venv/bin/python" scripts/gpu-model.py vocab "$model" "$pack/vocab.gguf"

size_mib=$(( $(du -sb "$pack" | cut -f1) >> 20 ))
ls -la "$pack" >&2
if [ "$size_mib" -ge "$limit_mib" ]; then
    log "$pack is $size_mib MiB, over the $limit_mib MiB a call to a lent machine carries"
    exit 1
fi
log "$pack: $size_mib MiB. On the GPU machine, from the repository's root: bash scripts/gpu-check.sh $pack"
