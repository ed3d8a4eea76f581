#!/usr/bin/env bash
# Smoke check of `tests/tools/local-cluster up --node` (on a cluster that is up): a Deployment
# of the sandbox image with hostNetwork, imagePullPolicy: Never, a restricted security context and
# an automounted service-account token becomes Ready, its container sees the API server at
# 127.0.0.1 and the token; deleting it removes its pod and containers.
#   LOCAL_CLUSTER_DIR=... tests/tools/node-smoke.sh
set -euo pipefail
LC="$(cd "$(dirname "$0")" && pwd)/local-cluster"
say() { printf '[node-smoke] %s\n' "$*" >&2; }
in_ns() { "$LC" exec -- "$@"; }

env_file=$("$LC" env)
value() { printf '%s\n' "$env_file" | awk -F= -v n="$1" '$1 == n {print substr($0, length(n) + 2)}'; }
image=$(value LOCAL_CLUSTER_PAUSE_IMAGE)
port=$(value LOCAL_CLUSTER_API_PORT)
[ -n "$image" ] || { say "no node: run local-cluster up --node"; exit 1; }

start=$SECONDS
in_ns kubectl apply -f - >/dev/null <<EOM
apiVersion: apps/v1
kind: Deployment
metadata:
  name: node-smoke
  namespace: default
spec:
  replicas: 1
  selector:
    matchLabels: {app: node-smoke}
  template:
    metadata:
      labels: {app: node-smoke}
    spec:
      hostNetwork: true
      automountServiceAccountToken: true
      terminationGracePeriodSeconds: 5
      securityContext:
        runAsNonRoot: true
        runAsUser: 65535
        runAsGroup: 65535
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: pause
        image: $image
        imagePullPolicy: Never
        env:
        - {name: KUBERNETES_SERVICE_HOST, value: 127.0.0.1}
        - {name: KUBERNETES_SERVICE_PORT, value: "$port"}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
EOM
in_ns kubectl rollout status deployment/node-smoke --timeout=120s >&2
pod=$(in_ns kubectl get pods -l app=node-smoke -o jsonpath='{.items[0].metadata.name}')
say "deployment Ready in $((SECONDS - start)) s (pod $pod)"

# The container's view: the service variables set in the spec win over the injected ones, and
# the projected token, CA and namespace are mounted.
cid=$(in_ns kubectl get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')
cid=${cid#containerd://}
pid=$(ctr --address "$(value LOCAL_CLUSTER_CONTAINERD_SOCK)" -n k8s.io tasks ls | awk -v c="$cid" '$1 == c {print $2}')
[ -n "$pid" ] || { say "no task for container $cid"; exit 1; }
host=$(tr '\0' '\n' <"/proc/$pid/environ" | awk -F= '$1 == "KUBERNETES_SERVICE_HOST" {print $2}')
[ "$host" = 127.0.0.1 ] || { say "KUBERNETES_SERVICE_HOST is '$host'"; exit 1; }
sa=/var/run/secrets/kubernetes.io/serviceaccount
for f in token ca.crt namespace; do
  [ -s "/proc/$pid/root$sa/$f" ] || { say "no $sa/$f in the container"; exit 1; }
done
# The token authenticates against the API server (as the pod's service account).
token=$(cat "/proc/$pid/root$sa/token")
who=$(in_ns curl -fsS --cacert "/proc/$pid/root$sa/ca.crt" -H "Authorization: Bearer $token" \
  -H 'Content-Type: application/json' -X POST \
  -d '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}' \
  "https://127.0.0.1:$port/apis/authentication.k8s.io/v1/selfsubjectreviews")
printf '%s' "$who" | grep -Eq '"username": ?"system:serviceaccount:default:default"' ||
  { say "token is not the pod's: $who"; exit 1; }
say "container sees the API server at 127.0.0.1:$port and its service-account token works"

in_ns kubectl delete deployment node-smoke --wait=true >/dev/null
deadline=$((SECONDS + 60))
while [ -n "$(in_ns kubectl get pods -l app=node-smoke -o name)" ] ||
    [ -n "$(ctr --address "$(value LOCAL_CLUSTER_CONTAINERD_SOCK)" -n k8s.io tasks ls -q)" ]; do
  [ $SECONDS -lt $deadline ] || { say "pod or containers still there after 60 s"; exit 1; }
  sleep 0.5
done
say "deleted: no pod, no container left"
