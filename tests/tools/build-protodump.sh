#!/usr/bin/env bash
# Builds the protobuf schema checker (tests/interop/protodump, a Go module on opamp-go's
# generated protobufs package) into target/tools/bin/opamp-protodump. Cached by a hash
# of its sources, so it is rebuilt only when they change. Run from anywhere in the repo.
#
#   opamp-protodump                 print opamp-go's schema, one sorted line per item
#   opamp-protodump -compare FDS    check a binary FileDescriptorSet of proto/*.proto
#                                   against it (exit 0 ok, 1 mismatch, 2 bad input)
source "$(dirname "$0")/cache.sh"

build_protodump() {
  local out=$1
  (
    cd "$REPO_ROOT/tests/interop/protodump"
    # go.sum is committed: verify against it instead of editing it.
    GOFLAGS="${GOFLAGS/-mod=mod/} -mod=readonly" \
      nice -n 10 go build -trimpath -o "$out/bin/opamp-protodump" .
  )
}

cached_build protodump "$(source_key tests/interop/protodump)" build_protodump
