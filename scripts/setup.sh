#!/usr/bin/env bash
# Install what building Elpis needs on a fresh Debian/Ubuntu machine:
# cmake, clang and libclang (llama-cpp-sys-2 compiles llama.cpp and runs
# bindgen). Idempotent; everything it prints goes to stderr, so stdout stays
# free for the MCP protocol when a client runs scripts/run.sh.
set -euo pipefail

log() { echo "setup: $*" >&2; }

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v clang >/dev/null 2>&1 || missing+=(clang)
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libclang; then
    missing+=(libclang-dev)
fi

if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { log "need root (or sudo) to apt-get install ${missing[*]}"; exit 1; }
        SUDO="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2
    $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: install Rust from https://rustup.rs"
    exit 1
fi
