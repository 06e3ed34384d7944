"""manifests/ against the real apiserver: `kubectl apply -k` of the base and of the
monitoring overlay passes a server dry-run; installed for real, the admission policy
refuses each privileged field in a tenant namespace (and admits it in tracekeeper-system),
tenants get TraceProbe rights through the default admin/edit/view roles and no more, the
operator's and the agent's ServiceAccounts hold exactly their rights, and the real operator
runs under its ServiceAccount's token without a single Forbidden. The real agent runs the
DaemonSet's command line: what the monitoring overlay's PodMonitor scrapes answers without
the token, and the API port still wants it.

The installation is torn down at the end of the module (all but the namespace and the
CRDs, which other modules share): the operator e2e tests expect no admission policy.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tracekeeper_operator.settings import DEFAULT_AGENT_PORT_NAME
from tracekeeper_sim.local_cluster import LocalCluster, find_free_ports
from tracekeeper_sim.output_api import AGGREGATED, aggregate_cluster_roles

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
MONITORING = MANIFESTS / "overlays" / "monitoring"
MONITORING_CRDS = Path(__file__).resolve().parent / "data" / "monitoring-crds.yaml"
SYSTEM_NS = "tracekeeper-system"
GROUP = "tracekeeper.dev"
API_VERSION = f"{GROUP}/v1alpha1"
TP = "syscalls:sys_enter_openat"
OPERATOR_SA = f"system:serviceaccount:{SYSTEM_NS}:tracekeeper-operator"
AGENT_SA = f"system:serviceaccount:{SYSTEM_NS}:tracekeeper-agent"
DEADLINE = 60.0

Obj = dict[str, Any]

# Every privileged field, as an object that sets it; the field path the refusal must name.
PRIVILEGED: list[tuple[str, Obj, str]] = [
    ("TraceFilter", {"hostWide": True}, "spec.hostWide"),
    ("TraceFilter", {"pids": [1]}, "spec.pids"),
    ("TraceFilter", {"cgroupPaths": ["/system.slice"]}, "spec.cgroupPaths"),
    ("TraceFilter", {"namespaceSelector": {"matchLabels": {"team": "x"}}},
     "spec.namespaceSelector"),
    ("TraceProbe", {"tracepoint": TP, "filter": {"hostWide": True}}, "spec.filter.hostWide"),
    ("TraceProbe", {"tracepoint": TP, "filter": {"pids": [1]}}, "spec.filter.pids"),
    ("TraceProbe", {"tracepoint": TP, "filter": {"cgroupPaths": ["/system.slice"]}},
     "spec.filter.cgroupPaths"),
    ("TraceProbe", {"tracepoint": TP, "filter": {"namespaceSelector": {}}},
     "spec.filter.namespaceSelector"),
    ("TraceProbe", {"program": {"source": 'TRACEPOINT_PROBE(sched, sched_switch) '
                                          '{ TK_FILTER(); TK_COUNT(); return 0; }'}},
     "spec.program"),
    # Attach points about other tasks or the kernel (tracekeeper_api.tenant_rules).
    ("TraceProbe", {"tracepoint": "sched:sched_switch"}, "spec.tracepoint"),
    ("TraceProbe", {"tracepoint": "irq:irq_handler_entry"}, "spec.tracepoint"),
    ("TraceProbe", {"tracepoint": "kmem:kmalloc"}, "spec.tracepoint"),
    ("TraceProbe", {"kprobe": {"function": "tcp_v4_connect"}}, "spec.kprobe"),
    ("TraceProbe", {"rawTracepoint": "irq_handler_entry"}, "spec.rawTracepoint"),
]  # fmt: skip


def _obj(kind: str, name: str, spec: Obj) -> str:
    return json.dumps(
        {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
    )


def _build(cluster: LocalCluster, path: Path) -> list[Obj]:
    out = cluster.kubectl("kustomize", str(path), check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _create(
    cluster: LocalCluster, ns: str, doc: str, *, user: str = "admin", dry_run: bool = False
) -> subprocess.CompletedProcess[str]:
    args = ["create", "-n", ns, "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    return cluster.kubectl(*args, input=doc, user=user)


def _can_i(
    cluster: LocalCluster, verb: str, resource: str, *args: str, user: str = "admin"
) -> bool:
    res = cluster.kubectl("auth", "can-i", verb, resource, *args, user=user)
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), res.stdout + res.stderr
    return answer == "yes"


def _wait(what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


@pytest.fixture(scope="module")
def system_namespace(cluster: LocalCluster, crds: list[str]) -> str:
    """tracekeeper-system exists for real: a server dry-run of the objects inside it is
    refused (NotFound) while the namespace itself is only dry-run-created."""
    (namespace,) = [d for d in _build(cluster, MANIFESTS) if d["kind"] == "Namespace"]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(namespace), check=True)
    return str(namespace["metadata"]["name"])


# -- server dry-run ----------------------------------------------------------------------


def _dry_run(cluster: LocalCluster, path: Path) -> None:
    docs = _build(cluster, path)
    res = cluster.kubectl("apply", "--dry-run=server", "-k", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(docs), res.stdout
    assert all(line.endswith("(server dry run)") for line in lines), res.stdout


def test_base_passes_a_server_dry_run(cluster: LocalCluster, system_namespace: str) -> None:
    assert system_namespace == SYSTEM_NS
    _dry_run(cluster, MANIFESTS)


@pytest.fixture(scope="module")
def monitoring_crds(cluster: LocalCluster) -> None:
    cluster.kubectl("apply", "-f", str(MONITORING_CRDS), check=True)
    names = cluster.kubectl(
        "get", "-f", str(MONITORING_CRDS), "-o", "jsonpath={.items[*].metadata.name}", check=True
    ).stdout.split()
    cluster.kubectl(
        "wait", "--for", "condition=established", "--timeout=60s",
        *(f"crd/{n}" for n in names), check=True,
    )  # fmt: skip


def test_monitoring_overlay_passes_a_server_dry_run(
    cluster: LocalCluster, system_namespace: str, monitoring_crds: None
) -> None:
    _dry_run(cluster, MONITORING)
    kinds = {d["kind"] for d in _build(cluster, MONITORING)}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds


# -- installed for real ---------------------------------------------------------------------


def _policy_active(cluster: LocalCluster, ns: str) -> bool:
    """Both policies refuse (a new policy takes a moment to be enforced)."""
    refused = 0
    host_wide = {"hostWide": True}
    for kind, spec in (
        ("TraceFilter", host_wide),
        ("TraceProbe", {"tracepoint": TP, "filter": host_wide}),
    ):
        res = _create(cluster, ns, _obj(kind, "probe-policy", spec), dry_run=True)
        refused += "ValidatingAdmissionPolicy" in res.stderr
    return refused == 2


@dataclass
class Installed:
    tenant_ns: str
    legacy_ns: str
    docs: list[Obj]


@pytest.fixture(scope="module")
def installed(
    cluster: LocalCluster, system_namespace: str, make_namespace: Callable[[str], str]
) -> Iterator[Installed]:
    # A privileged object from before the policy existed (a cluster upgraded to it).
    legacy_ns = make_namespace("legacy")
    cluster.kubectl("create", "-n", legacy_ns, "-f", "-", check=True,
                    input=_obj("TraceFilter", "old-host-wide", {"hostWide": True}))  # fmt: skip
    docs = _build(cluster, MANIFESTS)
    original_rules = {
        name: json.loads(cluster.kubectl("get", "clusterrole", name, "-o", "json",
                                         check=True).stdout).get("rules")
        for name in AGGREGATED
    }  # fmt: skip
    tenant_ns = make_namespace("team-x")
    try:
        cluster.kubectl("apply", "-k", str(MANIFESTS), check=True)
        _wait("the admission policies to be enforced", lambda: _policy_active(cluster, tenant_ns))
        aggregate_cluster_roles(cluster)
        yield Installed(tenant_ns, legacy_ns, docs)
    finally:
        # Everything but what other modules share (the namespace, the CRDs); no namespace
        # controller runs to finish a namespace deletion.
        removable = [d for d in docs if d["kind"] not in ("Namespace", "CustomResourceDefinition")]
        cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List",
                                          "items": removable}), check=True)  # fmt: skip
        for name, rules in original_rules.items():
            cluster.kubectl("patch", "clusterrole", name, "--type=merge",
                            "-p", json.dumps({"rules": rules}), check=True)  # fmt: skip


def test_applied_objects_show_no_drift(cluster: LocalCluster, installed: Installed) -> None:
    # What a GitOps tool sees after the apply: the server keeps the objects as written
    # (kubectl diff is a server-side dry-run compared with the live objects).
    res = cluster.kubectl("diff", "-k", str(MANIFESTS))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("kind", "spec", "field"), PRIVILEGED, ids=[f"{k}:{f}" for k, _, f in PRIVILEGED]
)
def test_policy_refuses_privileged_fields_in_a_tenant_namespace(
    cluster: LocalCluster, installed: Installed, kind: str, spec: Obj, field: str
) -> None:
    res = _create(cluster, installed.tenant_ns, _obj(kind, "sneaky", spec))
    assert res.returncode != 0
    assert f"{field} is privileged" in res.stderr, res.stderr
    assert f"not in {installed.tenant_ns}" in res.stderr or (
        f"not from {installed.tenant_ns}" in res.stderr
    ), res.stderr
    assert "NotFound" in cluster.kubectl("get", kind, "sneaky", "-n", installed.tenant_ns).stderr


@pytest.mark.parametrize(
    ("kind", "spec", "field"), PRIVILEGED, ids=[f"{k}:{f}" for k, _, f in PRIVILEGED]
)
def test_policy_admits_privileged_fields_in_tracekeeper_system(
    cluster: LocalCluster, installed: Installed, kind: str, spec: Obj, field: str
) -> None:
    name = f"allowed-{secrets.token_hex(3)}"
    res = _create(cluster, SYSTEM_NS, _obj(kind, name, spec))
    assert res.returncode == 0, res.stderr
    cluster.kubectl("delete", kind, name, "-n", SYSTEM_NS, "--wait=false", check=True)


def test_policy_admits_tenant_safe_objects(cluster: LocalCluster, installed: Installed) -> None:
    # The privileged fields at their "off" values are not privileged.
    safe = {"podSelector": {"matchLabels": {"app": "web"}}, "pids": [], "cgroupPaths": [],
            "hostWide": False, "processNames": ["nginx"]}  # fmt: skip
    ns = installed.tenant_ns
    assert _create(cluster, ns, _obj("TraceFilter", "web", safe)).returncode == 0
    probe = {"tracepoint": TP, "filter": safe}
    assert _create(cluster, ns, _obj("TraceProbe", "web-opens", probe)).returncode == 0
    # The tenant allowlist: a listed tracepoint, a whole listed category, a raw one.
    for name, spec in (
        ("execs", {"tracepoint": "sched:sched_process_exec"}),
        ("raw-enter", {"tracepoint": "raw_syscalls:sys_enter"}),
        ("switches", {"rawTracepoint": "sched_switch"}),
    ):
        res = _create(cluster, ns, _obj("TraceProbe", name, spec))
        assert res.returncode == 0, res.stderr


def test_policy_lets_an_older_privileged_object_be_relabelled_and_deleted(
    cluster: LocalCluster, installed: Installed
) -> None:
    ns, name = installed.legacy_ns, "tracefilter/old-host-wide"
    # Metadata only (what the operator does to release its finalizer): admitted.
    cluster.kubectl("label", "-n", ns, name, "reviewed=yes", check=True)
    # Any spec change: checked in full, refused while the privileged field stays.
    res = cluster.kubectl("patch", "-n", ns, name, "--type=merge",
                          "-p", '{"spec": {"processNames": ["bash"]}}')  # fmt: skip
    assert res.returncode != 0 and "spec.hostWide is privileged" in res.stderr, res.stderr
    cluster.kubectl("delete", "-n", ns, name, check=True)


# -- tenants through the default roles --------------------------------------------------------


def _bind(cluster: LocalCluster, ns: str, user: str, role: str) -> None:
    # What a cluster admin does for a team: a RoleBinding of a default ClusterRole.
    cluster.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
                    f"--user={user}", "-n", ns, check=True)  # fmt: skip


@pytest.fixture(scope="module")
def teams(
    cluster: LocalCluster, installed: Installed, make_namespace: Callable[[str], str]
) -> tuple[str, str]:
    alices, others = make_namespace("alice"), make_namespace("other")
    _bind(cluster, alices, "alice", "edit")
    _bind(cluster, alices, "bob", "view")
    return alices, others


def test_edit_lets_a_tenant_manage_probes_in_her_namespace_only(
    cluster: LocalCluster, teams: tuple[str, str]
) -> None:
    alices, others = teams
    for resource in (f"traceprobes.{GROUP}", f"tracefilters.{GROUP}"):
        for verb in ("create", "update", "patch", "delete", "list", "watch"):
            assert _can_i(cluster, verb, resource, "-n", alices, user="alice"), verb
        assert not _can_i(cluster, "create", resource, "-n", others, user="alice")
        assert not _can_i(cluster, "patch", resource, "-n", alices, "--subresource=status",
                          user="alice")  # fmt: skip
    probe = _obj("TraceProbe", "mine", {"syscall": {"name": "openat"}})
    created = _create(cluster, alices, probe, user="alice")
    assert created.returncode == 0, created.stderr
    denied = _create(cluster, others, probe, user="alice")
    assert denied.returncode != 0
    assert f'cannot create resource "traceprobes" in API group "{GROUP}"' in denied.stderr


def test_edit_does_not_grant_privileged_fields(
    cluster: LocalCluster, teams: tuple[str, str]
) -> None:
    alices, _ = teams
    res = _create(cluster, alices, _obj("TraceFilter", "all", {"hostWide": True}), user="alice")
    assert res.returncode != 0 and "spec.hostWide is privileged" in res.stderr, res.stderr


def test_view_reads_but_does_not_write(cluster: LocalCluster, teams: tuple[str, str]) -> None:
    alices, _ = teams
    tp = f"traceprobes.{GROUP}"
    assert _can_i(cluster, "list", tp, "-n", alices, user="bob")
    assert _can_i(cluster, "get", f"tracefilters.{GROUP}", "-n", alices, user="bob")
    for verb in ("create", "update", "patch", "delete"):
        assert not _can_i(cluster, verb, tp, "-n", alices, user="bob"), verb
    cluster.kubectl("get", "tp", "-n", alices, user="bob", check=True)
    res = _create(cluster, alices, _obj("TraceProbe", "bobs", {"syscall": {"name": "read"}}),
                  user="bob")  # fmt: skip
    assert res.returncode != 0 and 'User "bob" cannot create resource' in res.stderr


# -- the components' ServiceAccounts ---------------------------------------------------------


def test_operator_service_account_has_what_the_operator_uses(
    cluster: LocalCluster, installed: Installed
) -> None:
    def can(verb: str, resource: str, *args: str) -> bool:
        return _can_i(cluster, verb, resource, *args, f"--as={OPERATOR_SA}")

    for resource in ("pods", "namespaces", "nodes", f"traceprobes.{GROUP}",
                     f"tracefilters.{GROUP}"):  # fmt: skip
        assert can("watch", resource, "--all-namespaces"), resource
    assert can("patch", f"traceprobes.{GROUP}", "-n", installed.tenant_ns)
    for resource in (f"traceprobes.{GROUP}", f"tracefilters.{GROUP}"):
        assert can("patch", resource, "-n", installed.tenant_ns, "--subresource=status")
    assert can("create", "events", "-n", installed.tenant_ns)
    # ... and nothing it does not use.
    assert not can("get", "secrets", "-n", SYSTEM_NS)
    assert not can("create", "pods", "-n", SYSTEM_NS)
    assert not can("delete", f"traceprobes.{GROUP}", "-n", installed.tenant_ns)
    assert not can("update", f"traceprobes.{GROUP}", "-n", installed.tenant_ns)
    assert not can("patch", f"tracefilters.{GROUP}", "-n", installed.tenant_ns)
    assert not can("create", "clusterrolebindings")


def test_agent_service_account_can_do_nothing(cluster: LocalCluster, installed: Installed) -> None:
    for verb, resource in (("get", "pods"), ("list", "nodes"), ("get", "secrets"),
                           ("list", f"traceprobes.{GROUP}"), ("create", "events")):  # fmt: skip
        assert not _can_i(cluster, verb, resource, "--all-namespaces", f"--as={AGENT_SA}")


# -- the real operator under its ServiceAccount ---------------------------------------------


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan operator


def _kubeconfig(cluster: LocalCluster, token: str, path: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": cluster.server,
                                                   "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}],
        "current-context": "operator",
    }  # fmt: skip
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_operator_runs_with_only_its_service_account(
    cluster: LocalCluster,
    installed: Installed,
    make_namespace: Callable[[str], str],
    tmp_path: Path,
) -> None:
    # The Deployment's identity and command line, outside a pod: a token of the
    # ServiceAccount from the TokenRequest API, the Deployment's own args.
    token = cluster.kubectl("create", "token", "tracekeeper-operator", "-n", SYSTEM_NS,
                            "--duration=1h", check=True).stdout.strip()  # fmt: skip
    (deployment,) = [d for d in installed.docs if d["kind"] == "Deployment"]
    (entrypoint,) = re.findall(
        r"^ENTRYPOINT (\[.*\])$", (REPO / "Dockerfile.operator").read_text(), re.M
    )
    command: list[str] = json.loads(entrypoint)
    args = command[1:] + deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    metrics_port, health_port = find_free_ports(2)
    args = [a.replace("8080", str(metrics_port)).replace("8081", str(health_port))
            .replace("0.0.0.0", "127.0.0.1") for a in args]  # fmt: skip
    agent_token = tmp_path / "agent-token"
    agent_token.write_text(secrets.token_hex(32))
    log_path = tmp_path / "operator.log"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["POD_NAMESPACE"] = SYSTEM_NS  # the downward API's value
    with log_path.open("wb") as log:
        operator = subprocess.Popen(
            [str(Path(sys.executable).parent / command[0]), *args,
             "--kubeconfig", str(_kubeconfig(cluster, token, tmp_path / "kubeconfig")),
             "--token-file", str(agent_token), "--metrics-address", "127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    try:
        ns = make_namespace("rbac")
        created = _create(cluster, ns, _obj("TraceProbe", "opens", {"tracepoint": TP}))
        assert created.returncode == 0, created.stderr

        def handled() -> Obj | None:
            assert operator.poll() is None, log_path.read_text(errors="replace")
            obj: Obj = cluster.get("traceprobe", "opens", ns)
            has_finalizer = "tracekeeper.dev/unload" in obj["metadata"].get("finalizers", [])
            status = obj.get("status", {})
            written = status.get("observedGeneration") == obj["metadata"]["generation"]
            return obj if has_finalizer and written and status.get("conditions") else None

        _wait("the operator to hold its finalizer and write status", handled)
        # The Deployment's liveness probe, on the port and path its args give kopf.
        assert _wait(
            "kopf's liveness endpoint",
            lambda: _http_status(f"http://127.0.0.1:{health_port}/healthz") == 200,
        )
        assert _http_status(f"http://127.0.0.1:{metrics_port}/metrics") == 200
        # Deleting: the finalizer is released with the same rights.
        cluster.kubectl("delete", "traceprobe", "opens", "-n", ns, "--wait=false", check=True)
        _wait("the probe to be gone", lambda: "NotFound" in cluster.kubectl(
            "get", "traceprobe", "opens", "-n", ns).stderr)  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(operator.pid, signal.SIGTERM)
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(operator.pid, signal.SIGKILL)
            operator.wait()
    output = log_path.read_text(errors="replace")
    for sign in ("Forbidden", "forbidden", "Not enough permissions", "not watching Node"):
        assert sign not in output, f"{sign!r} in the operator's log:\n{output[-4000:]}"


# -- the real agent with the DaemonSet's command line ----------------------------------------


def test_agent_serves_the_pod_monitor_its_metrics_without_the_token(
    cluster: LocalCluster, system_namespace: str, tmp_path: Path
) -> None:
    # The DaemonSet as kustomize renders it, run outside a pod: its ENTRYPOINT and args,
    # each listener moved from its container port to a free loopback port.
    (daemonset,) = [d for d in _build(cluster, MANIFESTS) if d["kind"] == "DaemonSet"]
    (pod_monitor,) = [d for d in _build(cluster, MONITORING) if d["kind"] == "PodMonitor"]
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    local = dict(zip(named.values(), find_free_ports(len(named)), strict=True))
    (entrypoint,) = re.findall(
        r"^ENTRYPOINT (\[.*\])$", (REPO / "Dockerfile.agent").read_text(), re.M
    )
    command: list[str] = json.loads(entrypoint)
    args = []
    for arg in command[1:] + container["args"]:
        flag, _, value = arg.partition("=")
        if flag in ("--listen", "--metrics-listen"):
            arg = f"{flag}=127.0.0.1:{local[int(value.rpartition(':')[2])]}"
        args.append(arg)
    token = secrets.token_hex(32)
    (tmp_path / "token").write_text(token)
    log_path = tmp_path / "agent.log"
    env = {**os.environ, "NODE_NAME": "manifest-node"}  # the downward API's value
    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            [str(Path(sys.executable).parent / command[0]), *args,
             "--token-file", str(tmp_path / "token"), "--state-dir", str(tmp_path / "state")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip

    def url(port_name: str, path: str) -> str:
        return f"http://127.0.0.1:{local[named[port_name]]}{path}"

    def get(target: str, token: str | None = None) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            req = urllib.request.Request(target, headers=headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    try:
        readiness = container["readinessProbe"]["httpGet"]

        def ready() -> bool:
            assert agent.poll() is None, log_path.read_text(errors="replace")
            return get(url(readiness["port"], readiness["path"]))[0] == 200

        _wait("the agent's readiness probe", ready)
        (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
        status, text = get(url(endpoint["port"], endpoint["path"]))  # as Prometheus: no token
        assert status == 200 and "tracekeeper_agent_programs_loaded" in text, status
        # The API port: the same metrics, only with the token; and the API itself.
        assert get(url(DEFAULT_AGENT_PORT_NAME, "/metrics"))[0] == 401
        assert get(url(DEFAULT_AGENT_PORT_NAME, "/metrics"), token)[0] == 200
        assert get(url(DEFAULT_AGENT_PORT_NAME, "/v1/state"), token)[0] == 200
        assert get(url(endpoint["port"], "/v1/state"), token)[0] == 404
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert agent.returncode == 0, log_path.read_text(errors="replace")[-4000:]
