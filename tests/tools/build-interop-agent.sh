#!/usr/bin/env bash
# Builds the OpAMP interop test agent (tests/interop/agent, a Go module on opamp-go's
# client package) into target/tools/bin/opamp-interop-agent. Cached by a hash of its
# sources, so it is rebuilt only when they change. Run from anywhere in the repo.
source "$(dirname "$0")/cache.sh"

build_interop_agent() {
  local out=$1
  (
    cd "$REPO_ROOT/tests/interop/agent"
    # go.sum is committed: verify against it instead of editing it.
    GOFLAGS="${GOFLAGS/-mod=mod/} -mod=readonly" \
      nice -n 10 go build -trimpath -o "$out/bin/opamp-interop-agent" .
  )
}

cached_build interop-agent "$(source_key tests/interop/agent)" build_interop_agent
