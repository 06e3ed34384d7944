#!/usr/bin/env bash
# Build kube-apiserver, etcd and kubectl from this Go module into a cache keyed by the
# k8s.io/kubernetes version in go.mod:
#   ${TRACEKEEPER_CACHE:-/var/cache/tracekeeper}/controlplane/<version>/
# Rebuilds only when the version or the module's inputs change or a binary is missing.
# Idempotent and safe to run concurrently (flock). The last line printed is the bin dir.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

log() { printf '[controlplane] %s\n' "$*" >&2; }

# Never fetch another toolchain; build with the Go that is here.
export GOTOOLCHAIN=local
export GOFLAGS="-mod=readonly -buildvcs=false"

version=$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}
               $1 == "require" && $2 == "k8s.io/kubernetes" {print $3; exit}' go.mod)
[ -n "$version" ] || { echo "k8s.io/kubernetes not required in $here/go.mod" >&2; exit 1; }

cache=${TRACEKEEPER_CACHE:-/var/cache/tracekeeper}/controlplane
bin="$cache/$version"
bins=(kube-apiserver etcd kubectl)
# Same version but a changed etcd main or dependency set must rebuild too.
stamp=$(cat go.mod go.sum cmd/etcd/main.go build.sh | sha256sum | cut -c1-16)

up_to_date() {
    [ "$(cat "$bin/.stamp" 2>/dev/null)" = "$stamp" ] || return 1
    for b in "${bins[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "another build holds $cache/.lock; waiting"
    flock 9
fi

if up_to_date; then
    log "kubernetes $version binaries cached in $bin"
else
    command -v go >/dev/null 2>&1 || { echo "go is not installed (need Go >= 1.26)" >&2; exit 1; }
    log "building kubernetes $version (kube-apiserver, etcd, kubectl) with $(go version | cut -d' ' -f3)"
    log "from empty Go caches this takes about 5 minutes on 2 cores; later ones reuse them"
    start=$(date +%s)
    tmp=$(mktemp -d "$cache/.build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    # Download only the modules the three binaries import (go mod download would fetch
    # every test-only dependency in the graph too), ~600 MB from empty.
    log "downloading modules"
    if ! go list -deps k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl \
        ./cmd/etcd >/dev/null 2>"$tmp/download.log"; then
        cat "$tmp/download.log" >&2
        exit 1
    fi
    log "$(grep -c '^go: downloading' "$tmp/download.log" || true) modules downloaded" \
        "in $(($(date +%s) - start))s; compiling"
    rm "$tmp/download.log"
    # Without these -X flags the binaries report v0.0.0-master (as hack/lib/version.sh does).
    minor=${version#v1.}
    minor=${minor%%.*}
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    done
    # One go build for all three: shared packages compile once. Static (no cgo), stripped.
    CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$tmp/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl ./cmd/etcd
    for b in "${bins[@]}"; do [ -x "$tmp/$b" ] || { echo "build produced no $b" >&2; exit 1; }; done
    echo "$stamp" >"$tmp/.stamp"
    chmod 755 "$tmp"
    rm -rf "$bin"
    mv "$tmp" "$bin"
    trap - EXIT
    log "built in $(($(date +%s) - start))s: $(du -sh "$bin" | cut -f1) in $bin"
fi
echo "$bin"
