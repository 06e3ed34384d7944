"""manifests/ read as files: the kustomization lists every file, the CRD copies match crds/,
the admission policy covers exactly the privileged fields of the API models, the workloads
agree with the operator's and the agent's defaults and command lines, RBAC stays least
privilege, and the monitoring overlay's rules and dashboard pass promtool and name only
metrics the code exports. (tests/e2e/test_manifests.py applies them to a real apiserver.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.output_fakes import ListBoard
from tracekeeper_agent.outputs.metrics import AgentMetrics
from tracekeeper_agent.ports import PodIdentity
from tracekeeper_agent.service.cli import build_parser as agent_parser
from tracekeeper_agent.service.cli import check_listeners, parse_listen
from tracekeeper_api import crdgen
from tracekeeper_api.filters import PRIVILEGED_FILTER_FIELDS
from tracekeeper_operator.cli import _parser as operator_parser
from tracekeeper_operator.metrics import OperatorMetrics
from tracekeeper_operator.settings import (
    DEFAULT_AGENT_DAEMONSET,
    DEFAULT_AGENT_PORT_NAME,
    DEFAULT_AGENT_SELECTOR,
    DEFAULT_NAMESPACE,
    DEFAULT_TOKEN_FILE,
    NAMESPACE_ENV,
    parse_label_selector,
)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
MONITORING = MANIFESTS / "overlays" / "monitoring"
MONITORING_NAMESPACE = "monitoring"
"""Where the NetworkPolicies admit Prometheus from (documented in network-policies.yaml)."""
E2E_DATA = ROOT / "tests" / "e2e" / "data"
GROUP = "tracekeeper.dev"

Obj = dict[str, Any]


# -- loading (what kustomize would do for this base: no patches, one namespace) ----------


def _kustomization(directory: Path) -> Obj:
    doc: Obj = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return doc


def _load(directory: Path) -> list[Obj]:
    kustomization = _kustomization(directory)
    unset_only = None  # a NamespaceTransformer with unsetOnly: what has no namespace gets one
    for transformer in kustomization.get("transformers", []):
        spec = yaml.safe_load(transformer)
        if spec["kind"] == "NamespaceTransformer" and spec.get("unsetOnly"):
            unset_only = spec["metadata"]["namespace"]
    docs: list[Obj] = []
    for resource in kustomization["resources"]:
        path = directory / resource
        if path.is_dir():
            docs += _load(path)
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            if "namespace" in kustomization and not _cluster_scoped(doc):
                doc["metadata"]["namespace"] = kustomization["namespace"]
            if unset_only and not _cluster_scoped(doc):
                doc["metadata"].setdefault("namespace", unset_only)
            docs.append(doc)
    return docs


_CLUSTER_KINDS = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "APIService",
}


def _cluster_scoped(doc: Obj) -> bool:
    return doc["kind"] in _CLUSTER_KINDS


BASE_DOCS = _load(BASE)
MONITORING_DOCS = _load(MONITORING)


def _one(kind: str, name: str | None = None, docs: list[Obj] = BASE_DOCS) -> Obj:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(workload: Obj) -> Obj:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Obj = containers[0]
    return container


def _port(container: Obj, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"no container port named {name!r}: {ports}"
    return int(ports[name])


def _mounts(container: Obj) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def _command_line(workload: Obj, dockerfile: str) -> list[str]:
    """The image's ENTRYPOINT (no `command:` overrides it) followed by the container's args:
    what the container runs, without the program name."""
    container = _container(workload)
    assert "command" not in container, "the image's ENTRYPOINT is the command"
    (entrypoint,) = re.findall(r"^ENTRYPOINT (\[.*\])$", (ROOT / dockerfile).read_text(), re.M)
    args: list[str] = json.loads(entrypoint)[1:] + container.get("args", [])
    return args


def _volumes(workload: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}


# -- the kustomization itself ---------------------------------------------------------------


def test_root_kustomization_is_the_base() -> None:
    assert _kustomization(MANIFESTS)["resources"] == ["base"]


def test_base_lists_every_file() -> None:
    listed = set(_kustomization(BASE)["resources"])
    on_disk = {
        str(p.relative_to(BASE)) for p in BASE.rglob("*.yaml") if p.name != "kustomization.yaml"
    }
    assert listed == on_disk


KUBE_SYSTEM_READER = "tracekeeper-operator:extension-apiserver-authentication-reader"
"""The one object outside tracekeeper-system: the output API reads the front-proxy
configuration in kube-system, where that Role is."""


def test_everything_namespaced_is_in_tracekeeper_system() -> None:
    (transformer,) = _kustomization(BASE)["transformers"]
    assert yaml.safe_load(transformer)["metadata"]["namespace"] == DEFAULT_NAMESPACE
    assert _one("Namespace")["metadata"]["name"] == DEFAULT_NAMESPACE
    for doc in BASE_DOCS:
        if _cluster_scoped(doc):
            continue
        name = doc["metadata"]["name"]
        if name == KUBE_SYSTEM_READER:
            assert doc["metadata"]["namespace"] == "kube-system"
            assert doc["roleRef"]["name"] == "extension-apiserver-authentication-reader"
            continue
        assert doc["metadata"]["namespace"] == DEFAULT_NAMESPACE, name


def test_crd_copies_match_crds() -> None:
    generated = sorted((ROOT / "crds").glob("*.yaml"))
    assert generated
    copies = sorted((BASE / "crds").glob("*.yaml"))
    fix = "run `make crds` (it writes crds/ and this copy, which kustomize needs)"
    assert [p.name for p in copies] == [p.name for p in generated], fix
    for copy, original in zip(copies, generated, strict=True):
        assert copy.read_bytes() == original.read_bytes(), (
            f"{copy.relative_to(ROOT)} differs from crds/: {fix}"
        )
    assert crdgen.main(["--check", str(BASE / "crds")]) == 0, fix


def test_make_crds_writes_the_copy() -> None:
    """The fix the test above names does fix it: `make crds` writes both directories."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    res = subprocess.run([make, "-n", "crds"], cwd=ROOT, capture_output=True, text=True, check=True)
    (command,) = [line for line in res.stdout.splitlines() if "tracekeeper_api.crdgen" in line]
    words = command.split()
    outs = {words[i + 1] for i, word in enumerate(words) if word == "--out"}
    assert outs == {"crds", str((BASE / "crds").relative_to(ROOT))}, command


