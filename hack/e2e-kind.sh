#!/usr/bin/env bash
# memspace end to end on kind, for users with Docker (docs/install.md, "Trying it on kind"):
# create a kind cluster, build the image and load it, `helm install` the chart, apply a
# MemorySpace, wait for Ready, store and recall through its credentials Secret, delete it and
# check that everything it had is gone. Then the chart's other cluster tests run there too
# (every object valid and restricted, helm install/upgrade/uninstall, least-privilege RBAC).
#
# The steps are tests/chart (tests/chart/serving.py), the same code the local control-plane
# suite runs with the operator out of cluster; hack/kind-e2e.sh makes the cluster and the image.
#
#   hack/e2e-kind.sh [pytest args...]     KEEP_CLUSTER=1 keeps the cluster; see hack/kind-e2e.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/kind-e2e.sh" tests/chart "$@"
