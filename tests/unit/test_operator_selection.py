"""Target selection: namespace isolation, container filters, privileged refusal, filterRef."""

from __future__ import annotations

from typing import Any

import pytest

from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.records import (
    AgentRecord,
    ContainerRecord,
    FilterRecord,
    LabelledRecord,
    ObjectRef,
    PodRecord,
    ProbeRecord,
)
from tracekeeper_operator.selection import Refusal, Selected, select
from tracekeeper_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(namespace="tracekeeper-system")
RAW_OK = OperatorSettings(namespace="tracekeeper-system", allow_raw_programs=True)
UIDS = iter(f"00000000-0000-4000-8000-{n:012x}" for n in range(1, 10_000))


def pod(
    ns: str,
    name: str,
    node: str | None = "node-a",
    phase: str = "Running",
    containers: tuple[str, ...] = ("app",),
    **labels: str,
) -> PodRecord:
    return PodRecord(
        namespace=ns,
        name=name,
        uid=next(UIDS),
        node=node,
        labels=labels,
        phase=phase,
        containers=tuple(
            ContainerRecord(c, f"containerd://{i:064x}") for i, c in enumerate(containers, start=1)
        ),
    )


def probe(ns: str, spec: dict[str, Any], name: str = "p") -> ProbeRecord:
    return ProbeRecord(
        ref=ObjectRef("TraceProbe", ns, name, next(UIDS)),
        generation=1,
        spec=TraceProbeSpec.model_validate(spec),
    )


def tfilter(ns: str, name: str, spec: dict[str, Any]) -> FilterRecord:
    return FilterRecord(
        ref=ObjectRef("TraceFilter", ns, name, next(UIDS)),
        generation=1,
        spec=TraceFilterSpec.model_validate(spec),
    )


def view(*pods: PodRecord, filters: tuple[FilterRecord, ...] = (), **kw: Any) -> ClusterView:
    agents = [AgentRecord(n, f"tk/agent-{n}", f"http://{n}:1") for n in ("node-a", "node-b")]
    kw.setdefault(
        "nodes",
        [LabelledRecord("node-a", {"zone": "z1"}), LabelledRecord("node-b", {"zone": "z2"})],
    )
    return ClusterView.build(pods=pods, agents=agents, filters=filters, **kw)


OPENAT = {"tracepoint": "syscalls:sys_enter_openat"}


def selected(result: object) -> Selected:
    assert isinstance(result, Selected), result
    return result


def pod_names(sel: Selected) -> set[str]:
    return {f"{p.namespace}/{p.name}" for t in sel.targets.values() for p in t.pods}


def test_no_filter_means_every_pod_of_the_namespace_not_the_host() -> None:
    v = view(pod("team-a", "web-0"), pod("team-a", "db-0", node="node-b"), pod("team-b", "x"))
    sel = selected(select(probe("team-a", OPENAT), v, SETTINGS))
    assert pod_names(sel) == {"team-a/web-0", "team-a/db-0"}
    assert sel.nodes == ["node-a", "node-b"]
    for targets in sel.targets.values():
        assert not targets.host_wide and not targets.pids and not targets.cgroup_paths


