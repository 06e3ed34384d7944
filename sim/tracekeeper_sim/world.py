"""The operator's e2e world: simulated nodes and workloads on a real apiserver and kernel.

Each simulated node is a Node object, an agent Pod object (labelled as the DaemonSet's and
controlled by an agent DaemonSet object, which nothing runs here: no controller-manager;
bound to the node, with the endpoint annotation, which the operator is told to trust) and
a real `tracekeeper-agent serve` process on a loopback port. Workload pods are Pod objects
bound to those nodes whose status a "kubelet" (this module) fills with container IDs, with
the matching cgroups (systemd driver, containerd naming) under a test-owned subtree of the
cgroup v2 root and real processes in them. The operator runs as its own process, as in a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tracekeeper_agent.host.bpffs import PIN_ROOT
from tracekeeper_sim import kubelet
from tracekeeper_sim.kubelet import create_cgroup, remove_cgroup_tree
from tracekeeper_sim.local_cluster import LocalCluster, find_free_ports

BIN = Path(sys.executable).parent
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
OPERATOR_NS = "tracekeeper-system"
AGENT_LABELS = {"app.kubernetes.io/name": "tracekeeper-agent"}
AGENT_DAEMONSET = "tracekeeper-agent"
ENDPOINT_ANNOTATION = "tracekeeper.dev/agent-endpoint"
GROUP_PATH = "/apis/tracekeeper.dev/v1alpha1"
WAIT_SECONDS = 90.0
T = TypeVar("T")


class Kube:
    """JSON over LocalCluster.request, as admin."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def _call(
        self,
        path: str,
        method: str = "GET",
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        status, text = self.cluster.request(
            path,
            method=method,
            body=None if body is None else json.dumps(body),
            content_type=content_type,
            timeout=30,
        )
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def get(self, path: str) -> Any:
        status, obj = self._call(path)
        if status == 404:
            return None
        assert status == 200, f"GET {path}: HTTP {status}: {obj}"
        return obj

    def create(self, path: str, obj: dict[str, Any]) -> Any:
        status, out = self._call(path, "POST", obj)
        assert status in (200, 201), f"POST {path}: HTTP {status}: {out}"
        return out

    def merge(self, path: str, patch: dict[str, Any]) -> Any:
        status, out = self._call(path, "PATCH", patch, "application/merge-patch+json")
        assert status == 200, f"PATCH {path}: HTTP {status}: {out}"
        return out

    def delete(self, path: str, *, force: bool = False) -> None:
        body = {"gracePeriodSeconds": 0} if force else None
        status, out = self._call(path, "DELETE", body)
        assert status in (200, 202, 404), f"DELETE {path}: HTTP {status}: {out}"


def wait_until(
    what: str,
    check: Callable[[], T | None],
    timeout: float = WAIT_SECONDS,
    describe: Callable[[], str] | None = None,
    max_delay: float = 0.5,
) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline.
    The delay grows to `max_delay`: a wait whose length is a reported figure keeps it small,
    or the figure is the poll's step (up to 0.5 s) as much as the thing measured."""
    deadline = time.monotonic() + timeout
    delay = min(0.05, max_delay)
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            detail = f"\n{describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(delay)
        delay = min(delay * 1.5, max_delay)


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphans


