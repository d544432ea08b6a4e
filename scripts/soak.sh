#!/usr/bin/env bash
# Soak: random mixed operations (streams started, read, cancelled; generates
# with and without cancels; emotion calls) for a set time, then checks that
# nothing crashed, every request was answered, no stream or generation is
# left and RSS grew under 5 % after warm-up. Prints the figures as JSON.
#   scripts/soak.sh [--seconds 600] [--seed 7]
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/prepare.sh
exec target/release/elpis-server soak "$@"
