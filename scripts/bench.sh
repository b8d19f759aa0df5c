#!/usr/bin/env bash
# Measures the cluster against baselines taken in the same run and prints a Markdown table.
# Uses the real Claude Code CLI against the project's stand-in API on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CLAUDECLUSTER_CACHE_DIR/target}"
export CLAUDECLUSTER_LOG="${CLAUDECLUSTER_LOG:-warn}"
cargo build --release --locked --workspace --bins
exec "$CARGO_TARGET_DIR/release/cluster-bench" "$@"
