#!/usr/bin/env bash
# Build the peer a user would pick instead of Elpis, llama.cpp's own
# llama-server, natively for this CPU (llama.cpp's defaults: GGML_NATIVE on,
# OpenMP), from the llama.cpp that llama-cpp-python's source release vendors
# on PyPI, and cache it. Prints the binary's path on stdout (everything else
# goes to stderr). Used by scripts/peer-bench.py; not part of CI.
#
#   scripts/peer.sh            # build once, then print the cached path
#   PEER_VERSION=0.3.36 scripts/peer.sh
set -euo pipefail
cd "$(dirname "$0")/.."

version="${PEER_VERSION:-0.3.36}"
cache="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}/peer/llama-cpp-python-$version"
bin="$cache/build/bin/llama-server"
log() { echo "peer: $*" >&2; }

if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi

bash scripts/setup.sh
command -v g++ >/dev/null 2>&1 || { log "need a C++ compiler (apt-get install g++)"; exit 1; }
mkdir -p "$cache"
if [ ! -d "$cache/src" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    log "downloading llama-cpp-python==$version's source release from PyPI"
    # The file itself, found in PyPI's index and checked against the hash
    # the index gives: `pip download --no-binary` would first build the
    # package's build tools (cmake, ninja) from source to read its metadata.
    python3 - "$version" "$tmp" <<'PY' >&2
import hashlib, json, sys, urllib.request
version, into = sys.argv[1], sys.argv[2]
name = f"llama_cpp_python-{version}.tar.gz"
index = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/",
                               headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(index, timeout=60))["files"]
entry = next((f for f in files if f["filename"] == name), None)
if entry is None:
    sys.exit(f"peer: PyPI has no {name}")
data = urllib.request.urlopen(entry["url"], timeout=600).read()
if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
    sys.exit(f"peer: {name} does not match the sha256 PyPI gives")
open(f"{into}/{name}", "wb").write(data)
PY
    tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
    mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp" "$cache/src"
fi
log "building llama-server (native, Release): several minutes"
cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$cache/build" --target llama-server llama-bench -j "$(nproc)" >&2
[ -x "$bin" ] || { log "the build made no $bin"; exit 1; }
echo "$bin"
