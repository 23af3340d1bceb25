// Command coredns is CoreDNS with only the plugins of the test node's Corefile (see
// tests/support/node.py): serving cluster.local from the Kubernetes API needs none of CoreDNS's
// cloud, etcd or forwarding plugins, and leaving them out halves its build. Built by
// hack/k8s-tools.sh; its go.mod and go.sum come from hack/k8s/gen-modules.sh.
package main

import (
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
