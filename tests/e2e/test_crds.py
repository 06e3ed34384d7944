"""crds/ and examples/ against the real apiserver: the CRDs establish, every example applies,
malformed objects are refused with the schema's or the CEL rule's message, and status is a
subresource whose undeclared fields are pruned."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tracekeeper_sim.local_cluster import LocalCluster

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO / "crds"
EXAMPLES_DIR = REPO / "examples"
GROUP = "tracekeeper.dev"
API_VERSION = f"{GROUP}/v1alpha1"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def test_crds_are_established(cluster: LocalCluster, crds: list[str]) -> None:
    assert sorted(crds) == [f"tracefilters.{GROUP}", f"traceprobes.{GROUP}"]
    for name in crds:
        crd = json.loads(cluster.kubectl("get", "crd", name, "-o", "json", check=True).stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True"
        assert conditions.get("NamesAccepted") == "True"
        assert "NonStructuralSchema" not in conditions
        assert crd["spec"]["scope"] == "Namespaced"
        assert all("status" in v.get("subresources", {}) for v in crd["spec"]["versions"])
    out = cluster.kubectl("api-resources", f"--api-group={GROUP}", "--no-headers", check=True)
    short = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()}
    assert short == {"traceprobes": "tp", "tracefilters": "tf"}
    # The short names resolve for clients.
    cluster.kubectl("get", "tp,tf", "--all-namespaces", check=True)


def test_there_are_examples() -> None:
    assert EXAMPLES, f"no examples in {EXAMPLES_DIR}"


def _contains(stored: Any, written: Any) -> bool:
    """Everything the example wrote is stored as written (defaults may add more)."""
    if isinstance(written, dict):
        return isinstance(stored, dict) and all(
            k in stored and _contains(stored[k], v) for k, v in written.items()
        )
    return bool(stored == written)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_applies(
    cluster: LocalCluster, crds: list[str], make_namespace: Callable[[str], str], example: Path
) -> None:
    ns = make_namespace("example")
    res = cluster.kubectl("apply", "-n", ns, "-f", str(example))
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr  # e.g. an unknown field, pruned silently
    written = _load_docs(example)
    assert written, f"{example} has no objects"
    for doc in written:
        assert doc["apiVersion"] == API_VERSION
        stored = cluster.get(doc["kind"], doc["metadata"]["name"], ns)
        assert stored["metadata"]["namespace"] == ns
        assert _contains(stored["spec"], doc["spec"]), (doc["spec"], stored["spec"])


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- malformed objects -------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    kind: str
    spec: dict[str, Any] | None
    field: str  # the path the apiserver reports
    message: str  # the schema's or the CEL rule's message


TP = "sched:sched_switch"
ONE_ATTACH = (
    "set exactly one attach point: tracepoint, rawTracepoint, uprobe, usdt, kprobe, syscall "
    "or program"
)
MALFORMED = [
    # CEL rules on TraceProbe.spec and .spec.output
    Bad("no-attach-point", "TraceProbe", {"output": {"kind": "count"}}, "spec", ONE_ATTACH),
    Bad("two-attach-points", "TraceProbe", {"tracepoint": TP, "rawTracepoint": "sched_switch"},
        "spec", ONE_ATTACH),
    Bad("three-attach-points", "TraceProbe",
        {"syscall": {"name": "read"}, "kprobe": {"function": "vfs_read"},
         "uprobe": {"binary": "c", "symbol": "read"}}, "spec", ONE_ATTACH),
    Bad("filter-and-filterref", "TraceProbe",
        {"tracepoint": TP, "filterRef": "web", "filter": {"processNames": ["nginx"]}},
        "spec", "set filterRef or filter, not both"),
    Bad("histogram-without-value", "TraceProbe",
        {"tracepoint": TP, "output": {"kind": "histogram"}},
        "spec", "a histogram needs a value: a syscall probe with latency: true, or output.value"),
    Bad("syscall-histogram-without-latency", "TraceProbe",
        {"syscall": {"name": "read"}, "output": {"kind": "histogram"}},
        "spec", "a histogram needs a value"),
    Bad("ratelimit-on-count", "TraceProbe",
        {"tracepoint": TP, "output": {"kind": "count", "rateLimit": 5}},
        "spec.output", "rateLimit applies to output kind events only"),
    Bad("fields-on-count", "TraceProbe",
        {"tracepoint": TP, "output": {"kind": "count", "fields": ["prev_pid"]}},
        "spec.output", "fields applies to output kind events only"),
    Bad("value-on-events", "TraceProbe",
        {"tracepoint": TP, "output": {"kind": "events", "value": "prev_pid"}},
        "spec.output", "value applies to output kind histogram only"),
    Bad("fields-without-tracepoint", "TraceProbe",
        {"syscall": {"name": "read"}, "output": {"kind": "events", "fields": ["fd"]}},
        "spec", "output.fields captures tracepoint fields: it needs a tracepoint"),
    Bad("value-without-tracepoint", "TraceProbe",
        {"syscall": {"name": "read"}, "output": {"kind": "histogram", "value": "fd"}},
        "spec", "output.value names a tracepoint field: it needs a tracepoint"),
    # OpenAPI schema: patterns, bounds, enums, required fields, list types
    Bad("tracepoint-without-category", "TraceProbe", {"tracepoint": "openat"},
        "spec.tracepoint", "should match '^[a-z0-9_]{1,64}:[a-z0-9_]{1,96}$'"),
    Bad("uprobe-binary-escapes", "TraceProbe",
        {"uprobe": {"binary": "/usr/lib/../../etc/shadow", "symbol": "x"}},
        "spec.uprobe.binary", 'Invalid value: "/usr/lib/../../etc/shadow"'),
    Bad("uprobe-without-symbol", "TraceProbe", {"uprobe": {"binary": "/usr/bin/x"}},
        "spec.uprobe.symbol", "Required value"),
    Bad("usdt-library-name", "TraceProbe",
        {"usdt": {"binary": "python3", "provider": "python", "name": "line"}},
        "spec.usdt.binary", 'Invalid value: "python3"'),
    Bad("usdt-provider-not-an-identifier", "TraceProbe",
        {"usdt": {"binary": "/usr/bin/python3", "provider": "py-thon", "name": "line"}},
        "spec.usdt.provider", 'Invalid value: "py-thon"'),
    Bad("sampling-zero", "TraceProbe", {"tracepoint": TP, "sampling": 0},
        "spec.sampling", "should be greater than or equal to 1"),
    Bad("ratelimit-too-high", "TraceProbe",
        {"tracepoint": TP, "output": {"kind": "events", "rateLimit": 2_000_000}},
        "spec.output.rateLimit", "should be less than or equal to 1000000"),
    Bad("unknown-output-kind", "TraceProbe", {"tracepoint": TP, "output": {"kind": "bogus"}},
        "spec.output.kind",
        'Unsupported value: "bogus": supported values: "count", "histogram", "events"'),
    Bad("repeated-by-key", "TraceProbe", {"tracepoint": TP, "output": {"by": ["pod", "pod"]}},
        "spec.output.by[1]", 'Duplicate value: "pod"'),
    Bad("comm-too-long", "TraceProbe",
        {"tracepoint": TP, "filter": {"processNames": ["a-sixteen-chars!"]}},
        "spec.filter.processNames[0]", "Too long: may not be more than 15 bytes"),
    Bad("no-spec", "TraceProbe", None, "spec", "Required value"),
    Bad("duration-too-long", "TraceProbe", {"tracepoint": TP, "duration": "200h"},
        "spec.duration", "must be from 1s to 168h"),
    Bad("duration-not-go-style", "TraceProbe", {"tracepoint": TP, "duration": "1.5h"},
        "spec.duration", "should match"),
    Bad("node-selector-key-not-a-label-key", "TraceProbe",
        {"tracepoint": TP, "nodeSelector": {"bad key!": "x"}}, "spec.nodeSelector",
        "every key must match"),
    # TraceFilter
    Bad("hostwide-with-pod-selector", "TraceFilter",
        {"hostWide": True, "podSelector": {"matchLabels": {"app": "web"}}}, "spec",
        "hostWide traces every process: it cannot be combined with podSelector"),
    Bad("follow-children-without-pids", "TraceFilter", {"followChildren": True},
        "spec", "followChildren needs pids"),
    Bad("unknown-selector-operator", "TraceFilter",
        {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Maybe"}]}},
        "spec.podSelector.matchExpressions[0].operator", 'Unsupported value: "Maybe"'),
    Bad("match-labels-key-not-a-label-key", "TraceFilter",
        {"podSelector": {"matchLabels": {"bad key!": "web"}}}, "spec.podSelector.matchLabels",
        "every key must match"),
    Bad("in-without-values", "TraceFilter",
        {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}},
        "spec.podSelector.matchExpressions[0]", "operator In and NotIn need at least one value"),
    Bad("exists-with-values", "TraceFilter",
        {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists",
                                               "values": ["web"]}]}},
        "spec.podSelector.matchExpressions[0]", "operator Exists and DoesNotExist take no values"),
    Bad("pid-zero", "TraceFilter", {"pids": [0]},
        "spec.pids[0]", "should be greater than or equal to 1"),
    Bad("relative-cgroup-path", "TraceFilter", {"cgroupPaths": ["sys/fs/cgroup"]},
        "spec.cgroupPaths[0]", 'Invalid value: "sys/fs/cgroup"'),
    Bad("container-name-not-dns-label", "TraceFilter", {"containers": ["Bad_Name"]},
        "spec.containers[0]", 'Invalid value: "Bad_Name"'),
]  # fmt: skip


@pytest.fixture(scope="module")
def malformed_ns(crds: list[str], make_namespace: Callable[[str], str]) -> str:
    return make_namespace("malformed")


@pytest.mark.parametrize("bad", MALFORMED, ids=[b.id for b in MALFORMED])
def test_malformed_object_is_rejected(cluster: LocalCluster, malformed_ns: str, bad: Bad) -> None:
    obj: dict[str, Any] = {"apiVersion": API_VERSION, "kind": bad.kind,
                           "metadata": {"name": bad.id}}  # fmt: skip
    if bad.spec is not None:
        obj["spec"] = bad.spec
    res = cluster.kubectl("create", "-n", malformed_ns, "-f", "-", input=json.dumps(obj))
    assert res.returncode != 0, f"accepted: {json.dumps(obj)}"
    assert f'The {bad.kind} "{bad.id}" is invalid' in res.stderr, res.stderr
    assert f"{bad.field}: " in res.stderr, res.stderr
    assert bad.message in res.stderr, res.stderr
    # Refused whole: nothing was stored.
    get = cluster.kubectl("get", bad.kind.lower(), bad.id, "-n", malformed_ns)
    assert "NotFound" in get.stderr, get.stdout + get.stderr


def _cel_messages(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            found.add(rule["message"])
        for v in node.values():
            found |= _cel_messages(v)
    elif isinstance(node, list):
        for v in node:
            found |= _cel_messages(v)
    return found


def test_every_cel_rule_has_a_rejection_case() -> None:
    assert len(MALFORMED) >= 10
    assert {b.kind for b in MALFORMED} == {"TraceProbe", "TraceFilter"}
    messages: set[str] = set()
    for path in CRDS_DIR.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            messages |= _cel_messages(doc)
    assert messages, "no CEL rules in crds/"
    uncovered = [m for m in messages if not any(m.startswith(b.message) for b in MALFORMED)]
    assert not uncovered, f"CEL rules without a case in MALFORMED: {uncovered}"


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("TraceFilter", {"hostWide": True}),
        ("TraceProbe", {"tracepoint": TP, "filter": {"hostWide": True}}),
    ],
    ids=["tracefilter", "traceprobe-inline-filter"],
)
def test_host_wide_filter_passes_the_schema(
    cluster: LocalCluster, malformed_ns: str, kind: str, spec: dict[str, Any]
) -> None:
    # Whether a namespace may trace host-wide is the ValidatingAdmissionPolicy's call
    # (not installed here); the schema itself must accept the field.
    obj = {"apiVersion": API_VERSION, "kind": kind,
           "metadata": {"generateName": "host-wide-"}, "spec": spec}  # fmt: skip
    res = cluster.kubectl("create", "-n", malformed_ns, "-f", "-", input=json.dumps(obj))
    assert res.returncode == 0, res.stderr


# -- status subresource ------------------------------------------------------------------


def test_status_is_a_subresource_and_undeclared_fields_are_pruned(
    cluster: LocalCluster, crds: list[str], make_namespace: Callable[[str], str]
) -> None:
    ns = make_namespace("status")
    probe = {"apiVersion": API_VERSION, "kind": "TraceProbe", "metadata": {"name": "opens"},
             "spec": {"tracepoint": "syscalls:sys_enter_openat"}}  # fmt: skip
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(probe), check=True)
    status = {
        "observedGeneration": 1,
        "nodes": {"targeted": 3, "loaded": 2, "failed": 1},
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "AttachFailed",
             "lastTransitionTime": "2026-01-01T00:00:00Z", "undeclaredInCondition": "x"},
        ],
        "failures": [{"node": "node-1", "reason": "AttachFailed", "message": "EPERM"}],
        "undeclared": {"nested": True},
    }  # fmt: skip
    res = cluster.kubectl(
        "patch", "traceprobe", "opens", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), check=True,
    )  # fmt: skip
    assert 'unknown field "status.undeclared"' in res.stderr  # kubectl passes the warning on
    stored = cluster.get("traceprobe", "opens", ns)
    st = stored["status"]
    assert st["observedGeneration"] == 1
    assert st["nodes"] == {"targeted": 3, "loaded": 2, "failed": 1}
    assert st["failures"] == [{"node": "node-1", "reason": "AttachFailed", "message": "EPERM"}]
    assert "undeclared" not in st
    cond = st["conditions"][0]
    assert "undeclaredInCondition" not in cond
    assert cond["message"] == ""  # schema default
    # Writing status does not touch the spec's generation.
    assert stored["metadata"]["generation"] == 1

    # Printer columns read the status.
    table = cluster.kubectl("get", "tp", "opens", "-n", ns, check=True).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:5] == ["NAME", "READY", "REASON", "LOADED", "TARGETED"]
    assert row[:5] == ["opens", "False", "AttachFailed", "2", "3"]

    # Through the main resource status is ignored, and through the status subresource
    # the spec is: each writer owns its half.
    cluster.kubectl(
        "patch", "traceprobe", "opens", "-n", ns, "--type=merge",
        "-p", json.dumps({"status": {"observedGeneration": 99}}), check=True,
    )  # fmt: skip
    cluster.kubectl(
        "patch", "traceprobe", "opens", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"spec": {"sampling": 5}}), check=True,
    )  # fmt: skip
    stored = cluster.get("traceprobe", "opens", ns)
    assert stored["status"]["observedGeneration"] == 1
    assert stored["spec"]["sampling"] == 1

    # Status is validated too.
    bad = cluster.kubectl(
        "patch", "traceprobe", "opens", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"conditions": [
            {"type": "Bogus", "status": "True", "reason": "X"}]}}),
    )  # fmt: skip
    assert bad.returncode != 0
    assert 'status.conditions[0].type: Unsupported value: "Bogus"' in bad.stderr


def test_tracefilter_status_prunes_too(
    cluster: LocalCluster, crds: list[str], make_namespace: Callable[[str], str]
) -> None:
    ns = make_namespace("status")
    tf = {"apiVersion": API_VERSION, "kind": "TraceFilter", "metadata": {"name": "web"},
          "spec": {"podSelector": {"matchLabels": {"app": "web"}}}}  # fmt: skip
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(tf), check=True)
    cluster.kubectl(
        "patch", "tracefilter", "web", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"observedGeneration": 1, "undeclared": 1}}), check=True,
    )  # fmt: skip
    st = cluster.get("tracefilter", "web", ns)["status"]
    assert st["observedGeneration"] == 1
    assert "undeclared" not in st