# -- admission policy -----------------------------------------------------------------------


def _policy_fields(kind: str) -> dict[str, str]:
    """field path -> the CEL expression refusing it, from the policy's static messages."""
    policy = _one("ValidatingAdmissionPolicy", f"tracekeeper-{kind.lower()}-privileged-fields")
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [
        {
            "apiGroups": [GROUP],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": [f"{kind.lower()}s"],
        }
    ]
    assert policy["spec"]["failurePolicy"] == "Fail"
    fields: dict[str, str] = {}
    for validation in policy["spec"]["validations"]:
        m = re.fullmatch(r"(spec\.[A-Za-z.]+) is privileged", validation["message"])
        assert m, validation["message"]
        field = m[1]
        assert f"has(object.{field})" in validation["expression"]
        assert validation["messageExpression"].startswith(f'"{field} is privileged: ')
        assert "request.namespace" in validation["messageExpression"]
        fields[field] = validation["expression"]
    return fields


def test_admission_policy_refuses_exactly_the_privileged_fields() -> None:
    assert set(_policy_fields("TraceFilter")) == {f"spec.{f}" for f in PRIVILEGED_FILTER_FIELDS}
    # Plus the attach points tenants may not use (tracekeeper_api.tenant_rules; the lists
    # themselves are checked in test_tenant_rules).
    tenant_attach = {"spec.kprobe", "spec.tracepoint", "spec.rawTracepoint"}
    assert set(_policy_fields("TraceProbe")) == {"spec.program"} | tenant_attach | {
        f"spec.filter.{f}" for f in PRIVILEGED_FILTER_FIELDS
    }


