#!/usr/bin/env bash
# Builds the service images without any registry, the way deploy/agent-image/build-offline.sh
# builds the agent image:
#
#   claudecluster/claudecluster:0.1.0   driver, scheduler, MCP server: the `claudecluster` binary
#   claudecluster/worker:0.1.0          the same binary and the Claude Code CLI's native binary
#
# Both stand on one base: a Debian minbase root filesystem made with debootstrap from the
# mirror apt is configured with (ca-certificates, git), a user `claudecluster`
# (uid 10001) and /var/lib/claudecluster owned by it, imported with `docker import`. The
# binaries go on top as layers of their own (`docker commit`), in the order they change: the
# CLI below the service binary in the worker image, so that a new service binary adds one small
# layer to each image and nothing else.
#
# Every image carries a label with a hash of its inputs and is rebuilt only when they change:
# a second run with the same binaries does nothing. The root filesystem is cached as a tarball
# under ${XDG_CACHE_HOME:-~/.cache}/claudecluster, so that debootstrap runs once per recipe.
#
#   build-offline.sh [CLAUDECLUSTER_BINARY] [CLAUDE_BINARY]
#
# CLAUDECLUSTER_BINARY defaults to $CLAUDECLUSTER_BIN, else the release build in the cargo
# target directory, which `cargo build --release --locked --bin claudecluster` first brings up
# to date. CLAUDE_BINARY defaults to `claude` on PATH (or $CLAUDE_BIN), resolved to the native
# executable behind npm's wrapper. CLAUDECLUSTER_IMAGE and CLAUDECLUSTER_WORKER_IMAGE name the
# images. Where a registry is reachable, deploy/docker/Dockerfile builds the same images.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
script="$here/$(basename "$0")"
image="${CLAUDECLUSTER_IMAGE:-claudecluster/claudecluster:0.1.0}"
worker_image="${CLAUDECLUSTER_WORKER_IMAGE:-claudecluster/worker:0.1.0}"
cache="${CLAUDECLUSTER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/claudecluster}"
log() { printf 'service-images: %s\n' "$*" >&2; }

# What the base is made of: a change here makes a new root filesystem, and nothing else does
# (so a change to how it is made below goes with a new version at the recipe's end).
suite="bookworm"
packages="ca-certificates,git"
service_uid=10001
recipe="debootstrap --variant=minbase --include=$packages $suite; user claudecluster $service_uid; /var/lib/claudecluster; no docs; v1"

# The service binary.
binary="${1:-${CLAUDECLUSTER_BIN:-}}"
if [ -z "$binary" ]; then
  # Brought up to date rather than taken as found: an image of a stale binary fails on the
  # configuration files of the sources beside it. Cargo does nothing when it is current.
  binary="${CARGO_TARGET_DIR:-$repo/target}/release/claudecluster"
  log "cargo build --release --locked --bin claudecluster"
  (cd "$repo" && cargo build --release --locked --bin claudecluster)
fi
[ -x "$binary" ] || { log "$binary is not an executable"; exit 1; }
binary="$(readlink -f "$binary")"

# The Claude Code CLI: npm installs a wrapper script; the native binary sits beside it.
claude="${2:-${CLAUDE_BIN:-$(command -v claude || true)}}"
[ -n "$claude" ] || { log "no claude binary given and none on PATH"; exit 1; }
claude="$(readlink -f "$claude")"
if ! head -c 4 "$claude" | grep -q 'ELF'; then
  native="$(dirname "$claude")/claude.exe"
  [ -f "$native" ] || native="$(dirname "$claude")/../bin/claude.exe"
  claude="$(readlink -f "$native")"
fi
head -c 4 "$claude" | grep -q 'ELF' || { log "$claude is not a native executable"; exit 1; }

sha() { sha256sum "$@" | cut -d' ' -f1; }
short() { printf '%s' "$1" | cut -c1-16; }
label_of() { docker image inspect -f '{{ index .Config.Labels "claudecluster.content-hash" }}' "$1" 2>/dev/null || true; }
image_id() { docker image inspect -f '{{ .Id }}' "$1" 2>/dev/null || true; }

base_hash="$(printf '%s' "$recipe" | sha256sum | cut -d' ' -f1)"
binary_hash="$(sha "$binary")"
claude_hash="$(sha "$claude")"
script_hash="$(sha "$script")"
service_hash="$(printf '%s\n' "$script_hash" "$base_hash" "$binary_hash" | sha256sum | cut -d' ' -f1)"
worker_hash="$(printf '%s\n' "$script_hash" "$base_hash" "$claude_hash" "$binary_hash" | sha256sum | cut -d' ' -f1)"
if [ "$(label_of "$image")" = "$service_hash" ] && [ "$(label_of "$worker_image")" = "$worker_hash" ]; then
  log "$image and $worker_image are up to date"
  exit 0
fi

