#!/usr/bin/env bash
# Build the node tier's container images here, without a Docker engine or a registry,
# each cached as a docker-archive by the hash of its inputs:
#   ${TRACEKEEPER_CACHE:-/var/cache/tracekeeper}/images/<name>-<hash>.tar
# - debian:bookworm-slim and python:3.11-slim-bookworm: the bases the Dockerfiles' FROM
#   lines name, made with mmdebstrap from Debian's mirror (docs/DESIGN.md: why);
# - tracekeeper-operator and tracekeeper-agent: buildah building Dockerfile.operator and
#   Dockerfile.agent unchanged on those bases, tagged as manifests/base names them;
# - tk-pause (the pod sandbox), tk-busybox (busybox-static) and tk-workload (tk-busybox
#   plus a static binary to uprobe), from tests/node/images/.
# Prints "<image ref> <archive>" per image a node runs (not the bases); LocalNode loads
# them with `ctr -n k8s.io images import`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
log() { printf '[images] %s\n' "$*" >&2; }

for tool in buildah mmdebstrap gcc busybox; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "$tool is missing: run make setup (scripts/setup.sh installs it)" >&2
        exit 1
    }
done

cache=${TRACEKEEPER_CACHE:-/var/cache/tracekeeper}/images
mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "another build holds $cache/.lock; waiting"
    flock 9
fi

mirror=http://deb.debian.org/debian
# Debian's snapshot mirrors serve Release files past their Valid-Until (as this host's apt
# is told too): the same for mmdebstrap and for the apt-get runs inside the images.
apt_opt='Acquire::Check-Valid-Until "false";'
version=$(awk '$1 == "image:" && $2 ~ /^tracekeeper-agent:/ {split($2, a, ":"); print a[2]}' \
    "$repo/manifests/base/agent.yaml")
[ -n "$version" ] || { echo "no tracekeeper-agent image in manifests/base/agent.yaml" >&2; exit 1; }

# hash_of RECIPE FILES...: 16 hex digits over a recipe (the commands and inputs that
# are not files, as text) and the files' contents. Not this script as a whole: editing
# one image's recipe rebuilds that image and the ones built on it, not all of them.
hash_of() {
    { echo "$1"; shift; for f in "$@"; do sha256sum "$f"; done; } | sha256sum | cut -c1-16
}

# The Dockerfiles' build context, as .dockerignore lets it through.
context_files() {
    cd "$repo" && find pyproject.toml uv.lock README.md api operator node-agent kubectl-plugin \
        -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort
}

