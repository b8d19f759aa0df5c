#!/usr/bin/env bash
# Runs a benchmark section of this checkout and of an earlier revision in turn, on the same
# machine in the same run, so that a figure can be set against what the code did before:
#
#   scripts/bench-against.sh REV [SECTION] [ROUNDS]
#
# e.g. `scripts/bench-against.sh d39e146 process 2` compares live streaming with the driver's
# store against the in-memory driver that came before it. The earlier revision is built in a
# worktree under the cache directory, with a target directory of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: scripts/bench-against.sh REV [SECTION] [ROUNDS]}"
section="${2:-process}"
rounds="${3:-2}"
eval "$(scripts/setup.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CLAUDECLUSTER_CACHE_DIR/target}"
export CLAUDECLUSTER_LOG="${CLAUDECLUSTER_LOG:-warn}"
cargo build --release --locked --workspace --bins
earlier="$CLAUDECLUSTER_CACHE_DIR/bench-against/$rev"
if [ ! -d "$earlier" ]; then
  git worktree add --detach "$earlier" "$rev" >&2
fi
(cd "$earlier" && CARGO_TARGET_DIR="$CLAUDECLUSTER_CACHE_DIR/bench-against-target" \
  cargo build --release --locked --workspace --bins >&2)
for round in $(seq 1 "$rounds"); do
  echo "## round $round: $rev"
  (cd "$earlier" && "$CLAUDECLUSTER_CACHE_DIR/bench-against-target/release/cluster-bench" "$section")
  echo "## round $round: this checkout"
  "$CARGO_TARGET_DIR/release/cluster-bench" "$section"
done