work="$(mktemp -d)"
containers=()
cleanup() {
  for id in "${containers[@]}"; do docker rm -f "$id" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# The root filesystem, made once per recipe and kept as a tarball.
mkdir -p "$cache"
rootfs_tar="$cache/service-rootfs-$(short "$base_hash").tar"
if [ ! -f "$rootfs_tar" ]; then
  # The Debian mirror apt uses (not a third-party repository that may be listed beside it).
  mirror="$( (grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true) \
    | head -n1 | awk '{print $2}')"
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs="$work/rootfs"
  log "debootstrap $suite from $mirror"
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >/dev/null
  chroot "$rootfs" groupadd --gid "$service_uid" claudecluster
  chroot "$rootfs" useradd --uid "$service_uid" --gid "$service_uid" --create-home \
    --home-dir /home/claudecluster --shell /usr/sbin/nologin claudecluster
  # The driver's store and the workers' workspaces: a volume mounted here starts with this
  # directory's owner, so that the services may write to it on a read-only root filesystem.
  install -d -o "$service_uid" -g "$service_uid" -m 0750 "$rootfs/var/lib/claudecluster"
  # What no service reads: package caches, documentation, manuals and translations.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old
  tar -C "$rootfs" -cf "$rootfs_tar.partial" .
  mv "$rootfs_tar.partial" "$rootfs_tar"
  rm -rf "$rootfs"
  # Tarballs of earlier recipes are of no further use.
  find "$cache" -maxdepth 1 -name 'service-rootfs-*.tar' ! -path "$rootfs_tar" -delete
fi

# Removes `repository`'s tags other than `keep`, and the images they held when nothing else
# uses them.
drop_other_tags() {
  local repository="$1" keep="$2" tag
  docker image ls --format '{{.Repository}}:{{.Tag}}' "$repository" | while read -r tag; do
    [ "$tag" = "$keep" ] || docker rmi "$tag" >/dev/null 2>&1 || true
  done
}

base="claudecluster/service-base:$(short "$base_hash")"
if [ "$(label_of "$base")" != "$base_hash" ]; then
  log "importing $base"
  docker import \
    --change "USER $service_uid:$service_uid" \
    --change 'WORKDIR /var/lib/claudecluster' \
    --change 'ENV HOME=/home/claudecluster' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL claudecluster.content-hash=$base_hash" \
    "$rootfs_tar" "$base" >/dev/null
  drop_other_tags claudecluster/service-base "$base"
fi

# Puts `file` at `path` (mode 0755) on top of image `from` and commits the result as `to`,
# with `hash` as its content hash. The image it replaces is removed when nothing else uses it.
add_layer() {
  local from="$1" file="$2" path="$3" to="$4" hash="$5" title="$6" previous id
  previous="$(image_id "$to")"
  id="$(docker create "$from" /bin/true)"
  containers+=("$id")
  # Through a directory of its own, so that the file arrives with the owner and mode wanted.
  local stage="$work/stage-$hash"
  mkdir -p "$stage"
  install -m 0755 "$file" "$stage/$(basename "$path")"
  tar -C "$stage" --owner=0 --group=0 -cf - "$(basename "$path")" | docker cp - "$id:$(dirname "$path")"
  docker commit \
    --change "USER $service_uid:$service_uid" \
    --change 'ENTRYPOINT ["claudecluster"]' \
    --change 'CMD ["--help"]' \
    --change "LABEL claudecluster.content-hash=$hash" \
    --change "LABEL org.opencontainers.image.title=$title" \
    --change "LABEL org.opencontainers.image.version=0.1.0" \
    --change "LABEL org.opencontainers.image.source=https://github.com/claudecluster/claudecluster" \
    "$id" "$to" >/dev/null
  docker rm -f "$id" >/dev/null
  rm -rf "$stage"
  if [ -n "$previous" ] && [ "$previous" != "$(image_id "$to")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
  fi
}

# A stripped copy: debug symbols are of no use in an image and are most of a debug build.
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug -o "$work/claudecluster" "$binary"
else
  cp "$binary" "$work/claudecluster"
fi

if [ "$(label_of "$image")" != "$service_hash" ]; then
  log "building $image"
  add_layer "$base" "$work/claudecluster" /usr/local/bin/claudecluster "$image" "$service_hash" claudecluster
fi

# The CLI's layer, kept as an image of its own so that a new service binary does not copy the
# CLI again.
with_claude_hash="$(printf '%s\n' "$base_hash" "$claude_hash" | sha256sum | cut -d' ' -f1)"
with_claude="claudecluster/worker-base:$(short "$with_claude_hash")"
if [ "$(label_of "$worker_image")" != "$worker_hash" ]; then
  if [ "$(label_of "$with_claude")" != "$with_claude_hash" ]; then
    log "adding the Claude Code CLI to $with_claude"
    add_layer "$base" "$claude" /usr/local/bin/claude "$with_claude" "$with_claude_hash" claudecluster-worker-base
    drop_other_tags claudecluster/worker-base "$with_claude"
  fi
  log "building $worker_image"
  add_layer "$with_claude" "$work/claudecluster" /usr/local/bin/claudecluster "$worker_image" "$worker_hash" claudecluster-worker
fi

for built in "$image" "$worker_image"; do
  log "$built: $(docker image inspect -f '{{ .Size }}' "$built") bytes"
done
