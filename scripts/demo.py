"""The local demo: a real control plane, the operator, one node agent, a tenant's probes,
and their live output, on this machine. Run as root with `make demo`; Ctrl-C stops it all.

What it starts, in order:
  kube-apiserver + etcd (built from their Go modules, cached), the CRDs;
  a simulated node "demo-node": a Node object, an agent Pod object, and a real
    `tracekeeper-agent serve` process loading BPF programs into this kernel;
  the operator (`tracekeeper-operator run`) against that apiserver;
  namespace "shop" with pods web-0, web-1 (app=web) and db-0 (app=db), each with a
    container cgroup and a real process in it, as a kubelet and containerd would;
  the tenant "alice", allowed to manage TraceProbes in "shop" only, applies
    examples/file-opens-by-pod.yaml and examples/exec-events.yaml.
Then, every two seconds: `kubectl get tp` as alice, the agent's per-pod counts from its
Prometheus endpoint, and the newest events of its NDJSON stream.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.local_cluster import LocalCluster, build_binaries
from tracekeeper_sim.world import World, condition, hits_by_pod, wait_until

ROOT = Path(__file__).resolve().parents[1]

NAMESPACE = "shop"
TENANT = "alice"
PROBES = ("file-opens-by-pod.yaml", "exec-events.yaml")
TENANT_ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "Role",
    "metadata": {"name": "tracing", "namespace": NAMESPACE},
    "rules": [
        {
            "apiGroups": ["tracekeeper.dev"],
            "resources": ["traceprobes", "tracefilters"],
            "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
        }
    ],
}
TENANT_BINDING = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "RoleBinding",
    "metadata": {"name": "alice-tracing", "namespace": NAMESPACE},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tracing"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT}],
}


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def follow_events(world: World, probe_id: str, keep: deque[str], stop: threading.Event) -> None:
    """Read the agent's NDJSON stream of one probe into `keep` (the newest lines)."""
    agent = next(iter(world.nodes.values())).agent
    req = urllib.request.Request(
        f"{agent.endpoint}/v1/events?probe={probe_id}",
        headers={"Authorization": f"Bearer {agent.token}"},
    )
    while not stop.is_set():
        with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=5) as resp:
            for line in resp:
                keep.append(line.decode().strip())
                if stop.is_set():
                    return
        stop.wait(1)


def show(world: World, events: deque[str]) -> None:
    cluster = world.cluster
    table = cluster.kubectl("get", "tp", "-n", NAMESPACE, "-o", "wide", user=TENANT)
    metrics = next(iter(world.nodes.values())).agent.metrics()
    counts = hits_by_pod(metrics, NAMESPACE, "web-file-opens")
    print(f"\n--- {time.strftime('%H:%M:%S')}  kubectl get tp -n {NAMESPACE}  (as {TENANT})")
    print(table.stdout.rstrip() or table.stderr.rstrip())
    print("--- files opened, by pod (tracekeeper_probe_hits_total, web-file-opens)")
    for pod, value in sorted(counts.items()):
        print(f"    {pod:<12} {int(value):>8}")
    print(f"--- exec events (NDJSON stream, {NAMESPACE}/exec-events, newest 3)")
    for line in list(events)[-3:]:
        e = json.loads(line)
        print(f"    {e['time']}  pod={e['pod']:<8} comm={e['comm']:<6} {e.get('filename', '')}")
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
        cluster.kubectl("apply", "-f", str(ROOT / "crds"), check=True)
        cluster.kubectl(
            "wait", "--for", "condition=established", "--timeout=60s", "crd", "--all", check=True
        )
        world = World(cluster, workdir, detect_root())
        stop = threading.Event()
        try:
            say("node demo-node: agent starting (loads BPF programs into this kernel)")
            node = world.add_node("demo-node")
            say("operator starting")
            world.start_operator()
            world.kube.create(
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            )
            for obj in (TENANT_ROLE, TENANT_BINDING):
                cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=True)
            for name, app in (("web-0", "web"), ("web-1", "web"), ("db-0", "db")):
                world.create_pod(NAMESPACE, name, node, {"app": app})
            say("pods web-0, web-1 (app=web) and db-0 (app=db) running real processes")
            for example in PROBES:
                path = ROOT / "examples" / example
                say(f"{TENANT} applies examples/{example}")
                cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(path), user=TENANT, check=True)
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
                target=follow_events,
                args=(world, f"{NAMESPACE}/exec-events", events, stop),
                daemon=True,
            ).start()
            say("live output every 2 s; Ctrl-C stops the demo and cleans up")
            deadline = None if seconds is None else time.monotonic() + seconds
            while deadline is None or time.monotonic() < deadline:
                show(world, events)
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
