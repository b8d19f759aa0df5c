#!/usr/bin/env bash
# Runs the embedded cluster (driver, scheduler and one process-pool worker) on its defaults:
# DriverService on 127.0.0.1:50051. Installs the pinned Claude Code CLI first when missing.
# Agents need ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

version="2.1.328"
cache_dir="${CLAUDECLUSTER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/claudecluster}"
if ! command -v claude >/dev/null 2>&1; then
  claude_dir="$cache_dir/claude-code-$version"
  if [ ! -x "$claude_dir/node_modules/.bin/claude" ]; then
    echo "up: installing @anthropic-ai/claude-code@$version into $claude_dir" >&2
    npm install --prefix "$claude_dir" --no-audit --no-fund --loglevel=error \
      "@anthropic-ai/claude-code@$version" >/dev/null
  fi
  export CLAUDECLUSTER_WORKER__PROCESS_POOL__CLAUDE_CODE_PATH="$claude_dir/node_modules/.bin/claude"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache_dir/target}"
exec cargo run --release --locked -p claudecluster -- up "$@"
