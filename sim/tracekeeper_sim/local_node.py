"""A real Kubernetes node beside a :class:`LocalCluster`: containerd + runc, kubelet,
kube-proxy, and the controllers a node needs (kube-controller-manager, kube-scheduler).

The binaries come from tests/node/build.sh and the images from tests/node/images.sh
(both built from source here and cached). Pods are real: runc containers in kubelet's
``kubepods`` cgroups (also in the cgroup2 hierarchy, where ``bpf_get_current_cgroup_id()``
sees them), on a bridge network from Debian's CNI plugins. Everything the node changes on
the host is recorded first and put back by :meth:`LocalNode.stop`
(:mod:`tracekeeper_sim.host_state`); no process, cgroup or mount is left behind.

What this VM needs, and why (docs/DESIGN.md, "The node tier"): containerd's
``restrict_oom_score_adj`` (no process here has CAP_SYS_RESOURCE, and kubelet asks for
oom_score_adj -998), shared tracefs/debugfs mounts (the agent's HostToContainer volumes),
kubelet's cgroupfs driver on hybrid cgroups (``failCgroupV1: false``) and image GC off
(nothing can be pulled back: there is no registry).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tracekeeper_agent.host.bpffs import PIN_ROOT
from tracekeeper_sim.host_state import HostState, cgroup_mounts, mounts_under
from tracekeeper_sim.local_cluster import (
    ADMIN,
    ControlPlaneError,
    LocalCluster,
    _Proc,
    _tail,
    exited,
    find_free_ports,
)

NODE_DIR = Path(__file__).resolve().parents[2] / "tests" / "node"
BUILD_SCRIPT = NODE_DIR / "build.sh"
IMAGES_SCRIPT = NODE_DIR / "images.sh"
NODE_NAME = "tk-node"
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
BRIDGE = "tkbr0"
PAUSE_IMAGE = "docker.io/library/tk-pause:1"
CNI_PLUGINS = Path("/usr/lib/cni")
RUNC = "/usr/sbin/runc"

# Written by kubelet at start (its kernel defaults) and kube-proxy; the bridge plugin turns
# on forwarding.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
# Fixed places kubelet, containerd, CNI and the agent's hostPath volumes write to, whatever
# their configured roots.
STATE_PATHS = (
    "/var/lib/cni",
    "/run/netns",
    "/run/containerd",
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/etc/kubernetes",
    "/var/lib/tracekeeper",
    "/run/xtables.lock",
)


@dataclass(frozen=True)
class NodeBinaries:
    kube: Path  # kubelet, kube-controller-manager, kube-scheduler, kube-proxy
    containerd: Path  # containerd, containerd-shim-runc-v2, ctr
    crictl: Path


def _run_script(script: Path, *, echo: bool) -> list[str]:
    proc = subprocess.Popen(
        ["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate()
    if echo:
        print(err, end="", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"{script} failed (exit {proc.returncode}):\n{err[-4000:]}")
    return out.splitlines()


def build_node_binaries(*, echo: bool = True) -> NodeBinaries:
    """tests/node/build.sh (cached by version): the three bin dirs it prints."""
    kube, containerd, crictl = (Path(p) for p in _run_script(BUILD_SCRIPT, echo=echo)[-3:])
    return NodeBinaries(kube, containerd, crictl)


def build_images(*, echo: bool = True) -> dict[str, Path]:
    """tests/node/images.sh (cached by content): {image ref: docker-archive}."""
    images = {}
    for line in _run_script(IMAGES_SCRIPT, echo=echo):
        ref, _, archive = line.partition(" ")
        if archive:
            images[ref] = Path(archive)
    return images


def node_ip() -> str:
    """The address of the interface the default route uses (eth0 here): what kubelet
    registers as InternalIP and what pods reach the host at."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.254", 9))  # no packet is sent: only the route is looked up
        ip: str = s.getsockname()[0]
    if ip.startswith("127."):
        raise ControlPlaneError("no non-loopback IPv4 address for the node (no default route?)")
    return ip


def _toml_str(value: str | Path) -> str:
    return json.dumps(str(value))