def test_admission_policy_is_bound_everywhere_but_the_operator_namespace() -> None:
    bindings = [d for d in BASE_DOCS if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    policies = {
        d["metadata"]["name"] for d in BASE_DOCS if d["kind"] == "ValidatingAdmissionPolicy"
    }
    assert {b["spec"]["policyName"] for b in bindings} == policies
    for binding in bindings:
        assert binding["spec"]["validationActions"] == ["Deny"]
        selector = binding["spec"]["matchResources"]["namespaceSelector"]
        assert selector == {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": [DEFAULT_NAMESPACE],
                }
            ]
        }


# -- the operator's Deployment ---------------------------------------------------------------


def test_operator_deployment_runs_one_restricted_operator() -> None:
    deployment = _one("Deployment", "tracekeeper-operator")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("hostPID") is not True and pod.get("hostNetwork") is not True
    container = _container(deployment)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "limits" in container["resources"] and "requests" in container["resources"]
    assert all("hostPath" not in v for v in _volumes(deployment).values()), (
        "the operator reads nothing of the node"
    )


def test_operator_args_match_its_cli_and_ports() -> None:
    deployment = _one("Deployment", "tracekeeper-operator")
    container = _container(deployment)
    args = operator_parser().parse_args(_command_line(deployment, "Dockerfile.operator"))
    assert args.command == "run"
    assert args.metrics_port == _port(container, "metrics")
    liveness = urlsplit(args.liveness)
    assert liveness.port == _port(container, "health")
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == (liveness.path, "health")
    assert args.token_file == DEFAULT_TOKEN_FILE
    env = {e["name"]: e for e in container["env"]}
    assert env[NAMESPACE_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_operator_runs_as_the_image_user() -> None:
    pod = _one("Deployment", "tracekeeper-operator")["spec"]["template"]["spec"]
    user = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile.operator").read_text(), re.M)
    assert user == [(str(pod["securityContext"]["runAsUser"]),
                     str(pod["securityContext"]["runAsGroup"]))]  # fmt: skip


def _token_volume(workload: Obj) -> None:
    container = _container(workload)
    volumes = _volumes(workload)
    mounts = _mounts(container)
    (name,) = [n for n, v in volumes.items() if "secret" in v]
    secret = volumes[name]["secret"]
    assert secret["secretName"] == "tracekeeper-agent-token"
    assert secret["items"] == [{"key": "token", "path": DEFAULT_TOKEN_FILE.name}]
    # A directory mount (no subPath): a rotated Secret reaches the file.
    assert mounts[name] == str(DEFAULT_TOKEN_FILE.parent)
    assert all("subPath" not in m for m in container["volumeMounts"])


def test_both_components_mount_the_token_where_they_read_it() -> None:
    _token_volume(_one("Deployment", "tracekeeper-operator"))
    _token_volume(_one("DaemonSet", "tracekeeper-agent"))


# -- the agent's DaemonSet -------------------------------------------------------------------


def test_agent_pods_are_what_the_operator_looks_for() -> None:
    daemonset = _one("DaemonSet", "tracekeeper-agent")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert parse_label_selector(DEFAULT_AGENT_SELECTOR).items() <= labels.items()
    container = _container(daemonset)
    args = agent_parser().parse_args(_command_line(daemonset, "Dockerfile.agent"))
    assert args.command == "serve"
    assert int(args.listen.rpartition(":")[2]) == _port(container, DEFAULT_AGENT_PORT_NAME)
    # The token-free metrics listener is on, on the port Prometheus is admitted to.
    assert args.metrics_listen is not None
    assert parse_listen(args.metrics_listen) == ("0.0.0.0", _port(container, "metrics"))
    check_listeners(parse_listen(args.listen), parse_listen(args.metrics_listen))
    assert {p["name"] for p in container["ports"]} == {DEFAULT_AGENT_PORT_NAME, "metrics"}
    assert args.token_file == DEFAULT_TOKEN_FILE
    assert args.node_name is None  # from $NODE_NAME:
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert _mounts(container)["state"] == str(args.state_dir)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "api"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "api"}


