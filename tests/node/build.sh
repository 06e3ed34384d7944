#!/usr/bin/env bash
# Build the node tier's binaries from their Go modules, cached by version:
#   kubelet, kube-controller-manager, kube-scheduler, kube-proxy (tests/node/kube, at the
#     k8s.io/kubernetes version of tests/controlplane) -> <cache>/node/kube-<version>/
#   containerd, containerd-shim-runc-v2, ctr (tests/node/containerd)
#     -> <cache>/node/containerd-<version>/
#   crictl (tests/node/crictl, its own module: its dependencies would move the others')
#     -> <cache>/node/crictl-<version>/
# with <cache> = ${TRACEKEEPER_CACHE:-/var/cache/tracekeeper}. Rebuilds only when a
# module's inputs change or a binary is missing; safe to run concurrently (flock).
# Prints three lines last: the kube, containerd and crictl bin dirs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

log() { printf '[node] %s\n' "$*" >&2; }

export GOTOOLCHAIN=local
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0

required() { # module go.mod -> version it requires
    awk -v m="$1" '$1 == m {print $2; exit} $1 == "require" && $2 == m {print $3; exit}' "$2"
}

kube_version=$(required k8s.io/kubernetes "$here/kube/go.mod")
cp_version=$(required k8s.io/kubernetes "$here/../controlplane/go.mod")
if [ "$kube_version" != "$cp_version" ]; then
    echo "tests/node/kube requires k8s.io/kubernetes $kube_version but tests/controlplane" \
        "$cp_version: a kubelet must match its apiserver; run tests/controlplane/bump.sh" >&2
    exit 1
fi
containerd_version=$(required github.com/containerd/containerd/v2 "$here/containerd/go.mod")
crictl_version=$(required sigs.k8s.io/cri-tools "$here/crictl/go.mod")

cache=${TRACEKEEPER_CACHE:-/var/cache/tracekeeper}/node
mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "another build holds $cache/.lock; waiting"
    flock 9
fi

# build NAME MODULE_DIR "BIN..." "LDFLAGS" "TAGS" PACKAGE...: one go build for the set
# (shared packages compile once), static and stripped, into <cache>/NAME.
build() {
    local name=$1 dir=$2 bins=$3 ldflags=$4 tags=$5
    shift 5
    local out="$cache/$name" stamp b
    stamp=$(cat "$dir/go.mod" "$dir/go.sum" "$here/build.sh" | sha256sum | cut -c1-16)
    local cached=1
    [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ] || cached=0
    for b in $bins; do [ -x "$out/$b" ] || cached=0; done
    if [ "$cached" = 1 ]; then
        log "$name cached in $out"
        return
    fi
    command -v go >/dev/null 2>&1 || { echo "go is not installed (need Go >= 1.26)" >&2; exit 1; }
    log "building $name ($bins) with $(go version | cut -d' ' -f3)"
    local start tmp
    start=$(date +%s)
    tmp=$(mktemp -d "$cache/.build.XXXXXX")
    (cd "$dir" && go build -trimpath -tags "$tags" -ldflags="$ldflags" -o "$tmp/" "$@") \
        || { rm -rf "$tmp"; exit 1; }
    for b in $bins; do
        [ -x "$tmp/$b" ] || { rm -rf "$tmp"; echo "build produced no $b" >&2; exit 1; }
    done
    echo "$stamp" >"$tmp/.stamp"
    chmod 755 "$tmp"
    rm -rf "$out"
    mv "$tmp" "$out"
    log "$name built in $(($(date +%s) - start))s: $(du -sh "$out" | cut -f1)"
}

# The version flags hack/lib/version.sh sets (else kubelet reports v0.0.0-master, which
# the apiserver shows in `kubectl get nodes`).
minor=${kube_version#v1.}
minor=${minor%%.*}
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    kube_ldflags+=" -X $pkg.gitTreeState=clean"
done
build "kube-$kube_version" "$here/kube" "kubelet kube-controller-manager kube-scheduler kube-proxy" \
    "$kube_ldflags" "" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy

# No cgo: the snapshotters that need it (btrfs, devmapper, zfs) are left out; overlayfs is
# the one used.
build "containerd-$containerd_version" "$here/containerd" "containerd containerd-shim-runc-v2 ctr" \
    "-s -w -X github.com/containerd/containerd/v2/version.Version=$containerd_version" \
    "no_btrfs no_devmapper no_zfs" \
    github.com/containerd/containerd/v2/cmd/containerd \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
    github.com/containerd/containerd/v2/cmd/ctr

build "crictl-$crictl_version" "$here/crictl" crictl \
    "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$crictl_version" "" \
    sigs.k8s.io/cri-tools/cmd/crictl

echo "$cache/kube-$kube_version"
echo "$cache/containerd-$containerd_version"
echo "$cache/crictl-$crictl_version"
