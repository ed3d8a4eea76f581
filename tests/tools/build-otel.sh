#!/usr/bin/env bash
# Builds the OpenTelemetry pieces of the e2e tests, cached by version and a hash of our sources
# (rebuilt only when they change), linked into target/tools/bin. Run from anywhere in the repo.
#
#   otelcol-opamp-test  a collector built with the OpenTelemetry Collector Builder (OCB) from
#                       tests/interop/otelcol/manifest.yaml: otlp and nop receivers, debug and
#                       nop exporters (nop: the supervisor's fallback bootstrap pipeline), the
#                       opamp extension and our opampecho extension (tests/interop/otelcol/
#                       echoextension: registers a custom capability, echoes custom messages)
#   opampsupervisor     the OpAMP supervisor, through the wrapper module in
#                       tests/interop/supervisor (its upstream go.mod has replace directives, so
#                       `go install ...@version` cannot build it; go.mod/go.sum pin the versions)
#
# Only v0.149.0 of the contrib modules is on the proxy; the manifest, the echo extension's go.mod
# and the wrapper's go.mod all pin it (core v0.149.0 pairs with the stable modules at v1.55.0).
source "$(dirname "$0")/cache.sh"

OTEL_VERSION=v0.149.0
OTELCOL_DIR="$REPO_ROOT/tests/interop/otelcol"

build_otelcol() {
  local out=$1
  (
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    log "go install go.opentelemetry.io/collector/cmd/builder@$OTEL_VERSION"
    GOBIN="$work/bin" GOFLAGS="${GOFLAGS/-mod=mod/}" \
      nice -n 10 go install "go.opentelemetry.io/collector/cmd/builder@$OTEL_VERSION"
    # OCB resolves a relative replace against its output dir: give it absolute paths.
    sed -e "s|@OUTPUT_PATH@|$work/dist|" -e "s|@ECHOEXTENSION_DIR@|$OTELCOL_DIR/echoextension|" \
      "$OTELCOL_DIR/manifest.yaml" >"$work/manifest.yaml"
    # Generates a module in $work/dist, `go mod tidy`s it and builds it (-trimpath, -ldflags "-s -w").
    nice -n 10 "$work/bin/builder" --config "$work/manifest.yaml" 2>"$work/builder.log" || {
      cat "$work/builder.log" >&2
      exit 1
    }
    mv "$work/dist/otelcol-opamp-test" "$out/bin/otelcol-opamp-test"
    "$out/bin/otelcol-opamp-test" --version >&2
  )
}

build_opampsupervisor() {
  local out=$1
  (
    cd "$REPO_ROOT/tests/interop/supervisor"
    # go.sum is committed: verify against it instead of editing it.
    GOFLAGS="${GOFLAGS/-mod=mod/} -mod=readonly" \
      nice -n 10 go build -trimpath -ldflags "-s -w" -o "$out/bin/opampsupervisor" \
      github.com/open-telemetry/opentelemetry-collector-contrib/cmd/opampsupervisor
  )
}

cached_build otelcol "$OTEL_VERSION-$(source_key tests/interop/otelcol)" build_otelcol
cached_build opampsupervisor "$OTEL_VERSION-$(source_key tests/interop/supervisor)" build_opampsupervisor
