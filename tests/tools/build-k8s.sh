#!/usr/bin/env bash
# Builds an envtest-style Kubernetes control plane (kube-apiserver, kubectl, etcd) from the Go
# module proxy, through the wrapper module in tests/tools/k8s/ (go.mod/go.sum pin the versions).
#
# Output: $OPAMP_TOOLS_CACHE/k8s-<kube version>-<hash of go.mod+go.sum>/bin/, linked into
# target/tools/bin/. A cold build takes 10-30 min on 2 cores; a warm one only re-links.
#
# To move to another Kubernetes patch release, regenerate the wrapper module (see
# /work/shared/HARNESS.md): replace every staging module with its v0.<minor>.<patch> release,
# `go get -tool` the commands, pin etcd server at the etcd client version Kubernetes requires,
# `go mod tidy`. The cache key changes with go.mod/go.sum.
source "$(dirname "$0")/cache.sh"

K8S_MOD_DIR="$REPO_ROOT/tests/tools/k8s"
KUBE_VERSION=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ {print $2; exit}' "$K8S_MOD_DIR/go.mod")
ETCD_VERSION=$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v3\./ {print $2; exit}' "$K8S_MOD_DIR/go.mod")
[ -n "$KUBE_VERSION" ] || { log "k8s.io/kubernetes not found in $K8S_MOD_DIR/go.mod"; exit 1; }
KUBE_MINOR=$(echo "${KUBE_VERSION#v}" | cut -d. -f2)
# Version stamping (without it /version reports v0.0.0 and Helm's KubeVersion checks break).
# gitCommit: the proxy does not record the tag's commit for every release; leave it empty rather
# than upstream's unexpanded "$Format:%H$".
LDFLAGS="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS="$LDFLAGS -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$KUBE_MINOR"
  LDFLAGS="$LDFLAGS -X $p.gitTreeState=clean -X $p.gitCommit="
done
# Cache key: go.mod + go.sum (+ the link flags, so changing the stamping rebuilds too).
MOD_HASH=$( (cat "$K8S_MOD_DIR/go.mod" "$K8S_MOD_DIR/go.sum"; echo "$LDFLAGS") | sha256sum | cut -c1-12)

build_k8s() {
  local out=$1
  # go.mod/go.sum are committed and complete: never let the build rewrite them.
  local goflags="-mod=readonly -buildvcs=false -trimpath"
  cd "$K8S_MOD_DIR"
  log "go build kube-apiserver $KUBE_VERSION"
  GOFLAGS="$goflags" nice -n 15 go build -ldflags "$LDFLAGS" -o "$out/bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  log "go build kubectl $KUBE_VERSION"
  GOFLAGS="$goflags" nice -n 15 go build -ldflags "$LDFLAGS" -o "$out/bin/kubectl" k8s.io/kubernetes/cmd/kubectl
  log "go build etcd $ETCD_VERSION"
  # The etcd server module root is package main.
  GOFLAGS="$goflags" nice -n 15 go build -ldflags "-s -w" -o "$out/bin/etcd" go.etcd.io/etcd/server/v3
  "$out/bin/kube-apiserver" --version >&2
  "$out/bin/etcd" --version >&2
}

cached_build k8s "${KUBE_VERSION#v}-$MOD_HASH" build_k8s
