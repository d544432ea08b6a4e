#!/usr/bin/env bash
# Elpis on an NVIDIA GPU, in one command, on a machine with no Rust and no
# network (such as a lent GPU machine): what scripts/gpu-pack.sh packed
# here (the CUDA build, a tokenizer, llama.cpp's gguf package) plus python3
# with numpy there. It writes a random-weight model of real dimensions
# (scripts/gpu-model.py: Llama 3.1 8B's by default, Q4_K), then, with every
# layer on the GPU:
#   1. get_capabilities: the device, its memory, the layers offloaded;
#   2. Psyche's recorded sessions replayed (idle thoughts, interrupts,
#      streams, mood polls, cancels, shutdowns): the rules of sessions.md;
#   3. `elpis-server bench --runs 1`: streams with quick calls (p99 in
#      steps), prompt and decode speed against the raw llama.cpp loop.
# The figures go to stdout and, with the logs, to $OUT (else
# /tmp/elpis-gpu). Under 8 minutes on an H200 with the 8B shape.
#
#   bash scripts/gpu-check.sh [PACK_DIR]            # default: gpu-pack
#   GPU_CHECK_SHAPE=qwen2-0.5b bash scripts/gpu-check.sh
#   GPU_CHECK_BINARY=target/release/elpis-server GPU_CHECK_SHAPE=tiny \
#       bash scripts/gpu-check.sh                   # the script itself, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."

pack="${1:-gpu-pack}"
shape="${GPU_CHECK_SHAPE:-llama-8b}"
out="${OUT:-/tmp/elpis-gpu}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
log() { echo "gpu-check: $*" >&2; }
started=$SECONDS

# The binary: given, or unpacked from the pack.
binary="${GPU_CHECK_BINARY:-}"
if [ -z "$binary" ]; then
    [ -f "$pack/elpis-server.tar.xz" ] || { log "no $pack/elpis-server.tar.xz: run scripts/gpu-pack.sh where Rust is"; exit 2; }
    tar -xJf "$pack/elpis-server.tar.xz" -C "$work"
    binary="$work/elpis-server"
fi

# llama.cpp's gguf package from the pack where python3 lacks it.
if ! python3 -c "import gguf" 2>/dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$work/site" "$pack"/gguf-*.whl
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The CUDA runtime and cuBLAS the build links (13.x): a toolkit's, or the
# NVIDIA wheels' in python3's site-packages.
libs="$(python3 - <<'EOF'
import glob, os, site, sys
roots = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
for base in site.getsitepackages() + [site.getusersitepackages()]:
    roots += glob.glob(os.path.join(base, "nvidia", "*", "lib"))
found = []
for name in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13"):
    for root in roots:
        if os.path.exists(os.path.join(root, name)):
            found.append(root)
            break
print(":".join(dict.fromkeys(found)))
EOF
)"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing="$(ldd "$binary" | grep "not found" || true)"
[ -z "$missing" ] || { log "the binary's libraries are not all here:"; echo "$missing" >&2; exit 1; }
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$out/nvidia-smi.csv"

model="$work/$shape.gguf"
vocab="${GPU_CHECK_VOCAB:-$pack/vocab.gguf}"
[ -f "$vocab" ] || { log "no $vocab: run scripts/gpu-pack.sh, or set GPU_CHECK_VOCAB to a GGUF with a tokenizer"; exit 2; }
python3 scripts/gpu-model.py build "$vocab" "$model" --shape "$shape"
log "model written in $((SECONDS - started)) s"

# Every layer on the device; the host's threads as a user would leave them;
# vectors and saved prompts in the scratch folder.
export ELPIS_MODEL_PATH="$model" ELPIS_MODEL_GPU_LAYERS="${ELPIS_MODEL_GPU_LAYERS:-all}"
export ELPIS_CACHE_DIR="$work/cache" ELPIS_LOGGING_LEVEL=warn

echo "== capabilities"
python3 - "$binary" <<'EOF' | tee "$out/capabilities.json"
import json, subprocess, sys
server = subprocess.Popen([sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
def send(message):
    server.stdin.write(json.dumps(message) + "\n")
    server.stdin.flush()
send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
      "capabilities": {}, "clientInfo": {"name": "gpu-check", "version": "1"}}})
send({"jsonrpc": "2.0", "method": "notifications/initialized"})
send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get_capabilities", "arguments": {}}})
for line in server.stdout:
    reply = json.loads(line)
    if reply.get("id") == 2:
        caps = json.loads(reply["result"]["content"][0]["text"])
        print(json.dumps({k: caps.get(k) for k in ("model_name", "parameters", "model_size_bytes", "threads", "slots", "gpu_layers", "gpu", "kv_bytes")}, indent=1))
        break
server.stdin.close()
server.wait(timeout=60)
EOF

echo "== Psyche's sessions, replayed"
# Waits at 4x: the sessions' shape, in a minute or two. Only a hang counts
# as a stall here; the latencies are printed.
"$binary" replay --json --speed 4 --stall-s 60 tests/sessions/*.jsonl > "$out/replay.jsonl" 2> "$out/replay.log" || replay_failed=1
python3 - "$out/replay.jsonl" <<'EOF'
import json, sys
reports = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in reports:
    print(f"{r['session']:32} quick calls p99 {r['quick_p99_ms']:7.1f} ms  {r['duration_s']:6.1f} s  rules broken {len(r['violations'])}")
print(f"{sum(not r['violations'] for r in reports)} of {len(reports)} sessions kept every rule")
EOF
log "replayed by $((SECONDS - started)) s"

echo "== bench (one run)"
# At most 6 minutes, so that the whole check fits a lent machine's 8.
timeout "${GPU_CHECK_BENCH_S:-360}" "$binary" bench --runs 1 --out "$out/bench.json" 2> "$out/bench.log" | tee "$out/bench.txt"
log "done in $((SECONDS - started)) s"
[ -z "${replay_failed:-}" ] || { log "a replayed session broke a rule (see $out/replay.jsonl)"; exit 1; }
