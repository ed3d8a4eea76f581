#!/usr/bin/env bash
# Shared helpers for building the project's external test tools from registries.
#
# Outputs are cached outside the clone, in $OPAMP_TOOLS_CACHE (default
# ~/.cache/opamp-operator/tools), one directory per tool and version:
#   $OPAMP_TOOLS_CACHE/<name>-<key>/bin/<binaries>
# and every binary is linked into target/tools/bin/ of the clone. A fresh clone on a machine
# that already built a tool therefore only re-links it.
#
# Usage (from a script under tests/tools/):
#   source "$(dirname "$0")/cache.sh"
#   build_fn() { go build -o "$1/bin/thing" ./cmd/thing; }   # $1 = the (temporary) output dir
#   cached_build thing "$VERSION" build_fn

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OPAMP_TOOLS_CACHE="${OPAMP_TOOLS_CACHE:-$HOME/.cache/opamp-operator/tools}"
TOOLS_BIN="$REPO_ROOT/target/tools/bin"
export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -mod=mod"

log() { printf '[tools] %s\n' "$*" >&2; }

# Hash of files (for our own sources: the cache key changes whenever they change).
source_key() {
  (cd "$REPO_ROOT" && find "$@" -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16
}

# cached_build NAME KEY FUNCTION: run FUNCTION OUTDIR unless NAME-KEY is cached; link its bin/.
cached_build() {
  local name=$1 key=$2 fn=$3
  local dest="$OPAMP_TOOLS_CACHE/$name-$key"
  if [ ! -f "$dest/.complete" ]; then
    log "building $name ($key) into $dest"
    local tmp="$dest.tmp.$$"
    rm -rf "$tmp" && mkdir -p "$tmp/bin"
    local start=$SECONDS
    "$fn" "$tmp"
    touch "$tmp/.complete"
    rm -rf "$dest" && mv "$tmp" "$dest"
    log "built $name in $((SECONDS - start)) s"
  fi
  mkdir -p "$TOOLS_BIN"
  local f
  for f in "$dest"/bin/*; do
    ln -sfn "$f" "$TOOLS_BIN/$(basename "$f")"
  done
}
