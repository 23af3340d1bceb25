#!/usr/bin/env bash
# memspace end to end on kind, for users with Docker (docs/install.md, "Trying it on kind"):
# create a kind cluster, build the image and load it, then run the cluster tests there instead of
# on the local control plane. By default that is the chart's suite (tests/chart): `helm install`
# the chart, apply a MemorySpace, wait for Ready, store and recall through its credentials Secret,
# delete it and check that everything it had is gone, every object valid and restricted, helm
# install/upgrade/uninstall, least-privilege RBAC. The steps are tests/chart/serving.py, the same
# code the local control-plane suite runs with the operator out of cluster.
#
# It needs docker (with a running daemon), kind, kubectl and helm on PATH and the project's venv
# (make venv); machines without a container engine (CI) use `make test`, which runs the same
# suites on the local control plane.
#
#   hack/e2e-kind.sh [pytest args...]     pytest -m cluster, on tests/chart unless a test path
#                                         is given (hack/e2e-kind.sh tests: every cluster test)
#
# Environment:
#   KIND_CLUSTER                 cluster name (memspace-e2e)
#   KIND_NODE_IMAGE              node image (kindest/node:<KUBE_VERSION of hack/k8s/versions.env>)
#   MEMSPACE_E2E_IMAGE           image built from the Dockerfile and loaded into kind (memspace:e2e)
#   MEMSPACE_E2E_STORAGE_CLASS   StorageClass of the spaces' volumes (kind's `standard`)
#   KEEP_CLUSTER=1               keep the cluster afterwards (and reuse it next time)
#   SKIP_BUILD=1                 load the image as it is, without `docker build`
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
# shellcheck source=hack/k8s/versions.env
source hack/k8s/versions.env
name="${KIND_CLUSTER:-memspace-e2e}"
node_image="${KIND_NODE_IMAGE:-kindest/node:$KUBE_VERSION}"
image="${MEMSPACE_E2E_IMAGE:-memspace:e2e}"
kubeconfig="$repo/.cluster/kind-$name.kubeconfig"

say() { echo "e2e-kind: $*" >&2; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { say "$tool is not on PATH"; exit 1; }
done
docker info >/dev/null 2>&1 || { say "docker is installed but its daemon does not answer"; exit 1; }
[[ -x .venv/bin/pytest ]] || { say "no venv; run: make venv"; exit 1; }

# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
  if [[ -z "${KEEP_CLUSTER:-}" ]]; then
    kind delete cluster --name "$name" >/dev/null 2>&1 || true
    rm -f "$kubeconfig"
  else
    say "kept cluster $name; KUBECONFIG=$kubeconfig"
  fi
}
trap cleanup EXIT

if ! kind get clusters 2>/dev/null | grep -qx "$name"; then
  kind create cluster --name "$name" --image "$node_image" --wait 180s
fi
mkdir -p .cluster
kind get kubeconfig --name "$name" >"$kubeconfig"
export KUBECONFIG="$kubeconfig"

# As on the local control plane, PVCs of the `hostpath` StorageClass bind through the
# controller-manager's host-path provisioner (directories inside the node container).
node="$name-control-plane"
manifest=/etc/kubernetes/manifests/kube-controller-manager.yaml
if ! docker exec "$node" grep -q enable-hostpath-provisioner "$manifest"; then
  docker exec "$node" sed -i \
    '/^    - kube-controller-manager$/a\    - --enable-hostpath-provisioner=true' "$manifest"
  say "restarting kube-controller-manager with the host-path provisioner"
  for _ in $(seq 120); do
    if kubectl -n kube-system get pod "kube-controller-manager-$node" -o jsonpath='{.spec.containers[0].command}' 2>/dev/null \
        | grep -q enable-hostpath-provisioner; then
      break
    fi
    sleep 1
  done
  kubectl -n kube-system wait --for=condition=Ready "pod/kube-controller-manager-$node" --timeout=120s
fi

# The image, for the tests that install the chart and run its pods (tests/chart).
if [[ -z "${SKIP_BUILD:-}" ]]; then
  say "building $image"
  docker build -t "$image" .
fi
kind load docker-image "$image" --name "$name"
export MEMSPACE_E2E_IMAGE="$image"
export MEMSPACE_E2E_STORAGE_CLASS="${MEMSPACE_E2E_STORAGE_CLASS:-standard}"

status=0
# The chart's suite unless the arguments name a test path of their own.
targets=(tests/chart)
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    targets=()
    break
  fi
done
MEMSPACE_TEST_KUBECONFIG="$kubeconfig" .venv/bin/pytest -m cluster "${targets[@]}" "$@" || status=$?
if [[ "$status" -ne 0 ]]; then
  # What a failure needs: the spaces, the memspace pods, recent events, the operators' logs.
  say "tests failed ($status); the cluster's memspace state follows"
  kubectl get memoryspaces -A -o wide || true
  kubectl get pods,pvc -A -l app.kubernetes.io/name=memspace -o wide || true
  kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 40 || true
  kubectl logs -A -l app.kubernetes.io/component=operator --tail=100 --prefix 2>/dev/null || true
fi
exit "$status"
