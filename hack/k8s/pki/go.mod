// Writes the throwaway PKI of the test control plane; standard library only.
module memspace.dev/hack/k8s/pki

go 1.26.0
