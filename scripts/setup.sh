#!/usr/bin/env bash
# Install what building Elpis needs on a fresh Debian/Ubuntu machine:
# cmake, clang and libclang (llama-cpp-sys-2 compiles llama.cpp and runs
# bindgen). Idempotent; everything it prints goes to stderr, so stdout stays
# free for the MCP protocol when a client runs scripts/run.sh.
#
# `--gpu vulkan` adds what `cargo build --features vulkan` needs: glslc,
# SPIR-V headers, the Vulkan loader, Mesa's drivers (lavapipe: a Vulkan
# device on the CPU) and Vulkan headers new enough for ggml-vulkan (1.4,
# from Debian 13's libvulkan-dev, headers only, into /usr/local/include).
# `--gpu cuda` adds the CUDA toolkit from NVIDIA's wheels on PyPI (nvcc,
# the runtime, cuBLAS) as /usr/local/cuda, unless a toolkit is there.
set -euo pipefail

log() { echo "setup: $*" >&2; }

gpu=""
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) gpu="${2:-}"; shift 2 ;;
        --gpu=*) gpu="${1#--gpu=}"; shift ;;
        *) log "unknown argument $1 (expected --gpu cuda|vulkan)"; exit 2 ;;
    esac
done
case "$gpu" in
    ""|cuda|vulkan) ;;
    *) log "--gpu $gpu: expected cuda or vulkan"; exit 2 ;;
esac
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v clang >/dev/null 2>&1 || missing+=(clang)
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libclang; then
    missing+=(libclang-dev)
fi

if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    if [ -n "$SUDO" ]; then
        command -v sudo >/dev/null 2>&1 || { log "need root (or sudo) to apt-get install ${missing[*]}"; exit 1; }
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2
    $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: install Rust from https://rustup.rs"
    exit 1
fi

cache="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}"

if [ "$gpu" = vulkan ]; then
    need=()
    command -v glslc >/dev/null 2>&1 || need+=(glslc)
    [ -d /usr/include/spirv ] || need+=(spirv-headers)
    ldconfig -p 2>/dev/null | grep -q 'libvulkan.so ' || need+=(libvulkan-dev)
    ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -qq >&2
        $SUDO apt-get install -y -qq "${need[@]}" >&2
    fi
    # ggml-vulkan needs Vulkan-Hpp 1.4 (vk::LayerSettingEXT); Debian 12 has
    # 1.3.239. Debian 13's headers, and nothing else of it, go to
    # /usr/local/include, which the compiler reads before /usr/include.
    have="$(sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\).*/\1/p' /usr/local/include/vulkan/vulkan_core.h /usr/include/vulkan/vulkan_core.h 2>/dev/null | sort -n | tail -1 || true)"
    if [ "${have:-0}" -lt 300 ]; then
        log "fetching Vulkan 1.4 headers (Debian 13's libvulkan-dev)"
        tmp="$(mktemp -d)"
        mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb"
        echo "deb http://deb.debian.org/debian trixie main" >"$tmp/sources.list"
        opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o APT::Sandbox::User=root)
        apt-get "${opts[@]}" update -qq >&2
        (cd "$tmp/deb" && apt-get "${opts[@]}" download libvulkan-dev >&2)
        dpkg -x "$tmp"/deb/libvulkan-dev_*.deb "$tmp/x"
        $SUDO mkdir -p /usr/local/include
        $SUDO cp -r "$tmp/x/usr/include/vulkan" "$tmp/x/usr/include/vk_video" /usr/local/include/
        rm -rf "$tmp"
    fi
fi

if [ "$gpu" = cuda ]; then
    if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
        log "a CUDA toolkit is installed: using it"
    else
        # NVIDIA's toolkit wheels unpack into one tree (nvidia/cu13): nvcc,
        # cicc, headers, the runtime and cuBLAS. CUDA 13.0 (driver 580 and later).
        root="$cache/cuda-13.0"
        if [ ! -x "$root/nvidia/cu13/bin/nvcc" ]; then
            log "installing the CUDA 13.0 toolkit from PyPI into $root (about 1 GB)"
            python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$root" \
                "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-runtime==13.0.96" \
                "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85" "nvidia-cublas==13.0.2.14" >&2
        fi
        tree="$root/nvidia/cu13"
        # The layout a toolkit has: lib64, unversioned libraries to link.
        ln -sfn lib "$tree/lib64"
        for lib in cudart cublas cublasLt; do
            ln -sf "lib$lib.so.13" "$tree/lib/lib$lib.so"
        done
        # The wheels carry cuBLAS as shared libraries only, and
        # llama-cpp-sys-2 names the static ones: empty archives stand in
        # for them, and Elpis's build script links the shared ones.
        for lib in cublas_static cublasLt_static culibos; do
            [ -e "$tree/lib/lib$lib.a" ] || printf '!<arch>\n' >"$tree/lib/lib$lib.a"
        done
        touch "$tree/lib/.elpis-wheels"
        $SUDO ln -sfn "$tree" /usr/local/cuda
        log "CUDA toolkit at /usr/local/cuda -> $tree"
    fi
    # What llama.cpp's cmake needs to know and cannot find by itself, as
    # this machine's settings in cargo's own config (~/.cargo/config.toml):
    # the compiler, and the GPU architectures to build for (this machine's
    # GPUs; without one, ELPIS_CUDA_ARCHS or 90: H100/H200).
    archs="${ELPIS_CUDA_ARCHS:-}"
    if [ -z "$archs" ] && command -v nvidia-smi >/dev/null 2>&1; then
        archs="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d '. ' | sort -u | paste -sd';' || true)"
    fi
    archs="${archs:-90}"
    nvcc_path="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
    cargo_config="${CARGO_HOME:-$HOME/.cargo}/config.toml"
    mkdir -p "$(dirname "$cargo_config")"
    touch "$cargo_config"
    python3 - "$cargo_config" "$archs" "$nvcc_path" <<'PY'
import re, sys
path, archs, nvcc = sys.argv[1:]
text = open(path).read()
lines = [l for l in text.splitlines() if not re.match(r"\s*(CMAKE_CUDA_ARCHITECTURES|CUDACXX)\s*=", l)]
entries = [f'CMAKE_CUDA_ARCHITECTURES = "{archs}"', f'CUDACXX = "{nvcc}"']
if any(l.strip() == "[env]" for l in lines):
    i = next(i for i, l in enumerate(lines) if l.strip() == "[env]")
    lines[i + 1:i + 1] = entries
else:
    lines += ["", "[env]"] + entries
open(path, "w").write("\n".join(lines).strip() + "\n")
PY
    log "CUDA builds for sm_${archs//;/, sm_} with $nvcc_path (in $cargo_config; ELPIS_CUDA_ARCHS=... to change)"
fi
