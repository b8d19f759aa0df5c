#!/usr/bin/env bash
# Runs every check and test of the project: formatting, lints, the protobuf lint, and all
# tests, including the whole-cluster tests with the real Claude Code CLI and Docker.
# Installs what is missing first (scripts/setup.sh). Works on a fresh machine, without stdin.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/setup.sh)"
# Build output lives outside the clone so that a fresh clone on this machine rebuilds only
# what changed.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CLAUDECLUSTER_CACHE_DIR/target}"
# Incremental state is kept per checkout path: a CI machine that clones afresh for every run
# would keep a copy per clone and fill its disk. Clean builds of the workspace's own crates do
# not need it.
if [ -n "${CI:-}" ]; then
  export CARGO_INCREMENTAL=0
fi
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s\n' "$*"; }

step "kubernetes manifests (schemas and references, no cluster)"
scripts/validate-kubernetes.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "buf lint"
buf lint

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the service binaries the tests start)"
cargo build --workspace --bins --locked

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