def test_agent_privileges_are_the_listed_ones() -> None:
    daemonset = _one("DaemonSet", "tracekeeper-agent")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod.get("hostNetwork") is not True, "the NetworkPolicy would not apply"
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"] == [{"operator": "Exists"}]
    container = _container(daemonset)
    security = container["securityContext"]
    assert security.get("privileged") is not True
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {
        "BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE", "SYS_PTRACE", "DAC_READ_SEARCH"
    }  # fmt: skip
    assert "limits" in container["resources"] and "requests" in container["resources"]


def test_agent_host_mounts_are_the_documented_ones() -> None:
    daemonset = _one("DaemonSet", "tracekeeper-agent")
    volumes = _volumes(daemonset)
    mounts = _mounts(_container(daemonset))
    host = {name: v["hostPath"]["path"] for name, v in volumes.items() if "hostPath" in v}
    assert host == {
        "tracefs": "/sys/kernel/tracing",
        "debugfs": "/sys/kernel/debug",
        "cgroup": "/sys/fs/cgroup",
        "bpffs": "/sys/fs/bpf",
        "lib-modules": "/lib/modules",
        "usr-src": "/usr/src",
        "boot": "/boot",
        "state": "/var/lib/tracekeeper",
    }
    # Every host path is mounted where the agent (and BCC) look for it on a host.
    assert all(mounts[name] == path for name, path in host.items())
    read_only = {m["name"] for m in _container(daemonset)["volumeMounts"] if m.get("readOnly")}
    assert {"cgroup", "lib-modules", "usr-src", "boot"} <= read_only
    lines = (BASE / "agent.yaml").read_text().splitlines()
    for name in host:  # each one says why: a comment right above its mount
        (at,) = [
            i for i, line in enumerate(lines)
            if line.strip() == f"- name: {name}" and "mountPath:" in lines[i + 1]
        ]  # fmt: skip
        above = lines[at - 1].strip()
        shares_the_comment_above = name == "usr-src"  # /lib/modules and /usr/src: one reason
        assert above.startswith("#") or shares_the_comment_above, f"no comment for {name}"


def test_agent_service_account_has_no_role() -> None:
    sa = _one("ServiceAccount", "tracekeeper-agent")
    assert sa["automountServiceAccountToken"] is False
    for binding in BASE_DOCS:
        if binding["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert all(s["name"] != "tracekeeper-agent" for s in binding["subjects"])


# -- RBAC ------------------------------------------------------------------------------------


def _rules(name: str) -> list[Obj]:
    rules: list[Obj] = _one("ClusterRole", name)["rules"]
    return rules


def test_operator_role_is_least_privilege() -> None:
    binding = _one("ClusterRoleBinding", "tracekeeper-operator")
    deployment = _one("Deployment", "tracekeeper-operator")
    assert binding["roleRef"]["name"] == "tracekeeper-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tracekeeper-operator",
                                    "namespace": DEFAULT_NAMESPACE}]  # fmt: skip
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "tracekeeper-operator"
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in _rules("tracekeeper-operator"):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    read = {"get", "list", "watch"}
    assert granted == {
        ("", "pods"): read,
        ("", "namespaces"): read,
        ("", "nodes"): read,
        ("", "events"): {"create"},
        (GROUP, "traceprobes"): read | {"patch"},
        (GROUP, "tracefilters"): read,
        (GROUP, "traceprobes/status"): {"patch"},
        (GROUP, "tracefilters/status"): {"patch"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): read,
    }