work=$(mktemp -d /tmp/tk-images.XXXXXX)
containers=()
cleanup() {
    for c in "${containers[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# cached NAME HASH: the archive if built, else nothing.
archive() { echo "$cache/$1-$2.tar"; }
is_cached() { [ -s "$(archive "$1" "$2")" ]; }

# save REF NAME HASH: write the image to its archive (atomically) and drop older ones.
save() {
    local ref=$1 name=$2 key=$3 out
    out=$(archive "$name" "$key")
    rm -f "$out.tmp"
    buildah push --quiet "$ref" "docker-archive:$out.tmp:$ref" >/dev/null
    mv "$out.tmp" "$out"
    find "$cache" -maxdepth 1 -name "$name-*.tar" ! -name "$(basename "$out")" -delete
}

# load NAME HASH REF: make sure buildah's store has REF (a later build's base).
load() {
    buildah inspect --type image "$3" >/dev/null 2>&1 \
        || buildah pull --quiet "docker-archive:$(archive "$1" "$2")" >/dev/null
}

# from_rootfs REF TARBALL ENV...: an image of one layer, the tarball's tree.
from_rootfs() {
    local ref=$1 tarball=$2 c
    shift 2
    c=$(buildah from scratch)
    containers+=("$c")
    buildah add --quiet "$c" "$tarball" / >/dev/null
    for kv in "$@"; do buildah config --env "$kv" "$c"; done
    buildah config --cmd '["bash"]' "$c"
    buildah commit --quiet --rm "$c" "$ref" >/dev/null
}

built=()
emit() { built+=("$1 $(archive "$2" "$3")"); }
start=$(date +%s)

# --- the Debian base (the agent's FROM) --------------------------------------------
debian_ref=docker.io/library/debian:bookworm-slim
# This host's own CAs (/usr/local/share/ca-certificates): its egress re-signs TLS, and the
# builds' pip and uv must reach PyPI as the host does. uv reads SSL_CERT_FILE (it would use
# its built-in roots otherwise). Official bases trust no such CA and need none of this.
local_cas=$(find /usr/local/share/ca-certificates -name '*.crt' 2>/dev/null | LC_ALL=C sort)
ca_hook='mkdir -p "$1/usr/local/share/ca-certificates"
  for f in '"$(echo $local_cas)"'; do cp "$f" "$1/usr/local/share/ca-certificates/"; done
  chroot "$1" update-ca-certificates >/dev/null'
# As debian:bookworm-slim: minbase, no docs, man pages or locales; plus ca-certificates.
debian_args=(--variant=minbase "--aptopt=$apt_opt" --include=ca-certificates
    "--customize-hook=$ca_hook"
    '--dpkgopt=path-exclude=/usr/share/doc/*' '--dpkgopt=path-exclude=/usr/share/man/*'
    '--dpkgopt=path-exclude=/usr/share/locale/*' '--dpkgopt=path-include=/usr/share/doc/*/copyright'
)
debian_mirrors=("deb $mirror bookworm main" "deb $mirror bookworm-updates main"
    "deb $mirror-security bookworm-security main")
# shellcheck disable=SC2086 # one word per CA file
debian_key=$(hash_of "mmdebstrap ${debian_args[*]} bookworm ${debian_mirrors[*]}" $local_cas)
if ! is_cached debian "$debian_key"; then
    log "mmdebstrap bookworm ($mirror) for $debian_ref"
    mmdebstrap --quiet "${debian_args[@]}" bookworm "$work/debian.tar" "${debian_mirrors[@]}"
    from_rootfs "$debian_ref" "$work/debian.tar" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
    save "$debian_ref" debian "$debian_key"
fi
load debian "$debian_key" "$debian_ref"

# --- the Python base (the operator's FROM) -----------------------------------------
# Debian's python3 (3.11 in bookworm, as python:3.11-slim-bookworm has) with venv and pip;
# `python` names it (python-is-python3), and pip may install into it as the official image's
# may (PEP 668's marker is Debian's, not Python's).
python_ref=docker.io/library/python:3.11-slim-bookworm
python_pkgs="python3 python3-venv python3-pip python-is-python3 ca-certificates"
python_key=$(hash_of "$debian_key $python_pkgs PIP_BREAK_SYSTEM_PACKAGES=1")
if ! is_cached python "$python_key"; then
    log "building $python_ref on $debian_ref"
    c=$(buildah from --pull=never "$debian_ref")
    containers+=("$c")
    buildah run --network host "$c" sh -c "apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            $python_pkgs >/dev/null && rm -rf /var/lib/apt/lists/*"
    buildah config --env PIP_BREAK_SYSTEM_PACKAGES=1 --cmd '["python3"]' "$c"
    buildah commit --quiet --rm "$c" "$python_ref" >/dev/null
    save "$python_ref" python "$python_key"
fi
load python "$python_key" "$python_ref"

# --- the product images, from the project's Dockerfiles ----------------------------
mapfile -t context < <(context_files)
for component in operator agent; do
    ref=docker.io/library/tracekeeper-$component:$version
    base_key=$([ "$component" = operator ] && echo "$python_key" || echo "$debian_key")
    key=$(hash_of "$base_key bud --layers=false" "$repo/Dockerfile.$component" \
        "$repo/.dockerignore" "${context[@]/#/$repo/}")
    if ! is_cached "tracekeeper-$component" "$key"; then
        log "buildah bud -f Dockerfile.$component -t $ref"
        # --pull=never: the FROM images are the local ones above, never a registry's.
        # --network host: the build's apt-get and pip reach the mirrors as this host does.
        (cd "$repo" && buildah bud --quiet --pull=never --network host --layers=false \
            -f "Dockerfile.$component" -t "$ref" .) >/dev/null
        save "$ref" "tracekeeper-$component" "$key"
    fi
    emit "$ref" "tracekeeper-$component" "$key"
done

# --- pause, busybox and the workload -----------------------------------------------
# scratch_image REF NAME KEY DIR ENTRYPOINT: DIR's tree as the image's one layer.
scratch_image() {
    local ref=$1 name=$2 key=$3 dir=$4 entrypoint=$5 c
    c=$(buildah from scratch)
    containers+=("$c")
    buildah copy --quiet "$c" "$dir" / >/dev/null
    buildah config --entrypoint "$entrypoint" --env PATH=/usr/local/bin:/bin "$c"
    buildah commit --quiet --rm "$c" "$ref" >/dev/null
    save "$ref" "$name" "$key"
}

pause_ref=docker.io/library/tk-pause:1
pause_key=$(hash_of "gcc -static -O2 -s" "$here/images/pause.c")
if ! is_cached tk-pause "$pause_key"; then
    log "building $pause_ref"
    mkdir -p "$work/pause"
    gcc -static -O2 -s -o "$work/pause/pause" "$here/images/pause.c"
    scratch_image "$pause_ref" tk-pause "$pause_key" "$work/pause" '["/pause"]'
fi
emit "$pause_ref" tk-pause "$pause_key"

busybox=$(command -v busybox)
busybox_ref=docker.io/library/tk-busybox:1
busybox_key=$(hash_of "busybox --list" "$busybox")
workload_ref=docker.io/library/tk-workload:1
workload_key=$(hash_of "$busybox_key gcc -static -O2" "$here/images/tk-workload.c")
if ! is_cached tk-busybox "$busybox_key" || ! is_cached tk-workload "$workload_key"; then
    log "building $busybox_ref and $workload_ref"
    mkdir -p "$work/busybox/bin" "$work/busybox/etc" "$work/busybox/tmp"
    cp "$busybox" "$work/busybox/bin/busybox"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$work/busybox/bin/$applet"
    done
    echo "root:x:0:0:root:/:/bin/sh" >"$work/busybox/etc/passwd"
    echo "root:x:0:" >"$work/busybox/etc/group"
    scratch_image "$busybox_ref" tk-busybox "$busybox_key" "$work/busybox" '["/bin/sh"]'
    cp -a "$work/busybox" "$work/workload"
    mkdir -p "$work/workload/usr/local/bin"
    gcc -static -O2 -o "$work/workload/usr/local/bin/tk-workload" "$here/images/tk-workload.c"
    scratch_image "$workload_ref" tk-workload "$workload_key" "$work/workload" '["/bin/sh"]'
fi
emit "$busybox_ref" tk-busybox "$busybox_key"
emit "$workload_ref" tk-workload "$workload_key"

log "images ready in $(($(date +%s) - start))s"
printf '%s\n' "${built[@]}"
