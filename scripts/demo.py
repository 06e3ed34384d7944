"""The local demo: a real control plane, the operator, one node agent, a tenant's probes,
and their live output, on this machine. Run as root with `make demo`; Ctrl-C stops it all.

What it starts, in order:
  kube-apiserver + etcd (built from their Go modules, cached), the CRDs;
  a simulated node "demo-node": a Node object, an agent Pod object, and a real
    `tracekeeper-agent serve` process loading BPF programs into this kernel;
  the operator (`tracekeeper-operator run`) against that apiserver;
  namespace "shop" with pods web-0, web-1 (app=web) and db-0 (app=db), each with a
    container cgroup and a real process in it, as a kubelet and containerd would;
  the output API (output.tracekeeper.dev) behind the apiserver's front proxy, served by
    the operator on loopback and reached through an ExternalName Service;
  the tenant "alice", with the `edit` role in "shop" only (tracekeeper's roles aggregate
    into it), applies examples/file-opens-by-pod.yaml and examples/exec-events.yaml.
Then, every two seconds, all as alice with her own kubeconfig: `kubectl get tp`,
`kubectl tracekeeper top web-file-opens --once` and the newest lines of
`kubectl tracekeeper tail exec-events`. No agent token is used to show them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.local_cluster import LocalCluster, build_binaries, find_free_ports
from tracekeeper_sim.output_api import APISERVICE, output_api_installed
from tracekeeper_sim.world import World, condition, wait_until

ROOT = Path(__file__).resolve().parents[1]

NAMESPACE = "shop"
TENANT = "alice"
PROBES = ("file-opens-by-pod.yaml", "exec-events.yaml")
TENANT_BINDING = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "RoleBinding",
    "metadata": {"name": "alice-edit", "namespace": NAMESPACE},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT}],
}
PLUGIN = Path(sys.executable).parent / "kubectl-tracekeeper"


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def as_tenant(cluster: LocalCluster, *args: str, namespace: str = NAMESPACE) -> list[str]:
    """`kubectl tracekeeper ARGS -n shop` as alice: the plugin's output lines (or its error)."""
    cmd = [str(PLUGIN), "--kubeconfig", str(cluster.kubeconfig(TENANT)), *args, "-n", namespace]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return (res.stdout or res.stderr).rstrip().splitlines()


def follow_events(cluster: LocalCluster, keep: deque[str], stop: threading.Event) -> None:
    """`kubectl tracekeeper tail exec-events` as alice, its newest lines into `keep`."""
    cmd = [str(PLUGIN), "--kubeconfig", str(cluster.kubeconfig(TENANT)),
           "tail", "exec-events", "-n", NAMESPACE]  # fmt: skip
    while not stop.is_set():
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as tail:  # fmt: skip
            assert tail.stdout is not None
            for line in tail.stdout:
                keep.append(line.rstrip())
                if stop.is_set():
                    break
            tail.terminate()
        stop.wait(1)


def show(cluster: LocalCluster, events: deque[str]) -> None:
    table = cluster.kubectl("get", "tp", "-n", NAMESPACE, "-o", "wide", user=TENANT)
    print(f"\n--- {time.strftime('%H:%M:%S')}  kubectl get tp -n {NAMESPACE}  (as {TENANT})")
    print(table.stdout.rstrip() or table.stderr.rstrip())
    print(f"--- kubectl tracekeeper top web-file-opens --once -n {NAMESPACE}  (as {TENANT})")
    for line in as_tenant(cluster, "top", "web-file-opens", "--once"):
        print(f"    {line}")
    print(f"--- kubectl tracekeeper tail exec-events -n {NAMESPACE}  (as {TENANT}, newest 3)")
    for line in list(events)[-3:]:
        print(f"    {line}")
    sys.stdout.flush()


def run(seconds: float | None) -> None:
    say("building or reusing kube-apiserver, etcd and kubectl (first time: ~5 minutes)")
    bin_dir = build_binaries()
    workdir = Path(tempfile.mkdtemp(prefix="tracekeeper-demo-"))
    try:
        _run_in(workdir, bin_dir, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        say("stopped")


def _run_in(workdir: Path, bin_dir: Path, seconds: float | None) -> None:
    with LocalCluster(bin_dir, workdir / "cluster") as cluster:
        say(f"control plane up at {cluster.server}; admin kubeconfig {cluster.kubeconfig()}")
        cluster.apply_crds(ROOT / "crds")
        world = World(cluster, workdir, detect_root())
        stop = threading.Event()
        (output_port,) = find_free_ports(1)
        with output_api_installed(cluster, output_port):
            try:
                say("node demo-node: agent starting (loads BPF programs into this kernel)")
                node = world.add_node("demo-node")
                say("operator starting, serving the output API (output.tracekeeper.dev)")
                world.start_operator(output_api_port=output_port)
                cluster.kubectl("wait", "--for=condition=Available", f"apiservice/{APISERVICE}",
                                "--timeout=60s", check=True)  # fmt: skip
                world.kube.create(
                    "/api/v1/namespaces",
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
                )
                cluster.kubectl("apply", "-f", "-", input=json.dumps(TENANT_BINDING), check=True)
                for name, app in (("web-0", "web"), ("web-1", "web"), ("db-0", "db")):
                    world.create_pod(NAMESPACE, name, node, {"app": app})
                say("pods web-0, web-1 (app=web) and db-0 (app=db) running real processes")
                for example in PROBES:
                    path = ROOT / "examples" / example
                    say(f"{TENANT} applies examples/{example}")
                    cluster.kubectl(
                        "apply", "-n", NAMESPACE, "-f", str(path), user=TENANT, check=True
                    )
                wait_until(
                    "web-file-opens Ready",
                    lambda: (
                        (c := condition(world.probe(NAMESPACE, "web-file-opens"), "Ready"))
                        and c["status"] == "True"
                    ),
                    timeout=120,
                )
                events: deque[str] = deque(maxlen=50)
                threading.Thread(
                    target=follow_events, args=(cluster, events, stop), daemon=True
                ).start()
                say(f"{TENANT} reads outside {NAMESPACE}: kubectl tracekeeper top web-file-opens "
                    "-n kube-system")  # fmt: skip
                for line in as_tenant(cluster, "top", "web-file-opens", namespace="kube-system"):
                    print(f"    {line}")
                say("live output every 2 s; Ctrl-C stops the demo and cleans up")
                deadline = None if seconds is None else time.monotonic() + seconds
                while deadline is None or time.monotonic() < deadline:
                    show(cluster, events)
                    time.sleep(2)
            finally:
                # A second Ctrl-C, or make's SIGTERM after it, must not cut the cleanup short.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                stop.set()
                say("stopping: operator, agent (programs detached), pods, cgroups, control plane")
                world.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="tracekeeper's local demo (root)")
    parser.add_argument("--for", dest="seconds", type=float, help="stop after this many seconds")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM both end in the clean-up, also when started with SIGINT ignored
    # (as a background job of a non-interactive shell is).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        run(args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
