#!/usr/bin/env bash
# Builds the node side of `tests/tools/local-cluster up --node` (kubelet, kube-controller-manager,
# kube-scheduler) from the Go module proxy, through the wrapper module in tests/tools/k8s-node/
# (go.mod/go.sum pin the versions; the same Kubernetes release as tests/tools/k8s/).
#
# Output: $OPAMP_TOOLS_CACHE/k8s-node-<kube version>-<hash of go.mod+go.sum>/bin/, linked into
# target/tools/bin/. A cold build takes about 10 min on 2 cores (571 s with the modules already
# downloaded), a few minutes when build-k8s.sh has filled the Go build cache; a warm one only
# re-links.
#
# To move to another Kubernetes patch release, regenerate the wrapper module like tests/tools/k8s/
# (see build-k8s.sh): the same replacements, `go get -tool` the three commands, `go mod tidy`.
source "$(dirname "$0")/cache.sh"

K8S_MOD_DIR="$REPO_ROOT/tests/tools/k8s-node"
KUBE_VERSION=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ {print $2; exit}' "$K8S_MOD_DIR/go.mod")
[ -n "$KUBE_VERSION" ] || { log "k8s.io/kubernetes not found in $K8S_MOD_DIR/go.mod"; exit 1; }
KUBE_MINOR=$(echo "${KUBE_VERSION#v}" | cut -d. -f2)
# Version stamping as in build-k8s.sh (the kubelet reports it as the node's kubeletVersion).
LDFLAGS="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS="$LDFLAGS -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$KUBE_MINOR"
  LDFLAGS="$LDFLAGS -X $p.gitTreeState=clean -X $p.gitCommit="
done
MOD_HASH=$( (cat "$K8S_MOD_DIR/go.mod" "$K8S_MOD_DIR/go.sum"; echo "$LDFLAGS") | sha256sum | cut -c1-12)

build_k8s_node() {
  local out=$1 cmd
  local goflags="-mod=readonly -buildvcs=false -trimpath"
  cd "$K8S_MOD_DIR"
  for cmd in kubelet kube-controller-manager kube-scheduler; do
    log "go build $cmd $KUBE_VERSION"
    GOFLAGS="$goflags" nice -n 15 go build -ldflags "$LDFLAGS" -o "$out/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  done
  "$out/bin/kubelet" --version >&2
}

cached_build k8s-node "${KUBE_VERSION#v}-$MOD_HASH" build_k8s_node