class LocalNode:
    """One node ``tk-node`` of ``cluster``; the cluster must have been made with
    ``node_ip=`` (its apiserver reachable from pods, ServiceAccount admission on)."""

    def __init__(
        self,
        cluster: LocalCluster,
        binaries: NodeBinaries,
        images: dict[str, Path],
        node_dir: Path,
        *,
        startup_timeout: float = 120.0,
    ) -> None:
        if cluster.node_ip is None:
            raise ControlPlaneError("LocalNode needs a LocalCluster made with node_ip=")
        if PAUSE_IMAGE not in images:
            raise ControlPlaneError(f"no {PAUSE_IMAGE} among the images: {', '.join(images)}")
        self.cluster = cluster
        self.bin = binaries
        self.images = images
        self.dir = Path(node_dir)
        self.ip = cluster.node_ip
        self.startup_timeout = startup_timeout
        self.host = HostState()
        self._procs: list[_Proc] = []
        self._shims_before: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._record_host()
        try:
            self._start_containerd()
            self._import_images()
            self._write_cni()
            self._start_kubelet()
            self._start_kube_proxy()
            self._start_controllers()
            self._wait_ready()
            # kubelet has rewritten its kernel defaults by now (once, at start).
            self.host.put_back_sysctls()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the controllers (nothing recreates pods), remove every pod sandbox through
        the CRI (containerd tears down their network and mounts), stop the node's
        processes, then put the host back."""
        errors: list[str] = []
        self._keep_logs()
        # kubelet first: left running, it starts a new sandbox for every pod removed below.
        for name in ("kube-controller-manager", "kube-scheduler", "kubelet"):
            self._stop_proc(name)
        if self._running("containerd"):
            try:
                self.crictl("stopp", *self.crictl("pods", "-q").split())
                self.crictl("rmp", "--all", "--force")
            except ControlPlaneError as e:
                errors.append(str(e))
        for name in ("kube-proxy", "containerd"):
            self._stop_proc(name)
        self._kill_shims()
        self._kill_containers()
        if os.access(self.bin.kube / "kube-proxy", os.X_OK):
            subprocess.run(
                [str(self.bin.kube / "kube-proxy"), "--cleanup"], capture_output=True, timeout=60
            )
        for point in mounts_under(str(self.dir)):
            subprocess.run(["umount", "--lazy", point], capture_output=True)
        try:
            self.host.restore()
        except Exception as e:  # reported with the rest
            errors.append(str(e))
        shutil.rmtree(self.dir, ignore_errors=True)
        # An agent container killed rather than stopped left its programs pinned in the
        # host's bpffs for a successor: the node is gone, so they detach with their pins.
        shutil.rmtree(PIN_ROOT / NODE_NAME, ignore_errors=True)
        if errors:
            raise ControlPlaneError("the node did not stop cleanly:\n" + "\n".join(errors))

    def _keep_logs(self) -> None:
        """The node's logs and every pod's, into the cluster's directory (which outlives the
        node's): what a failed run is debugged from."""
        keep = self.cluster.dir / "node-logs"
        keep.mkdir(exist_ok=True)
        for log in self.dir.glob("*.log"):
            shutil.copy(log, keep / log.name)
        res = self.cluster.kubectl("get", "pods", "-A", "-o", "wide", timeout=20)
        (keep / "pods.txt").write_text(res.stdout + res.stderr)
        for line in res.stdout.splitlines()[1:]:
            ns, pod = line.split()[:2]
            for suffix, flags in (("", ()), (".previous", ("--previous",))):
                args = ("logs", "-n", ns, pod, "--all-containers", *flags)
                out = self.cluster.kubectl(*args, timeout=20)
                if out.stdout:
                    (keep / f"{ns}_{pod}{suffix}.log").write_text(out.stdout)

    # -- clients -------------------------------------------------------------------------

    def crictl(self, *args: str, timeout: float = 120.0) -> str:
        res = subprocess.run(
            [str(self.bin.crictl / "crictl"), "--runtime-endpoint",
             f"unix://{self.containerd_socket}", "--timeout", "60s", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if res.returncode != 0:
            raise ControlPlaneError(f"crictl {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def ctr(self, *args: str, timeout: float = 600.0) -> str:
        res = subprocess.run(
            [str(self.bin.containerd / "ctr"), "--address", str(self.containerd_socket),
             "--namespace", "k8s.io", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if res.returncode != 0:
            raise ControlPlaneError(f"ctr {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def exited(self) -> str:
        return exited(self._procs)

    # -- internals -------------------------------------------------------------------------

    def _record_host(self) -> None:
        h = self.host
        h.sysctls(SYSCTLS)
        h.paths(STATE_PATHS)
        h.cgroups("kubepods")
        h.links()
        h.iptables()
        # The agent's tracefs and debugfs volumes are HostToContainer.
        h.make_shared("/sys/kernel/tracing")
        h.make_shared("/sys/kernel/debug", recursive=True)
        self._shims_before = set(self._shim_pids())

    def _spawn(self, name: str, exe: Path, args: Sequence[str]) -> _Proc:
        log_path = self.dir / f"{name}.log"
        log_file = log_path.open("wb")
        env = dict(os.environ)
        # containerd finds its shim on PATH; kubelet and kube-proxy find iptables there.
        env["PATH"] = f"{self.bin.containerd}:/usr/sbin:/usr/bin:/sbin:/bin"
        env.pop("KUBECONFIG", None)
        popen = subprocess.Popen(
            [str(exe), *args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env=env,
            start_new_session=True,
        )
        proc = _Proc(name, popen, log_path, log_file)
        self._procs.append(proc)
        return proc

    def _running(self, name: str) -> bool:
        return any(p.name == name and p.popen.poll() is None for p in self._procs)

    def _stop_proc(self, name: str, timeout: float = 30.0) -> None:
        for proc in [p for p in self._procs if p.name == name]:
            if proc.popen.poll() is None:
                proc.popen.terminate()
                try:
                    proc.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait()
            proc.log_file.close()
            self._procs.remove(proc)

    def _shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes started from our build (they outlive
        containerd by design)."""
        shim = str(self.bin.containerd / "containerd-shim-runc-v2")
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/exe") == shim:
                        pids.append(int(entry))
        return pids

    def _kill_shims(self) -> None:
        for pid in set(self._shim_pids()) - self._shims_before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _kill_containers(self) -> None:
        """Processes still in the node's kubepods cgroups (a container whose shim is gone:
        nothing else would stop it), by PID."""
        for mount in cgroup_mounts():
            for procs in (mount / "kubepods").rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    for pid in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)

    def _wait(self, what: str, check: object, proc_name: str) -> None:
        assert callable(check)
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            exited = self.exited()
            if exited:
                raise ControlPlaneError(f"{exited}\n(before {what})")
            ok, last = check()
            if ok:
                return
            time.sleep(0.2)
        log = self.dir / f"{proc_name}.log"
        raise ControlPlaneError(f"not {what} after {self.startup_timeout:.0f}s ({last}); "
                                f"{log} ends with:\n{_tail(log)}")  # fmt: skip

    def _start_containerd(self) -> None:
        d = self.dir / "containerd"
        (d / "cni").mkdir(parents=True, exist_ok=True)
        config = f"""version = 4
root = {_toml_str(d / "root")}
state = {_toml_str(d / "state")}
imports = []

[plugins.'io.containerd.server.v1.grpc']
  address = {_toml_str(self.containerd_socket)}
[plugins.'io.containerd.server.v1.ttrpc']
  address = {_toml_str(str(self.containerd_socket) + ".ttrpc")}

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    # There is no registry: the sandbox image is the local one, never pulled.
    sandbox = {_toml_str(PAUSE_IMAGE)}

[plugins.'io.containerd.cri.v1.runtime']
  # Nothing on this VM has CAP_SYS_RESOURCE: lowering oom_score_adj (kubelet asks for
  # -998 for sandboxes) fails every pod; clamp it to the runtime's own instead.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = {_toml_str(RUNC)}
        Root = {_toml_str(d / "runc")}
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [{_toml_str(CNI_PLUGINS)}]
    conf_dir = {_toml_str(d / "cni")}
"""
        (d / "config.toml").write_text(config)
        self._spawn("containerd", self.bin.containerd / "containerd",
                    ["--config", str(d / "config.toml"), "--log-level", "warn"])  # fmt: skip

        def serving() -> tuple[bool, str]:
            try:
                self.ctr("version", timeout=10)
            except (ControlPlaneError, subprocess.TimeoutExpired) as e:
                return False, str(e)
            return True, ""

        self._wait("serving", serving, "containerd")

    def _import_images(self) -> None:
        for archive in sorted(set(self.images.values())):
            self.ctr("images", "import", "--no-unpack=false", str(archive))

    def _write_cni(self) -> None:
        conflist = {
            "cniVersion": "1.0.0",
            "name": "tracekeeper-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    # Pods reach the node's address and each other; nothing leaves the VM.
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni-ipam"),
                    },
                }
            ],
        }
        (self.dir / "containerd" / "cni" / "10-tracekeeper.conflist").write_text(
            json.dumps(conflist, indent=2) + "\n"
        )

    def _start_kubelet(self) -> None:
        d = self.dir / "kubelet"
        d.mkdir(exist_ok=True)
        port, healthz = find_free_ports(2)
        self.kubelet_healthz_port = healthz
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            # PID 1 is not systemd; cgroups are hybrid (v1 controllers, cgroup2 at
            # /sys/fs/cgroup/unified), which kubelet refuses unless told.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            # Pods of the tier only: the apiserver's kubelet client (logs, exec) is not
            # authenticated with a client certificate. Bound to the node address only.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            # Nothing can be pulled back: never collect images, never evict for disk.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False,
        }
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self._spawn("kubelet", self.bin.kube / "kubelet", [
            f"--config={d / 'config.json'}",
            f"--kubeconfig={self.cluster.kubeconfig(ADMIN)}",
            f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={self.ip}",
            "--v=1",
        ])  # fmt: skip

    def _start_kube_proxy(self) -> None:
        # The in-cluster apiserver address (the kubernetes Service) and the output API's
        # Service route only through kube-proxy's rules.
        healthz, metrics = find_free_ports(2)
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self.cluster.kubeconfig(ADMIN))},
            "hostnameOverride": NODE_NAME,
            "bindAddress": self.ip,
            "clusterCIDR": CLUSTER_CIDR,
            "healthzBindAddress": f"127.0.0.1:{healthz}",
            "metricsBindAddress": f"127.0.0.1:{metrics}",
            # Leave the host's conntrack limits alone.
            "conntrack": {"maxPerCore": 0, "min": 0},
        }
        path = self.dir / "kube-proxy.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        self._spawn("kube-proxy", self.bin.kube / "kube-proxy", [f"--config={path}", "--v=1"])

    def _start_controllers(self) -> None:
        pki = self.cluster.dir / "pki"
        kubeconfig = str(self.cluster.kubeconfig(ADMIN))
        cm_port, sched_port = find_free_ports(2)
        self._spawn("kube-controller-manager", self.bin.kube / "kube-controller-manager", [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={cm_port}",
            "--leader-elect=false",
            # Tokens for ServiceAccounts, and the cluster CA in every namespace's
            # kube-root-ca.crt (the projected token volumes).
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=true",
            "--v=1",
        ])  # fmt: skip
        self._spawn("kube-scheduler", self.bin.kube / "kube-scheduler", [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={sched_port}",
            "--leader-elect=false",
            "--v=1",
        ])  # fmt: skip

    def _wait_ready(self) -> None:
        def node_ready() -> tuple[bool, str]:
            res = self.cluster.kubectl(
                "get", "node", NODE_NAME, "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}', timeout=10,
            )  # fmt: skip
            return res.stdout.strip() == "True", res.stdout + res.stderr

        self._wait("Ready", node_ready, "kubelet")

        def default_sa() -> tuple[bool, str]:
            res = self.cluster.kubectl("get", "serviceaccount", "default", "-n", "default",
                                       timeout=10)  # fmt: skip
            return res.returncode == 0, res.stderr

        self._wait("making ServiceAccounts", default_sa, "kube-controller-manager")
