#!/usr/bin/env bash
# Measures every figure of BENCHMARKS.md against its baseline, taken in the same run, and
# writes BENCHMARKS.md (a full run: under 10 minutes on 2 cores; `--quick`: under 2).
# `scripts/bench.sh [--quick] SECTION…` measures those sections only and prints them.
# Uses the real Claude Code CLI against the project's stand-in API on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CLAUDECLUSTER_CACHE_DIR/target}"
export CLAUDECLUSTER_LOG="${CLAUDECLUSTER_LOG:-warn}"
cargo build --release --locked --workspace --bins
exec "$CARGO_TARGET_DIR/release/cluster-bench" "$@"