@pytest.mark.parametrize(
    "selector",
    [
        {},
        {"matchLabels": {"app": "web"}},
        {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
        {"matchExpressions": [{"key": "nothing", "operator": "DoesNotExist"}]},
    ],
)
def test_tenant_selector_never_reaches_another_namespace(selector: dict[str, Any]) -> None:
    v = view(
        pod("team-a", "web-0", app="web"),
        pod("team-b", "web-1", app="web"),
        pod("tracekeeper-system", "agent", app="web"),
    )
    spec = {**OPENAT, "filter": {"podSelector": selector}}
    sel = selected(select(probe("team-a", spec), v, SETTINGS))
    assert pod_names(sel) == {"team-a/web-0"}


def test_a_tenant_namespace_selector_is_refused_not_widened() -> None:
    v = view(pod("team-a", "a"), pod("team-b", "b"), namespaces=[LabelledRecord("team-b")])
    spec = {**OPENAT, "filter": {"namespaceSelector": {}}}
    result = select(probe("team-a", spec), v, SETTINGS)
    assert isinstance(result, Refusal) and result.reason == "NotPermitted"
    assert "namespaceSelector" in result.message


def test_privileged_namespace_selector_reaches_matching_namespaces() -> None:
    v = view(
        pod("team-a", "a"),
        pod("team-b", "b"),
        pod("team-c", "c"),
        namespaces=[
            LabelledRecord("team-a", {"traced": "yes"}),
            LabelledRecord("team-b", {"traced": "yes"}),
            LabelledRecord("team-c"),
        ],
    )
    spec = {**OPENAT, "filter": {"namespaceSelector": {"matchLabels": {"traced": "yes"}}}}
    sel = selected(select(probe("tracekeeper-system", spec), v, SETTINGS))
    assert pod_names(sel) == {"team-a/a", "team-b/b"}


def test_containers_filter_targets_only_named_containers() -> None:
    v = view(
        pod("team-a", "web-0", containers=("app", "sidecar"), app="web"),
        pod("team-a", "only-sidecar", containers=("sidecar",), app="web"),
    )
    spec = {
        **OPENAT,
        "filter": {"podSelector": {"matchLabels": {"app": "web"}}, "containers": ["app"]},
    }
    sel = selected(select(probe("team-a", spec), v, SETTINGS))
    (target,) = sel.targets["node-a"].pods
    assert target.name == "web-0" and not target.all_containers
    assert [c.name for c in target.containers] == ["app"]
    assert target.containers[0].container_id is not None
    assert (sel.pods, sel.containers) == (1, 1)


def test_all_containers_pod_counts_its_containers() -> None:
    v = view(pod("team-a", "web-0", containers=("app", "sidecar")))
    sel = selected(select(probe("team-a", OPENAT), v, SETTINGS))
    (target,) = sel.targets["node-a"].pods
    assert target.all_containers and (sel.pods, sel.containers) == (1, 2)


def test_unbound_and_finished_pods_are_not_targets() -> None:
    v = view(
        pod("team-a", "pending", node=None),
        pod("team-a", "done", phase="Succeeded"),
        pod("team-a", "failed", phase="Failed"),
        pod("team-a", "live"),
    )
    sel = selected(select(probe("team-a", OPENAT), v, SETTINGS))
    assert pod_names(sel) == {"team-a/live"}


def test_no_matching_pod_selects_no_node() -> None:
    spec = {**OPENAT, "filter": {"podSelector": {"matchLabels": {"app": "none"}}}}
    sel = selected(select(probe("team-a", spec), view(pod("team-a", "x")), SETTINGS))
    assert sel.targets == {} and sel.pods == 0


def test_filter_ref_resolves_in_the_same_namespace_only() -> None:
    here = tfilter("team-a", "web", {"podSelector": {"matchLabels": {"app": "web"}}})
    there = tfilter("team-b", "other", {})
    v = view(
        pod("team-a", "web-0", app="web"), pod("team-a", "db-0", app="db"), filters=(here, there)
    )
    sel = selected(select(probe("team-a", {**OPENAT, "filterRef": "web"}), v, SETTINGS))
    assert pod_names(sel) == {"team-a/web-0"}
    missing = select(probe("team-a", {**OPENAT, "filterRef": "other"}), v, SETTINGS)
    assert isinstance(missing, Refusal) and missing.reason == "FilterNotFound"
    assert "'other'" in missing.message and "team-a" in missing.message


def test_a_deleting_filter_counts_as_missing() -> None:
    f = FilterRecord(
        ObjectRef("TraceFilter", "team-a", "web", "u"), 1, TraceFilterSpec(), deleting=True
    )
    result = select(probe("team-a", {**OPENAT, "filterRef": "web"}), view(filters=(f,)), SETTINGS)
    assert isinstance(result, Refusal) and result.reason == "FilterNotFound"


@pytest.mark.parametrize(
    ("filter_spec", "field"),
    [
        ({"pids": [1]}, "pids"),
        ({"cgroupPaths": ["/system.slice"]}, "cgroupPaths"),
        ({"hostWide": True}, "hostWide"),
        ({"namespaceSelector": {}}, "namespaceSelector"),
    ],
)
def test_privileged_filter_fields_refused_outside_privileged_namespaces(
    filter_spec: dict[str, Any], field: str
) -> None:
    inline = select(probe("team-a", {**OPENAT, "filter": filter_spec}), view(), SETTINGS)
    assert isinstance(inline, Refusal) and inline.reason == "NotPermitted"
    assert field in inline.message and "tracekeeper-system" in inline.message
    ref = tfilter("team-a", "sneaky", filter_spec)
    by_ref = select(
        probe("team-a", {**OPENAT, "filterRef": "sneaky"}), view(filters=(ref,)), SETTINGS
    )
    assert isinstance(by_ref, Refusal) and by_ref.reason == "NotPermitted"
    assert "'sneaky'" in by_ref.message
    allowed = select(
        probe("tracekeeper-system", {**OPENAT, "filter": filter_spec}), view(), SETTINGS
    )
    assert isinstance(allowed, Selected)


def test_host_targets_go_to_every_selected_node() -> None:
    spec = {
        **OPENAT,
        "filter": {"pids": [1], "followChildren": True},
        "nodeSelector": {"zone": "z2"},
    }
    sel = selected(select(probe("tracekeeper-system", spec), view(), SETTINGS))
    assert sel.nodes == ["node-b"]
    assert sel.targets["node-b"].pids == [1] and sel.targets["node-b"].follow_children


RAW = {"program": {"source": "int x(void *ctx) { return 0; }"}}


def test_raw_programs_need_a_privileged_namespace_and_the_allow_setting() -> None:
    tenant = select(probe("team-a", RAW), view(), RAW_OK)
    assert isinstance(tenant, Refusal) and tenant.reason == "NotPermitted"
    assert "privileged" in tenant.message
    off = select(probe("tracekeeper-system", RAW), view(), SETTINGS)
    assert isinstance(off, Refusal) and "--allow-raw-programs" in off.message
    ok = select(probe("tracekeeper-system", RAW), view(pod("tracekeeper-system", "x")), RAW_OK)
    assert isinstance(ok, Selected) and ok.pods == 1


def test_explicit_privileged_namespaces_replace_the_default() -> None:
    settings = OperatorSettings(
        namespace="tracekeeper-system", privileged_namespaces=frozenset({"platform"})
    )
    spec = {**OPENAT, "filter": {"hostWide": True}}
    assert isinstance(select(probe("platform", spec), view(), settings), Selected)
    assert isinstance(select(probe("tracekeeper-system", spec), view(), settings), Refusal)


def test_node_selector_filters_pods_by_their_node() -> None:
    v = view(pod("team-a", "a", node="node-a"), pod("team-a", "b", node="node-b"))
    sel = selected(select(probe("team-a", {**OPENAT, "nodeSelector": {"zone": "z1"}}), v, SETTINGS))
    assert pod_names(sel) == {"team-a/a"} and sel.nodes == ["node-a"]


def test_node_selector_without_node_access_selects_nothing_and_says_so() -> None:
    v = view(pod("team-a", "a"), nodes=None)
    sel = selected(select(probe("team-a", {**OPENAT, "nodeSelector": {"zone": "z1"}}), v, SETTINGS))
    assert sel.targets == {} and "may not read Node objects" in sel.note
    plain = selected(select(probe("team-a", OPENAT), v, SETTINGS))
    assert plain.nodes == ["node-a"] and plain.note == ""


def test_process_names_travel_with_the_targets() -> None:
    spec = {**OPENAT, "filter": {"processNames": ["nginx"]}}
    sel = selected(select(probe("team-a", spec), view(pod("team-a", "a")), SETTINGS))
    assert sel.targets["node-a"].process_names == ["nginx"]


def test_an_invalid_stored_spec_is_refused() -> None:
    p = ProbeRecord(ObjectRef("TraceProbe", "team-a", "bad", "u"), 3, None, "spec: broken")
    result = select(p, view(), SETTINGS)
    assert isinstance(result, Refusal) and result.reason == "InvalidSpec"
    assert result.message == "spec: broken"