def _spawn_logged(log_path: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    """A process of its own session, output appended to `log_path`, ended with us."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _stop(popen: subprocess.Popen[bytes], *, kill: bool = False, timeout: float = 30) -> None:
    if popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- agents -------------------------------------------------------------------------------


@dataclass
class AgentProcess:
    node: str
    port: int
    state_dir: Path
    token: str
    token_file: Path
    log_path: Path
    metrics_port: int
    """serve --metrics-listen, as the DaemonSet runs it: /metrics without the token."""
    popen: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> None:
        """Start `serve`; `wait`: until /readyz answers (the persisted state restored)."""
        self.popen = _spawn_logged(
            self.log_path,
            [
                str(BIN / "tracekeeper-agent"),
                "--log-level",
                "info",
                "serve",
                "--node-name",
                self.node,
                "--listen",
                f"127.0.0.1:{self.port}",
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--token-file",
                str(self.token_file),
                "--state-dir",
                str(self.state_dir),
            ],
        )

        if not wait:
            return

        def ready() -> bool:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(f"agent {self.node} exited:\n{_tail(self.log_path)}")
            return self.http("/readyz")[0] == 200

        # Chaos reports the time to ready: polled finely (a GET /readyz every 20 ms).
        wait_until(f"agent {self.node} ready", ready, timeout=60, max_delay=0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: no clean shutdown, the kernel drops its fds."""
        if self.popen is not None:
            _stop(self.popen, kill=True)

    def stop(self) -> None:
        if self.popen is not None:
            _stop(self.popen)
        # A stopped agent unpins all it pinned; one killed before left its programs pinned
        # for a successor this node will not have: they detach with the pins.
        shutil.rmtree(PIN_ROOT / self.node, ignore_errors=True)

    def http(self, path: str, *, port: int | None = None, token: bool = True) -> tuple[int, str]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port or self.port}{path}",
            headers={"Authorization": f"Bearer {self.token}"} if token else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            return 0, str(e)

    def report(self) -> dict[str, Any]:
        status, text = self.http("/v1/state")
        assert status == 200, f"agent {self.node}: GET /v1/state: {status} {text}"
        report: dict[str, Any] = json.loads(text)
        return report

    def outcome(self, probe_id: str) -> dict[str, Any] | None:
        return next((p for p in self.report()["probes"] if p["id"] == probe_id), None)

    def metrics(self) -> str:
        """What Prometheus scrapes: the metrics listener, no token."""
        status, text = self.http("/metrics", port=self.metrics_port, token=False)
        assert status == 200, f"agent {self.node}: GET /metrics: {status}"
        return text


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(metrics_text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name`, with its labels."""
    out = []
    for line in metrics_text.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == name:
            out.append((dict(_LABEL.findall(m["labels"] or "")), float(m["value"])))
    return out


def hits_by_pod(metrics_text: str, namespace: str, probe: str) -> dict[str, float]:
    """tracekeeper_probe_hits_total of one probe, summed by pod."""
    by_pod: dict[str, float] = {}
    for labels, value in samples(metrics_text, "tracekeeper_probe_hits_total"):
        if labels.get("namespace") == namespace and labels.get("probe") == probe:
            by_pod[labels.get("pod", "")] = by_pod.get(labels.get("pod", ""), 0) + value
    return by_pod


def bpf_prog_ids() -> set[int]:
    return _bpf_ids("prog")


def bpf_map_ids() -> set[int]:
    return _bpf_ids("map")


def _bpf_ids(kind: str) -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True
    )
    return {int(p["id"]) for p in json.loads(out.stdout)}


def wait_bpf_gone(programs: set[int], maps: set[int], timeout: float) -> set[str]:
    """Those of these programs and maps the kernel still lists after `timeout` (freeing is
    deferred after their last fd closes), named `prog N` / `map N`."""
    deadline = time.monotonic() + timeout
    while True:
        left = {f"prog {i}" for i in programs & bpf_prog_ids()}
        left |= {f"map {i}" for i in maps & bpf_map_ids()}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# --- nodes and pods --------------------------------------------------------------------------


@dataclass
class SimNode:
    name: str
    agent: AgentProcess
    sandbox: Path
    """This node's subtree of the cgroup v2 root (its kubepods tree lives below)."""

    @property
    def besteffort(self) -> Path:
        return kubelet.qos_dir(self.sandbox, kubelet.QosClass.BESTEFFORT)


@dataclass
class FakePod:
    namespace: str
    name: str
    uid: str
    node: SimNode
    containers: dict[str, str]
    """container name -> bare container id (64 hex)."""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return kubelet.pod_dir(self.node.besteffort, self.uid, kubelet.QosClass.BESTEFFORT)

    def container_dir(self, name: str) -> Path:
        return kubelet.container_dir(self.directory, self.containers[name])

    def start(self, container: str) -> None:
        """A process in the container's cgroup (placed before it execs, as a runtime does)
        that opens a file ten times a second."""
        cg = self.container_dir(container)
        loop = "while :; do cat /etc/hostname >/dev/null; sleep 0.1; done"
        self.procs.append(
            subprocess.Popen(
                ["sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec sh -c "$0"', loop],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        )

    def stop(self, evacuate_to: Path) -> None:
        for proc in self.procs:
            _stop(proc, kill=True)
        self.procs.clear()
        remove_cgroup_tree(self.directory, evacuate_to=evacuate_to)


class World:
    """Nodes, agents, pods and the operator of one e2e module."""

    def __init__(self, cluster: LocalCluster, workdir: Path, cgroup_root: Path) -> None:
        self.cluster = cluster
        self.kube = Kube(cluster)
        self.workdir = workdir
        self.cgroup_root = cgroup_root
        self.run_id = uuid.uuid4().hex[:6]
        self.token = secrets.token_hex(16)
        self.token_file = workdir / "agent-token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        self.nodes: dict[str, SimNode] = {}
        self.pods: list[FakePod] = []
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_log = workdir / "operator.log"
        self.metrics_port, self.liveness_port = find_free_ports(2)
        if self.kube.get(f"/api/v1/namespaces/{OPERATOR_NS}") is None:
            self.kube.create("/api/v1/namespaces", _meta("Namespace", OPERATOR_NS))
        self.agent_owner = self._agent_daemonset()

    def _agent_daemonset(self) -> dict[str, Any]:
        """The agent DaemonSet object (shared by the worlds of one apiserver), as the
        controller ownerReference its pods carry: the operator trusts no other pods."""
        path = f"/apis/apps/v1/namespaces/{OPERATOR_NS}/daemonsets"
        ds = self.kube.get(f"{path}/{AGENT_DAEMONSET}")
        if ds is None:
            ds = self.kube.create(
                path,
                {
                    "apiVersion": "apps/v1",
                    "kind": "DaemonSet",
                    "metadata": {"name": AGENT_DAEMONSET, "labels": AGENT_LABELS},
                    "spec": {
                        "selector": {"matchLabels": AGENT_LABELS},
                        "template": {
                            "metadata": {"labels": AGENT_LABELS},
                            "spec": {
                                "containers": [{"name": "agent", "image": "tracekeeper-agent:e2e"}]
                            },
                        },
                    },
                },
            )
        return {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "name": AGENT_DAEMONSET,
            "uid": ds["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }

    # -- nodes ---------------------------------------------------------------------------

    def add_node(self, name: str, labels: dict[str, str] | None = None) -> SimNode:
        self.kube.create("/api/v1/nodes", _meta("Node", name, labels=labels or {}))
        sandbox = self.cgroup_root / f"tk-e2e-{self.run_id}-{name}"
        # Made before the agent starts: it looks for kubepods trees when it starts.
        create_cgroup(kubelet.qos_dir(sandbox, kubelet.QosClass.BESTEFFORT))
        port, metrics_port = find_free_ports(2)
        agent = AgentProcess(
            name,
            port,
            self.workdir / f"agent-{name}",
            self.token,
            self.token_file,
            self.workdir / f"agent-{name}.log",
            metrics_port,
        )
        agent.start()
        node = SimNode(name, agent, sandbox)
        self.nodes[name] = node
        pod = _meta(
            "Pod",
            f"tracekeeper-agent-{name}",
            labels=AGENT_LABELS,
            annotations={ENDPOINT_ANNOTATION: agent.endpoint},
        )
        pod["metadata"]["ownerReferences"] = [self.agent_owner]
        pod["spec"] = {
            "nodeName": name,
            "containers": [
                {
                    "name": "agent",
                    "image": "tracekeeper-agent:e2e",
                    "ports": [{"name": "api", "containerPort": port}],
                }
            ],
        }
        self.kube.create(f"/api/v1/namespaces/{OPERATOR_NS}/pods", pod)
        self._kubelet_status(OPERATOR_NS, pod["metadata"]["name"], {"agent": None})
        return node

    def restart_agent(self, node: SimNode, *, wipe_state: bool) -> None:
        node.agent.kill()
        if wipe_state:
            remove_tree(node.agent.state_dir)
        node.agent.start()

    # -- pods -------------------------------------------------------------------------------

    def create_pod(
        self,
        namespace: str,
        name: str,
        node: SimNode,
        labels: dict[str, str],
        containers: tuple[str, ...] = ("app",),
        *,
        run: bool = True,
    ) -> FakePod:
        obj = _meta("Pod", name, labels=labels)
        obj["spec"] = {
            "nodeName": node.name,
            "containers": [{"name": c, "image": "app:e2e"} for c in containers],
        }
        created = self.kube.create(f"/api/v1/namespaces/{namespace}/pods", obj)
        pod = FakePod(
            namespace,
            name,
            created["metadata"]["uid"],
            node,
            {c: secrets.token_hex(32) for c in containers},
        )
        self.pods.append(pod)
        for c in containers:
            create_cgroup(pod.container_dir(c))
        self._kubelet_status(namespace, name, pod.containers)
        if run:
            for c in containers:
                pod.start(c)
        return pod

    def delete_pod(self, pod: FakePod) -> None:
        """Force-delete (no kubelet confirms a graceful one), then what kubelet would do."""
        self.kube.delete(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}", force=True)
        pod.stop(self.cgroup_root)
        self.pods.remove(pod)

    def kubelet_status(self, namespace: str, name: str, ids: Mapping[str, str | None]) -> None:
        """Mark a pod Running and Ready with these containers, as its kubelet would."""
        self._kubelet_status(namespace, name, ids)

    def _kubelet_status(self, namespace: str, name: str, ids: Mapping[str, str | None]) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        statuses = [
            {
                "name": c,
                "ready": True,
                "restartCount": 0,
                "started": True,
                "image": "app:e2e",
                "imageID": "",
                "containerID": f"containerd://{cid or secrets.token_hex(32)}",
                "state": {"running": {"startedAt": now}},
            }
            for c, cid in ids.items()
        ]
        self.kube.merge(
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {
                "status": {
                    "phase": "Running",
                    "podIP": "10.1.0.1",
                    "hostIP": "10.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": statuses,
                }
            },
        )

    # -- the operator ---------------------------------------------------------------------

    def start_operator(self, output_api_port: int = 0) -> None:
        """`output_api_port`: serve the aggregated output API on 127.0.0.1 there (0: off)."""
        # Picked now, not at construction: agents started in between (20 for the control-
        # plane benchmark) make outgoing connections whose ephemeral ports could take them.
        self.metrics_port, self.liveness_port = find_free_ports(2)
        self.operator = _spawn_logged(
            self.operator_log,
            [
                str(BIN / "tracekeeper-operator"),
                "run",
                "--namespace",
                OPERATOR_NS,
                # The agents are local processes, not at their pods' IPs.
                "--trust-agent-endpoint-annotation",
                "--token-file",
                str(self.token_file),
                "--kubeconfig",
                str(self.cluster.kubeconfig("admin")),
                "--metrics-port",
                str(self.metrics_port),
                "--metrics-address",
                "127.0.0.1",
                "--liveness",
                f"http://127.0.0.1:{self.liveness_port}/healthz",
                "--push-debounce",
                "0.1",
                "--resync-interval",
                "1",
                "--backoff-max",
                "1",
                "--unload-timeout",
                "60",
                "--output-api-port",
                str(output_api_port),
                "--output-api-address",
                "127.0.0.1",
            ],
        )

        def rendering() -> bool:
            # Its metrics, not its liveness endpoint: kopf caches probe results for seconds.
            assert self.operator is not None
            if self.operator.poll() is not None:
                raise AssertionError(f"operator exited:\n{_tail(self.operator_log)}")
            try:
                return self.operator_metric("tracekeeper_operator_renders_total") >= 1
            except OSError:
                return False

        wait_until(
            "the operator's first render",
            rendering,
            timeout=60,
            describe=lambda: _tail(self.operator_log),
        )

    def kill_operator(self) -> None:
        """SIGKILL, as a crash or an OOM kill: no handler finishes, no finalizer is
        released on the way out."""
        if self.operator is not None:
            _stop(self.operator, kill=True)
            self.operator = None

    def stop_operator(self) -> None:
        if self.operator is not None:
            _stop(self.operator)
            self.operator = None

    def operator_metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
            text = resp.read().decode()
        return sum(
            v for ls, v in samples(text, name) if all(ls.get(k) == x for k, x in labels.items())
        )

    def operator_log_tail(self) -> str:
        return _tail(self.operator_log, 60)

    # -- objects ----------------------------------------------------------------------------

    def namespace(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:5]}"
        self.kube.create("/api/v1/namespaces", _meta("Namespace", name, labels=labels or {}))
        return name

    def probe(self, namespace: str, name: str) -> Any:
        return self.kube.get(f"{GROUP_PATH}/namespaces/{namespace}/traceprobes/{name}")

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        out = self.kube.get(
            f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name%3D{name}"
        )
        items: list[dict[str, Any]] = out["items"]
        return items

    def close(self) -> None:
        self.stop_operator()
        for pod in list(self.pods):
            pod.stop(self.cgroup_root)
        for node in self.nodes.values():
            node.agent.stop()
            remove_cgroup_tree(node.sandbox, evacuate_to=self.cgroup_root)
            # The apiserver outlives this world: leave no agent pod or Node for the next
            # world's operator to push to.
            self.kube.delete(
                f"/api/v1/namespaces/{OPERATOR_NS}/pods/tracekeeper-agent-{node.name}", force=True
            )
            self.kube.delete(f"/api/v1/nodes/{node.name}")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    if not obj:
        return None
    conditions: list[dict[str, Any]] = obj.get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == type_), None)


def remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _meta(
    kind: str,
    name: str,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    api = "v1"
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": api, "kind": kind, "metadata": meta}
