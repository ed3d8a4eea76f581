#!/usr/bin/env bash
# Builds the opamp-go baseline server of the side-by-side benchmark (tests/bench/server, a Go
# module on opamp-go's server package) into target/tools/bin/opamp-bench-server. Cached by a
# hash of its sources, so it is rebuilt only when they change. Run from anywhere in the repo.
#
#   opamp-bench-server -addr 127.0.0.1:4320 -admin-addr 127.0.0.1:4399
#     POST /admin/config (body = config text) pushes it to every agent;
#     GET /admin/stats -> {"connected","applied","messages"}
source "$(dirname "$0")/cache.sh"

build_bench_server() {
  local out=$1
  (
    cd "$REPO_ROOT/tests/bench/server"
    # go.sum is committed: verify against it instead of editing it.
    GOFLAGS="${GOFLAGS/-mod=mod/} -mod=readonly" \
      nice -n 10 go build -trimpath -o "$out/bin/opamp-bench-server" .
  )
}

cached_build bench-server "$(source_key tests/bench/server)" build_bench_server
