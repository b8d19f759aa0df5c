#!/usr/bin/env bash
# Builds the agent image without any registry: a Debian minbase root filesystem made with
# debootstrap from the mirror apt is configured with (git; socat, which forwards an agent's
# connections to the worker's credential proxy when it has no network), a non-root `agent`
# user (uid 1000), /workspace, and the Claude Code CLI's native binary, imported with
# `docker import`.
#
# The image carries a label with a hash of its inputs (this script and the CLI binary); when
# an image with the same hash exists, nothing is rebuilt.
#
#   build-offline.sh [IMAGE] [CLAUDE_BINARY]
#
# IMAGE defaults to claudecluster/agent:2.1.328 (also tagged :latest); CLAUDE_BINARY to the
# `claude` on PATH (or CLAUDE_BIN), resolved to the native executable behind npm's wrapper.
set -euo pipefail

image="${1:-claudecluster/agent:2.1.328}"
claude="${2:-${CLAUDE_BIN:-$(command -v claude || true)}}"
suite="bookworm"
log() { printf 'agent-image: %s\n' "$*" >&2; }

[ -n "$claude" ] || { log "no claude binary given and none on PATH"; exit 1; }
claude="$(readlink -f "$claude")"
# npm installs a wrapper script; the native binary sits beside it as claude.exe.
if ! head -c 4 "$claude" | grep -q 'ELF'; then
  native="$(dirname "$claude")/claude.exe"
  [ -f "$native" ] || native="$(dirname "$claude")/../bin/claude.exe"
  claude="$(readlink -f "$native")"
fi
head -c 4 "$claude" | grep -q 'ELF' || { log "$claude is not a native executable"; exit 1; }

hash="$( (sha256sum "$0" | cut -d' ' -f1; sha256sum "$claude" | cut -d' ' -f1; echo "$suite") | sha256sum | cut -d' ' -f1)"
existing="$(docker image inspect -f '{{ index .Config.Labels "claudecluster.content-hash" }}' "$image" 2>/dev/null || true)"
if [ "$existing" = "$hash" ]; then
  log "$image is up to date"
  exit 0
fi

# The Debian mirror apt uses (not a third-party repository that may be listed beside it).
mirror="$( (grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true) \
  | head -n1 | awk '{print $2}')"
mirror="${mirror:-http://deb.debian.org/debian}"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT

log "debootstrap $suite from $mirror"
debootstrap --variant=minbase --include=ca-certificates,git,socat "$suite" "$rootfs" "$mirror" >/dev/null
chroot "$rootfs" useradd --uid 1000 --create-home --home-dir /home/agent --shell /bin/bash agent
mkdir -p "$rootfs/workspace"
chroot "$rootfs" chown agent:agent /workspace
install -m 0755 "$claude" "$rootfs/usr/local/bin/claude"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

log "importing $image"
tar -C "$rootfs" -c . | docker import \
  --change 'USER agent' \
  --change 'WORKDIR /workspace' \
  --change 'ENV HOME=/home/agent' \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
  --change "LABEL claudecluster.content-hash=$hash" \
  --change 'CMD ["claude", "--help"]' \
  - "$image" >/dev/null
docker tag "$image" "${image%:*}:latest"
log "built $image"
