# The local Kubernetes control plane of the tests (docs/test-control-plane.md).
# Included by the top-level Makefile, which defines BIN (the venv's bin) and the `venv` target.
.PHONY: k8s-tools cluster cluster-down

# Builds (once, cached by version outside the repo) and links etcd, kube-apiserver,
# kube-controller-manager, helm and kubectl into .cluster/bin/.
k8s-tools: venv
	@VENV_BIN=$(abspath $(BIN)) bash hack/k8s-tools.sh

# Starts a control plane in the background; its admin kubeconfig is .cluster/kubeconfig.
cluster: k8s-tools
	@$(BIN)/python -m tests.support.cluster up

cluster-down: venv
	@$(BIN)/python -m tests.support.cluster down
