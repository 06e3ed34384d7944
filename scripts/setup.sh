#!/usr/bin/env bash
# One-shot, idempotent host setup for tracekeeper development, tests and the demo.
# Run as root on Debian 12. A second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh must run as root (it installs Debian packages and mounts tracefs/bpffs)" >&2
    exit 1
fi

# --- Debian packages -------------------------------------------------------
# bpfcc: BCC's libbcc and its Python module (PyPI's "bcc" is an unrelated package).
# linux-headers-amd64: BCC compiles against kernel headers; see the link step below.
# bpftrace: the peer in bench/; bpftool: inspect what the agent loaded.
# systemtap-sdt-dev: sys/sdt.h, for the USDT programs the kernel tier builds with gcc.
PKGS=(bpfcc-tools python3-bpfcc bpftool linux-headers-amd64 bpftrace python3 make git ca-certificates prometheus
      systemtap-sdt-dev)
# The node tier (tests/node): buildah builds the Dockerfiles on bases mmdebstrap makes;
# umoci + skopeo pack the pause and workload images (gcc and libc6-dev: the static pause,
# busybox-static: the workload's shell); runc runs containers under the containerd that
# tests/node/build.sh builds; CNI plugins, iptables, conntrack and socat are what kubelet
# and kube-proxy use on a node.
PKGS+=(buildah mmdebstrap umoci skopeo runc gcc libc6-dev busybox-static
       containernetworking-plugins iptables conntrack socat jq openssl)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "Debian packages present"
fi

# --- kernel headers for the running kernel ---------------------------------
# BCC looks in /lib/modules/$(uname -r)/{build,source}. When the exact headers
# are not packaged (a custom kernel), link the newest Debian headers: "build"
# to the arch tree and "source" to the common tree (kconfig.h lives there).
K=$(uname -r)
if [ -e "/lib/modules/$K/build/include/generated/autoconf.h" ] || [ -e "/lib/modules/$K/build/include/linux/kconfig.h" ]; then
    log "kernel headers for $K present"
else
    arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
    common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
        echo "no Debian kernel headers under /usr/src (linux-headers-amd64 failed to install?)" >&2
        exit 1
    fi
    log "linking $arch_dir and $common_dir for kernel $K"
    mkdir -p "/lib/modules/$K"
    ln -sfn "$arch_dir" "/lib/modules/$K/build"
    ln -sfn "$common_dir" "/lib/modules/$K/source"
fi

# --- pseudo filesystems ----------------------------------------------------
mount_if_missing() { # type dir
    if ! mountpoint -q "$2"; then
        log "mounting $1 at $2"
        mkdir -p "$2"
        mount -t "$1" "$1" "$2"
    fi
}
mount_if_missing tracefs /sys/kernel/tracing
mount_if_missing debugfs /sys/kernel/debug
mount_if_missing bpf /sys/fs/bpf

# --- Python environment ----------------------------------------------------
if ! command -v uv >/dev/null 2>&1; then
    log "installing uv"
    python3 -m pip install --quiet "uv>=0.5" 2>/dev/null \
        || /usr/bin/python3 -m pip install --quiet --break-system-packages "uv>=0.5"
fi
export UV_PYTHON_DOWNLOADS=never
# The venv is made from Debian's python3: the interpreter python3-bpfcc targets.
# Bytecode compiled ahead, as in the images (UV_COMPILE_BYTECODE): every agent and operator
# process a test starts would otherwise compile ~400 modules from source again (0.6 s of
# an agent's 1.4 s start here, where PYTHONDONTWRITEBYTECODE may be set).
uv sync --frozen --python /usr/bin/python3 --quiet --compile-bytecode
.venv/bin/python -m compileall -q -j 0 api operator node-agent sim kubectl-plugin > /dev/null
log "python env: $(.venv/bin/python --version)"

# Make Debian's bcc module (and only it) importable from the venv.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim=.venv/debian-bcc
mkdir -p "$shim"
ln -sfn /usr/lib/python3/dist-packages/bcc "$shim/bcc"
echo "$(pwd)/$shim" > "$site/debian_bcc.pth"
.venv/bin/python -c 'import bcc, sys; print("[setup] bcc importable from", bcc.__file__)'
log "done"
