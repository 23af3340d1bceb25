#!/usr/bin/env bash
# Runs the cluster test suite (pytest -m cluster) on a kind cluster instead of the local control
# plane, for users with Docker (docs/test-control-plane.md). It needs docker, kind, kubectl and
# helm on PATH and the project's venv (make venv); machines without a container engine (CI) use
# `make test`, which runs the same suite on the local control plane.
#
#   hack/kind-e2e.sh [pytest args...]      KEEP_CLUSTER=1 keeps the cluster afterwards
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
# shellcheck source=hack/k8s/versions.env
source hack/k8s/versions.env
name="${KIND_CLUSTER:-memspace-e2e}"
node_image="${KIND_NODE_IMAGE:-kindest/node:$KUBE_VERSION}"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is not on PATH" >&2; exit 1; }
done
[[ -x .venv/bin/pytest ]] || { echo "kind-e2e: no venv; run: make venv" >&2; exit 1; }

if ! kind get clusters | grep -qx "$name"; then
  kind create cluster --name "$name" --image "$node_image" --wait 180s
fi
kubeconfig="$repo/.cluster/kind-$name.kubeconfig"
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
  echo "kind-e2e: restarting kube-controller-manager with the host-path provisioner"
  for _ in $(seq 120); do
    if kubectl -n kube-system get pod "kube-controller-manager-$node" -o jsonpath='{.spec.containers[0].command}' 2>/dev/null \
        | grep -q enable-hostpath-provisioner; then
      break
    fi
    sleep 1
  done
  kubectl -n kube-system wait --for=condition=Ready "pod/kube-controller-manager-$node" --timeout=120s
fi

# The image, for tests that install the chart into the cluster.
if [[ -f Dockerfile ]]; then
  docker build -q -t memspace:e2e .
  kind load docker-image memspace:e2e --name "$name"
  export MEMSPACE_E2E_IMAGE=memspace:e2e
fi

status=0
MEMSPACE_TEST_KUBECONFIG="$kubeconfig" .venv/bin/pytest -m cluster "$@" || status=$?
if [[ -z "${KEEP_CLUSTER:-}" ]]; then
  kind delete cluster --name "$name"
  rm -f "$kubeconfig"
fi
exit "$status"
