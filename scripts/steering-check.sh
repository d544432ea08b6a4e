#!/usr/bin/env bash
# Measure emotion steering on every test model: for each, `elpis-server
# steering-check` prints the next-token log-probability margin between
# positive and negative words after 24 neutral prompts under a positive and
# a negative mood (strength 1), checks that strength 0 gives the unsteered
# logits exactly, and compares decode speed with steering on and off.
# Computes a model's vectors first when the cache has none. A benchmark that
# prints numbers, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh
for name in gemma qwen smollm2; do
    model="$(bash scripts/fetch-model.sh "$name")"
    echo "== $name"
    ELPIS_MODEL_PATH="$model" target/release/elpis-server steering-check 2>/dev/null
done