def test_tenant_roles_aggregate_into_the_default_roles() -> None:
    edit = _one("ClusterRole", "tracekeeper-edit")
    view = _one("ClusterRole", "tracekeeper-view")
    prefix = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k, v in edit["metadata"]["labels"].items() if v == "true"} == {
        prefix + "admin",
        prefix + "edit",
    }
    assert view["metadata"]["labels"] == {prefix + "view": "true"}
    for rule in edit["rules"] + view["rules"]:
        assert rule["apiGroups"] == [GROUP]
    # Status stays the operator's: tenants never write it.
    assert all("/status" not in r for rule in edit["rules"] for r in rule["resources"])
    assert {v for rule in view["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}


# -- network ---------------------------------------------------------------------------------


def _prometheus_peer() -> Obj:
    """Who the operator's metrics admit: Prometheus pods of the monitoring namespace only
    (a tenant pod labelled as Prometheus must not read every tenant's metrics)."""
    policy = _one("NetworkPolicy", "tracekeeper-operator")["spec"]
    rule, output_api = policy["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    # The output API is open to every source (the kube-apiserver is no pod): it answers
    # only the front proxy's client certificate.
    assert output_api == {"ports": [{"port": "output-api", "protocol": "TCP"}]}
    (peer,) = rule["from"]
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert peer["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}
    }
    return dict(peer)


def test_no_policy_admits_peers_from_every_namespace() -> None:
    for policy in (d for d in BASE_DOCS if d["kind"] == "NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            if rule["ports"] == [{"port": "output-api", "protocol": "TCP"}]:
                continue  # see _prometheus_peer
            for peer in rule["from"]:
                selector = peer.get("namespaceSelector")
                assert (
                    selector is None
                    or selector.get("matchLabels")
                    or selector.get("matchExpressions")
                ), (policy["metadata"]["name"], peer)


def test_only_the_operator_reaches_the_agent_api() -> None:
    policy = _one("NetworkPolicy", "tracekeeper-agent")["spec"]
    daemonset = _one("DaemonSet", "tracekeeper-agent")
    operator_labels = _one("Deployment", "tracekeeper-operator")["spec"]["template"]["metadata"]
    assert policy["podSelector"] == daemonset["spec"]["selector"]
    assert policy["policyTypes"] == ["Ingress"]
    by_port = {}
    for rule in policy["ingress"]:
        (port,) = rule["ports"]  # one port per rule: no peer gets both
        assert port["protocol"] == "TCP"
        by_port[port["port"]] = rule["from"]
    assert set(by_port) == {DEFAULT_AGENT_PORT_NAME, "metrics"}
    (peer,) = by_port[DEFAULT_AGENT_PORT_NAME]
    assert set(peer) == {"podSelector"}  # this namespace only
    assert peer["podSelector"]["matchLabels"].items() <= operator_labels["labels"].items()
    # Prometheus reaches the token-free metrics port, the same peer as the operator's.
    assert by_port["metrics"] == [_prometheus_peer()]
    # Both names are the DaemonSet's container ports (a NetworkPolicy port name that
    # matches nothing admits nothing).
    container = _container(daemonset)
    assert _port(container, "metrics") != _port(container, DEFAULT_AGENT_PORT_NAME)


def test_the_operator_trusts_the_shipped_daemonset_by_default() -> None:
    """Agents are the pods of this DaemonSet, in the operator's namespace; the operator is
    not told to trust endpoint annotations (that is for local test worlds only)."""
    daemonset = _one("DaemonSet", DEFAULT_AGENT_DAEMONSET)
    operator = _one("Deployment", "tracekeeper-operator")
    assert daemonset["metadata"].get("namespace") == operator["metadata"].get("namespace")
    args = " ".join(_container(operator).get("args", []))
    assert "--trust-agent-endpoint-annotation" not in args and "--agent-daemonset" not in args


def test_services_point_at_named_ports() -> None:
    for service in (d for d in BASE_DOCS if d["kind"] == "Service"):
        workloads = [
            d for d in BASE_DOCS
            if d["kind"] in ("Deployment", "DaemonSet")
            and service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        assert len(workloads) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert _port(_container(workloads[0]), port["targetPort"]) == port["port"]


def test_yamllint() -> None:
    config = json.dumps(
        {
            "extends": "default",
            "rules": {"line-length": {"max": 100}, "document-start": "disable",
                      "truthy": {"check-keys": False}},
        }
    )  # fmt: skip
    files = [
        str(p)
        for p in sorted([*MANIFESTS.rglob("*.yaml"), *E2E_DATA.glob("*.yaml")])
        if (BASE / "crds") not in p.parents  # generated (crdgen's own style)
    ]
    res = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "yamllint"), "-s", "-d", config, *files],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# -- monitoring overlay ----------------------------------------------------------------------


def test_monitoring_overlay_adds_only_monitoring() -> None:
    kustomization = _kustomization(MONITORING)
    assert kustomization["resources"][0] == "../../base"
    added = {d["kind"] for d in MONITORING_DOCS} - {d["kind"] for d in BASE_DOCS}
    assert added == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    (generator,) = kustomization["configMapGenerator"]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    for entry in generator["files"]:
        assert (MONITORING / entry.partition("=")[2]).is_file()


def test_service_monitor_scrapes_the_operator_metrics_service() -> None:
    monitor = _one("ServiceMonitor", docs=MONITORING_DOCS)["spec"]
    service = _one("Service", "tracekeeper-operator-metrics")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [
        p["name"] for p in service["spec"]["ports"]
    ]
    assert all(e["honorLabels"] is True for e in monitor["endpoints"])  # probe_ready's namespace


def test_pod_monitor_scrapes_only_the_agents_metrics_port() -> None:
    monitor = _one("PodMonitor", docs=MONITORING_DOCS)["spec"]
    daemonset = _one("DaemonSet", "tracekeeper-agent")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert "namespaceSelector" not in monitor  # the agents are in the PodMonitor's namespace
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    _port(_container(daemonset), endpoint["port"])  # a named port of the agent container
    # Never the API port, and no credential: that port needs none, and the API token must
    # not reach Prometheus.
    assert not {"authorization", "bearerTokenSecret", "basicAuth", "oauth2"} & set(endpoint)
    # The agent's namespace/pod/container labels (the traced tenant's) win over the
    # target's (tests/unit/test_monitoring_scrape.py scrapes it with a real Prometheus).
    assert endpoint["honorLabels"] is True
    (relabel,) = endpoint["relabelings"]
    assert relabel == {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}


class _NoPods:
    def identify(self, cgroup_id: int) -> PodIdentity | None:
        return None


def _exported_names() -> set[str]:
    """Every series name the operator and the agent expose (with _total, _bucket...)."""
    names: set[str] = set()
    registries: list[CollectorRegistry] = [
        OperatorMetrics().registry,
        AgentMetrics(ListBoard(lambda: []), _NoPods()).registry,
    ]
    for registry in registries:
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
            }.get(family.type, [""])
            names |= {family.name + s for s in suffixes}
    return names


def _rule_group() -> Obj:
    rule = _one("PrometheusRule", docs=MONITORING_DOCS)
    groups: list[Obj] = rule["spec"]["groups"]
    assert [g["name"] for g in groups] == ["tracekeeper"]
    return {"groups": groups}


def _dashboard() -> Obj:
    dashboard: Obj = json.loads((MONITORING / "dashboards" / "tracekeeper.json").read_text())
    return dashboard


def _dashboard_exprs() -> Iterator[str]:
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


_METRIC = re.compile(r"\b(tracekeeper_[a-z_]+)\b")


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    exported = _exported_names()
    used = {m for r in _rule_group()["groups"][0]["rules"] for m in _METRIC.findall(r["expr"])}
    used |= {m for e in _dashboard_exprs() for m in _METRIC.findall(e)}
    assert used, "no tracekeeper metric used"
    assert used <= exported, f"not exported by the operator or the agent: {used - exported}"


def test_dashboard_is_grafana_json() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "tracekeeper"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/setup.sh)")
    return promtool


def _promtool_run(args: list[str], cwd: Path) -> str:
    res = subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rule_group()))
    out = _promtool_run(["check", "rules", "rules.yaml"], tmp_path)
    assert "SUCCESS: 5 rules found" in out


