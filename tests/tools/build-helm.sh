#!/usr/bin/env bash
# Builds helm v3 from the Go module proxy (helm's go.mod has no replace directives, so a plain
# `go install pkg@version` works; go.sum verification comes from the checksum database).
#
# Output: $OPAMP_TOOLS_CACHE/helm-<version>/bin/helm, linked into target/tools/bin/.
source "$(dirname "$0")/cache.sh"

HELM_VERSION=v3.22.0
# Kubernetes version helm assumes when it has no cluster (`helm template`, `helm lint`
# deprecation checks). Upstream's Makefile derives it from helm's client-go (1.37 for this
# release); we pin it to the control plane the tests run (tests/tools/k8s, Kubernetes 1.34).
HELM_K8S_MAJOR=1
HELM_K8S_MINOR=34

build_helm() {
  local out=$1 ldf="-s -w" p
  ldf="$ldf -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldf="$ldf -X helm.sh/helm/v3/internal/version.metadata="
  ldf="$ldf -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldf="$ldf -X $p.k8sVersionMajor=$HELM_K8S_MAJOR -X $p.k8sVersionMinor=$HELM_K8S_MINOR"
  done
  # `go install pkg@version` ignores any enclosing module; -mod=mod (cache.sh) is not allowed here.
  (cd "$out" && GOFLAGS="-buildvcs=false -trimpath" GOBIN="$out/bin" \
    nice -n 15 go install -ldflags "$ldf" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
  "$out/bin/helm" version >&2
}

cached_build helm "${HELM_VERSION#v}-k8s$HELM_K8S_MAJOR.$HELM_K8S_MINOR" build_helm