def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    # Grafana's variables replaced by what they become at query time; each query as a
    # recording rule, which promtool parses.
    rules = [
        {"record": f"dashboard:query{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(_dashboard_exprs())
    ]
    (tmp_path / "queries.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    _promtool_run(["check", "rules", "queries.yaml"], tmp_path)


# Each alert fires, with its annotations rendered, on made-up series that show the
# condition long enough; none fires on a healthy installation.
_PUSHES = 'tracekeeper_operator_pushes_total{outcome="%s"}'
_PATCHES = 'tracekeeper_operator_status_patches_total{kind="TraceProbe",outcome="%s"}'
_DROPS = 'tracekeeper_probe_events_dropped_total{namespace="team-a",probe="execs",reason="%s"}'
_UP = 'up{job="tracekeeper-operator-metrics"}'
# As scraped: the operator's pod labels too, which the alert aggregates away.
_READY = (
    'tracekeeper_operator_probe_ready{job="tracekeeper-operator-metrics",'
    'pod="tracekeeper-operator-0",namespace="%s",probe="%s",reason="%s"}'
)
_NOT_READY_ANNOTATIONS = {
    "summary": "TraceProbe team-a/opens is not Ready (CompileFailed)",
    "description": "TraceProbe team-a/opens has not been Ready for 10 minutes, reason "
    "CompileFailed. kubectl -n team-a describe traceprobe opens shows the condition's "
    "message, the failing nodes and the Events.",
}
RULE_TESTS: Obj = {
    "rule_files": ["rules.yaml"],
    "evaluation_interval": "1m",
    "tests": [
        {
            "name": "failing",
            "interval": "1m",
            "input_series": [
                {"series": _UP, "values": "1 1 0x28"},
                {"series": _PUSHES % "error", "values": "0+2x30"},
                {"series": _PUSHES % "ok", "values": "0+5x30"},
                {"series": _PATCHES % "error", "values": "0+1x30"},
                {"series": _DROPS % "rate_limit", "values": "0+60x30"},
                {"series": _DROPS % "ring_full", "values": "0x30"},
                # Not Ready from the start: pending for 10 minutes, then firing.
                {"series": _READY % ("team-a", "opens", "CompileFailed"), "values": "0x30"},
                # Not Ready for 8 minutes, then Ready: its reason, so its series, changes
                # (the operator drops the old one: stale at the next scrape).
                {"series": _READY % ("team-a", "slow", "NodesPending"), "values": "0x7 stale"},
                {"series": _READY % ("team-a", "slow", "Loaded"),
                 "values": "_x7 1x22"},
                # Suspended on purpose: not Ready, never alerted on.
                {"series": _READY % ("team-a", "paused", "Suspended"), "values": "0x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "TraceProbeNotReady", "exp_alerts": []},
                {"eval_time": "11m", "alertname": "TraceProbeNotReady", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "team-a",
                                   "probe": "opens", "reason": "CompileFailed"},
                    "exp_annotations": _NOT_READY_ANNOTATIONS,
                }]},
                {"eval_time": "30m", "alertname": "TraceProbeNotReady", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "team-a",
                                   "probe": "opens", "reason": "CompileFailed"},
                    "exp_annotations": _NOT_READY_ANNOTATIONS,
                }]},
                {"eval_time": "5m", "alertname": "TracekeeperOperatorDown", "exp_alerts": []},
                {"eval_time": "15m", "alertname": "TracekeeperOperatorDown", "exp_alerts": [{
                    "exp_labels": {"severity": "warning"},
                    "exp_annotations": {
                        "summary": "The tracekeeper operator is not running or not scraped",
                        "description": "No scrape of the tracekeeper operator has succeeded "
                        "for 10 minutes. New and changed TraceProbes are not applied, and "
                        "deleted ones wait for it.",
                    },
                }]},
                {"eval_time": "10m", "alertname": "TracekeeperAgentPushesFailing",
                 "exp_alerts": []},
                {"eval_time": "25m", "alertname": "TracekeeperAgentPushesFailing",
                 "exp_alerts": [{
                    "exp_labels": {"severity": "warning"},
                    "exp_annotations": {
                        "summary": "The tracekeeper operator cannot push desired state to "
                        "some agents",
                        "description": "Pushes of desired state to node agents have failed "
                        "for 15 minutes (0.03 per second). Check the agent pods (kubectl -n "
                        "tracekeeper-system get pods) and the operator's log; a wrong or "
                        "missing token Secret gives HTTP 401.",
                    },
                 }]},
                {"eval_time": "25m", "alertname": "TracekeeperStatusWritesFailing",
                 "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "kind": "TraceProbe"},
                    "exp_annotations": {
                        "summary": "The tracekeeper operator cannot write TraceProbe status",
                        "description": "Status patches of TraceProbe objects have failed for "
                        "15 minutes: kubectl get shows stale conditions. Check the "
                        "operator's RBAC (traceprobes/status, tracefilters/status: patch).",
                    },
                 }]},
                {"eval_time": "20m", "alertname": "TracekeeperProbeEventsDropped",
                 "exp_alerts": [{
                    "exp_labels": {"severity": "info", "namespace": "team-a",
                                   "probe": "execs", "reason": "rate_limit"},
                    "exp_annotations": {
                        "summary": "TraceProbe team-a/execs drops events (rate_limit)",
                        "description": "team-a/execs has dropped 1.00 events per second for "
                        "10 minutes, reason rate_limit. rate_limit: the probe's "
                        "spec.output.rateLimit; ring_full: the agent reads too slowly for the "
                        "event rate; backlog: a consumer of the event stream is too slow.",
                    },
                 }]},
            ],
        },
        {
            "name": "healthy",
            "interval": "1m",
            "input_series": [
                {"series": _UP, "values": "1x30"},
                {"series": _PUSHES % "error", "values": "0x30"},
                {"series": _PUSHES % "ok", "values": "0+5x30"},
                {"series": _PATCHES % "error", "values": "0x30"},
                {"series": _DROPS % "rate_limit", "values": "0x30"},
                {"series": _READY % ("team-a", "opens", "Loaded"), "values": "1x30"},
                {"series": _READY % ("team-b", "execs", "Loaded"), "values": "1x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": name, "exp_alerts": []}
                for name in ("TracekeeperOperatorDown", "TracekeeperAgentPushesFailing",
                             "TracekeeperStatusWritesFailing", "TracekeeperProbeEventsDropped",
                             "TraceProbeNotReady")
            ],
        },
    ],
}  # fmt: skip


def test_promtool_fires_each_alert(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rule_group()))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(RULE_TESTS))
    _promtool_run(["test", "rules", "tests.yaml"], tmp_path)
    alerts = {r["alert"] for r in _rule_group()["groups"][0]["rules"]}
    for case in RULE_TESTS["tests"]:
        assert {t["alertname"] for t in case["alert_rule_test"]} == alerts, case["name"]
    failing = RULE_TESTS["tests"][0]["alert_rule_test"]
    assert {t["alertname"] for t in failing if t["exp_alerts"]} == alerts
