"""Per-namespace budgets: fair shares of a node, overrides by annotation, the state's size,
and the default event rate limit. Rendered from a ClusterView as the control loop does."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.unit.test_program_builder import CTX
from tracekeeper_agent.ports import FilterEntries
from tracekeeper_agent.programs.builder import build_plan
from tracekeeper_agent.programs.sharing import binding_of
from tracekeeper_agent.service.http_api import MAX_BODY
from tracekeeper_api.budgets import BUDGET_ANNOTATION, Budget, parse_override
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import MAX_STATE_BYTES, NodeState, spec_hash
from tracekeeper_api.status import TraceProbeStatus
from tracekeeper_operator.cluster_plan import ClusterPlan, plan_cluster
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.control_loop import probe_status
from tracekeeper_operator.node_state import node_state
from tracekeeper_operator.records import (
    AgentRecord,
    ContainerRecord,
    LabelledRecord,
    ObjectRef,
    PodRecord,
    ProbeRecord,
)
from tracekeeper_operator.settings import OperatorSettings
from tracekeeper_operator.status_folding import probe_events

SYSTEM = "tracekeeper-system"
SETTINGS = OperatorSettings(namespace=SYSTEM)
NODE = "n1"


def state_size(state: NodeState) -> int:
    """Bytes of the state as the agent client sends it."""
    return len(state.model_dump_json(by_alias=True, exclude_none=True))


def uid(ns: str, name: str) -> str:
    n = abs(hash((ns, name))) % 10**12
    return f"00000000-0000-4000-8000-{n:012d}"


def pod(ns: str, name: str, containers: int = 1) -> PodRecord:
    return PodRecord(
        ns,
        name,
        uid(ns, name),
        NODE,
        {},
        "Running",
        tuple(
            ContainerRecord(f"worker-container-{i:02d}", f"containerd://{i:064x}")
            for i in range(1, containers + 1)
        ),
    )


def probe(ns: str, name: str, created: str = "", **spec: Any) -> ProbeRecord:
    body = {"tracepoint": f"syscalls:sys_enter_{name.replace('-', '_')}", **spec}
    return ProbeRecord(
        ObjectRef("TraceProbe", ns, name, uid(ns, "probe-" + name)),
        1,
        TraceProbeSpec.model_validate(body),
        created=created,
    )


def view(
    probes: list[ProbeRecord],
    pods: list[PodRecord],
    budgets: dict[str, dict[str, Any]] | None = None,
) -> ClusterView:
    namespaces = {p.ref.namespace for p in probes} | {p.namespace for p in pods}
    annotations = {ns: json.dumps(b) for ns, b in (budgets or {}).items()}
    return ClusterView.build(
        pods=pods,
        agents=[AgentRecord(NODE, f"{SYSTEM}/agent", "http://n1:1")],
        namespaces=[
            LabelledRecord(
                ns, {}, {BUDGET_ANNOTATION: annotations[ns]} if ns in annotations else {}
            )
            for ns in sorted(namespaces)
        ],
        probes=probes,
    )


def on_node(plan: ClusterPlan, ns: str) -> list[str]:
    return [a.name for a in plan.rendered.nodes[NODE] if a.namespace == ns]


def status(plan: ClusterPlan, v: ClusterView, probe_id: str) -> TraceProbeStatus:
    folded = probe_status(
        v.probes[probe_id],
        plan.selections[probe_id],
        plan,
        {},
        previous=None,
        now=datetime(2026, 1, 1, tzinfo=UTC),
        max_failures=10,
    )
    assert folded is not None
    return folded


def flood(count: int) -> list[ProbeRecord]:
    return [probe("team-a", f"a{i:03d}", created=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z")
            for i in range(count)]  # fmt: skip


TENANTS = [pod("team-a", "web-0"), pod("team-b", "api-0"), pod(SYSTEM, "collector-0")]
OTHERS = [probe("team-b", f"b{i}") for i in range(3)] + [probe(SYSTEM, f"s{i}") for i in range(2)]


# --- (a) fair allocation ------------------------------------------------------------------


def test_a_flood_in_team_a_leaves_team_b_and_the_system_namespace_alone() -> None:
    v = view(flood(300) + OTHERS, TENANTS)
    plan = plan_cluster(v, SETTINGS)
    assert on_node(plan, "team-b") == ["b0", "b1", "b2"]
    assert on_node(plan, SYSTEM) == ["s0", "s1"]
    # team-a gets its default budget, oldest first.
    assert on_node(plan, "team-a") == [f"a{i:03d}" for i in range(Budget().probes_per_node)]
    refused = plan.rendered.refused[NODE]
    assert sorted(refused) == [f"team-a/a{i:03d}" for i in range(32, 300)]
    assert refused["team-a/a299"] == (
        "team-a has 300 probes on node n1, its budget is 32 probes per node"
    )

    over = status(plan, v, "team-a/a299")
    accepted = over.condition("Accepted")
    assert accepted is not None and (accepted.status, accepted.reason) == (
        "False",
        "QuotaExceeded",
    )
    assert accepted.message == (
        "left out of 1 of 1 node: team-a has 300 probes on node n1, its budget is 32 probes "
        "per node"
    )
    ready = over.condition("Ready")
    assert ready is not None and ready.reason == "QuotaExceeded"
    assert [(e.type, e.reason) for e in probe_events(None, over)] == [("Warning", "QuotaExceeded")]
    for kept in ("team-a/a000", "team-b/b0", f"{SYSTEM}/s0"):
        cond = status(plan, v, kept).condition("Accepted")
        assert cond is not None and (cond.status, cond.reason) == ("True", "Accepted"), kept


def test_round_robin_shares_the_node_cap_when_budgets_allow_more_than_it_holds() -> None:
    # team-a may have all 256 probes of a node: the node still keeps room for the others,
    # privileged namespaces first, then one probe per namespace per turn.
    big = {"probesPerNode": 256, "programsPerAttachPoint": 64}
    v = view(flood(300) + OTHERS, TENANTS, {"team-a": big})
    plan = plan_cluster(v, SETTINGS)
    assert len(plan.rendered.nodes[NODE]) == 256
    assert on_node(plan, "team-b") == ["b0", "b1", "b2"]
    assert on_node(plan, SYSTEM) == ["s0", "s1"]
    assert len(on_node(plan, "team-a")) == 256 - 5
    assert plan.rendered.refused[NODE]["team-a/a299"] == (
        "node n1 already runs 256 probes, the most a node takes"
    )


def test_within_a_namespace_older_probes_keep_their_place() -> None:
    v = view(
        [probe("team-a", "z-old", created="2026-01-01T00:00:00Z"),
         probe("team-a", "a-new", created="2026-02-01T00:00:00Z")],
        TENANTS,
        {"team-a": {"probesPerNode": 1}},
    )  # fmt: skip
    plan = plan_cluster(v, SETTINGS)
    assert on_node(plan, "team-a") == ["z-old"]
    assert list(plan.rendered.refused[NODE]) == ["team-a/a-new"]


def _shapes(n: int) -> list[dict[str, Any]]:
    """n distinct outputs on one tracepoint: count by each set of keys, then events with
    each set of fields (each is its own program)."""
    keys, fields = ["pod", "container", "comm", "pid"], ["filename", "flags", "mode", "dfd"]
    subsets = [
        [k for b, k in enumerate(items) if mask >> b & 1]
        for items in (keys, fields)
        for mask in range(1, 16)
    ]
    outputs = [{"kind": "count", "by": s} for s in subsets[:15]]
    outputs += [{"kind": "events", "fields": s} for s in subsets[15:]]
    return outputs[:n]


def test_programs_per_attach_point_are_budgeted_per_namespace() -> None:
    tp = "syscalls:sys_enter_openat"
    shapes = [
        probe("team-a", f"o{i:02d}", tracepoint=tp, output=o) for i, o in enumerate(_shapes(20))
    ]
    other = [probe("team-b", f"o{i}", tracepoint=tp) for i in range(3)]
    plan = plan_cluster(view(shapes + other, TENANTS), SETTINGS)
    assert len(on_node(plan, "team-a")) == Budget().programs_per_attach_point
    assert len(on_node(plan, "team-b")) == 3
    assert plan.rendered.refused[NODE]["team-a/o16"] == (
        "team-a would have 17 programs on tracepoint syscalls:sys_enter_openat on node n1, "
        "its budget is 16 per attach point"
    )


def test_probes_of_one_shape_count_as_one_program_per_64() -> None:
    tp = "syscalls:sys_enter_openat"
    same = [probe("team-a", f"o{i:02d}", tracepoint=tp) for i in range(30)]
    budgets = {"team-a": {"probesPerNode": 100, "programsPerAttachPoint": 1}}
    plan = plan_cluster(view(same, TENANTS, budgets), SETTINGS)
    assert len(on_node(plan, "team-a")) == 30  # one shared program
    many = [probe("team-a", f"o{i:02d}", tracepoint=tp) for i in range(65)]
    plan = plan_cluster(view(many, TENANTS, budgets), SETTINGS)
    assert len(on_node(plan, "team-a")) == 64  # the 65th would open a second program
    assert "would have 2 programs on tracepoint" in plan.rendered.refused[NODE]["team-a/o64"]


def test_usdt_probes_are_budgeted_on_their_probe() -> None:
    py = {"binary": "/usr/bin/python3", "provider": "python"}
    entry: dict[str, Any] = {"usdt": {**py, "name": "function__entry"}, "tracepoint": None}
    probes = [
        probe("team-a", "e-count", **entry),
        probe("team-a", "e-events", **entry, output={"kind": "events"}),
        probe("team-a", "line", usdt={**py, "name": "line"}, tracepoint=None),
    ]
    budgets = {"team-a": {"programsPerAttachPoint": 1}}
    plan = plan_cluster(view(probes, TENANTS, budgets), SETTINGS)
    # Two shapes on python:function__entry (one over budget); python:line is a point apart.
    assert len(on_node(plan, "team-a")) == 2
    assert plan.rendered.refused[NODE]["team-a/e-events"] == (
        "team-a would have 2 programs on usdt /usr/bin/python3:python:function__entry on node "
        "n1, its budget is 1 per attach point"
    )


def test_filter_entries_are_budgeted() -> None:
    pods = [pod("team-a", f"w{i}") for i in range(5)] + TENANTS
    plan = plan_cluster(
        view([probe("team-a", "a"), probe("team-a", "b")], pods, {"team-a": {"filterEntries": 8}}),
        SETTINGS,
    )
    assert on_node(plan, "team-a") == ["a"]  # 6 pods: 6 entries each
    assert plan.rendered.refused[NODE]["team-a/b"] == (
        "team-a's probes would take 12 filter entries on node n1 (this one: 6), its budget "
        "is 8 per node"
    )


# --- (b) overrides --------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [2, 100])
def test_the_namespace_annotation_lowers_or_raises_the_budget(limit: int) -> None:
    v = view(flood(150) + OTHERS, TENANTS, {"team-a": {"probesPerNode": limit}})
    plan = plan_cluster(v, SETTINGS)
    assert len(on_node(plan, "team-a")) == limit
    assert len(on_node(plan, "team-b")) == 3  # team-b keeps the default
    assert plan.rendered.refused[NODE]["team-a/a149"] == (
        f"team-a has 150 probes on node n1, its budget is {limit} probes per node"
    )


def test_an_invalid_annotation_keeps_the_defaults_and_says_so() -> None:
    v = ClusterView.build(
        pods=TENANTS,
        agents=[AgentRecord(NODE, f"{SYSTEM}/agent", "http://n1:1")],
        namespaces=[LabelledRecord("team-a", {}, {BUDGET_ANNOTATION: '{"probesPerNode": -1}'})],
        probes=flood(40),
    )
    plan = plan_cluster(v, SETTINGS)
    assert len(on_node(plan, "team-a")) == 32
    assert (
        "probesPerNode: Input should be greater than or equal to 0"
        in (plan.budget_problems["team-a"])
    )
    assert plan.rendered.refused[NODE]["team-a/a039"].endswith(
        f"(annotation {BUDGET_ANNOTATION} ignored: probesPerNode: Input should be greater "
        "than or equal to 0)"
    )


def test_the_operator_default_comes_from_settings_and_the_flag_syntax() -> None:
    settings = OperatorSettings(
        namespace=SYSTEM, budget=parse_override('{"probesPerNode": 4}').over(Budget())
    )
    plan = plan_cluster(view(flood(10), TENANTS), settings)
    assert len(on_node(plan, "team-a")) == 4
    with pytest.raises(ValueError, match="typo: Extra inputs are not permitted"):
        parse_override('{"typo": 1}')


def test_privileged_namespaces_have_no_budget() -> None:
    many = [probe(SYSTEM, f"s{i:03d}") for i in range(100)]
    plan = plan_cluster(view(many, TENANTS), SETTINGS)
    assert len(on_node(plan, SYSTEM)) == 100
    assert NODE not in plan.rendered.refused


# --- (c) the state's size ------------------------------------------------------------------


def test_256_probes_over_two_pods_of_64_containers_fit_the_agent_body_limit() -> None:
    pods = [pod("team-a", "big-0", 64), pod("team-a", "big-1", 64)]
    v = view(flood(256), pods, {"team-a": {"probesPerNode": 256}})
    plan = plan_cluster(v, SETTINGS)
    assert NODE not in plan.rendered.refused
    probes = plan.rendered.nodes[NODE]
    assert len(probes) == 256
    state = node_state(NODE, 1, probes)
    size = state_size(state)
    # What the same probes cost with each probe carrying its pods inline (the old shape).
    inline = len(
        NodeState(node=NODE, revision=1, probes=list(probes)).model_dump_json(
            by_alias=True, exclude_none=True
        )
    )
    assert inline > MAX_BODY  # 413 on every push before the pod table
    assert size < 256 * 1024 < MAX_STATE_BYTES < MAX_BODY
    assert len(state.pods) == 2 and all(len(p.containers) == 64 for p in state.pods)
    # The agent-side model takes it, and resolves it to the targets the operator selected.
    wire = state.model_dump_json(by_alias=True, exclude_none=True)
    received = NodeState.model_validate_json(wire).resolved()
    assert [p.targets for p in received.probes] == [p.targets for p in probes]


def test_a_namespace_over_its_state_budget_is_refused_and_the_others_keep_theirs() -> None:
    pods = [pod("team-a", "big-0", 64), pod("team-b", "api-0"), pod(SYSTEM, "collector-0")]
    names = [f"worker-container-{i:02d}" for i in range(1, 17)]
    wide = [probe("team-a", f"a{i}", filter={"containers": names}) for i in range(10)]
    v = view(wide + OTHERS, pods, {"team-a": {"stateBytes": 8 * 1024}})
    plan = plan_cluster(v, SETTINGS)
    kept = on_node(plan, "team-a")
    assert 0 < len(kept) < 10
    refused = plan.rendered.refused[NODE]
    assert sorted(refused) == [f"team-a/a{i}" for i in range(len(kept), 10)]
    message = refused["team-a/a9"]
    assert message.startswith("team-a's probes would take ")
    assert message.endswith("its budget is 8192 bytes per node")
    assert on_node(plan, "team-b") == ["b0", "b1", "b2"]
    assert on_node(plan, SYSTEM) == ["s0", "s1"]
    # The budget counts what the state really takes.
    state = node_state(NODE, 1, plan.rendered.nodes[NODE])
    mine = [p for p in state.probes if p.namespace == "team-a"]
    taken = sum(len(p.model_dump_json(by_alias=True, exclude_none=True)) + 1 for p in mine)
    taken += sum(len(p.model_dump_json(by_alias=True, exclude_none=True)) + 1
                 for p in state.pods if p.namespace == "team-a")  # fmt: skip
    assert 8 * 1024 - 1024 < taken <= 8 * 1024


def test_a_namespace_whose_one_probe_is_too_big_is_refused_alone() -> None:
    pods = [pod("team-a", "big-0", 64), pod("team-a", "big-1", 64), *TENANTS[1:]]
    v = view([probe("team-a", "a"), *OTHERS], pods, {"team-a": {"stateBytes": 4096}})
    plan = plan_cluster(v, SETTINGS)
    assert on_node(plan, "team-a") == []
    assert "its budget is 4096 bytes per node" in plan.rendered.refused[NODE]["team-a/a"]
    assert len(on_node(plan, "team-b")) == 3 and len(on_node(plan, SYSTEM)) == 2


# --- (d) the default event rate limit ------------------------------------------------------


def events_probe(ns: str, name: str, rate: int | None = None) -> ProbeRecord:
    output: dict[str, Any] = {"kind": "events"}
    if rate is not None:
        output["rateLimit"] = rate
    return probe(ns, name, tracepoint="sched:sched_process_exec", output=output)


def test_a_tenant_events_probe_without_a_rate_limit_gets_the_default_in_kernel() -> None:
    v = view([events_probe("team-a", "execs"), events_probe(SYSTEM, "execs")], TENANTS)
    plan = plan_cluster(v, SETTINGS)
    sent = {a.id: a for a in plan.rendered.nodes[NODE]}
    tenant = sent["team-a/execs"]
    assert tenant.spec.output.rate_limit == Budget().default_rate_limit == 1000
    # Agents report the hash of what they were sent: the status waits for that one.
    assert tenant.spec_hash == spec_hash(tenant.spec) == plan.rendered.spec_hashes[tenant.id]
    assert tenant.spec_hash != spec_hash(v.probes["team-a/execs"].spec)  # type: ignore[arg-type]
    # What the agent makes of it: the binding's token bucket in the program's maps.
    received = NodeState.model_validate_json(
        node_state(NODE, 1, (tenant,)).model_dump_json(by_alias=True, exclude_none=True)
    ).resolved()
    binding = binding_of(0, received.probes[0], FilterEntries())
    assert binding.rate_limit == 1000
    assert build_plan(received.probes[0], CTX).source  # and it builds
    assert sent[f"{SYSTEM}/execs"].spec.output.rate_limit is None  # privileged: no default


def test_rate_limits_over_the_events_budget_are_refused() -> None:
    probes = [
        events_probe("team-a", "huge", rate=50_000),
        events_probe("team-a", "fits", rate=6_000),
        events_probe("team-a", "third", rate=5_000),
        events_probe("team-b", "default"),
    ]
    v = view(probes, TENANTS, {"team-b": {"defaultRateLimit": 200}})
    plan = plan_cluster(v, SETTINGS)
    assert on_node(plan, "team-a") == ["fits"]
    refused = plan.rendered.refused[NODE]
    assert refused["team-a/huge"] == (
        "team-a's events probes would take 56000 events/s on node n1 (this one's rate limit: "
        "50000), its budget is 10000 events/s per node"
    )
    assert refused["team-a/third"].startswith("team-a's events probes would take 11000 events/s")
    assert [
        a.spec.output.rate_limit for a in plan.rendered.nodes[NODE] if a.namespace == "team-b"
    ] == [200]


def test_one_quota_event_per_probe_going_over_not_one_per_count() -> None:
    first = plan_cluster(v1 := view(flood(40), TENANTS), SETTINGS)
    before = status(first, v1, "team-a/a039")
    second = plan_cluster(v2 := view(flood(41), TENANTS), SETTINGS)
    after = status(second, v2, "team-a/a039")
    assert before.condition("Accepted") != after.condition("Accepted")  # 40 -> 41 probes
    assert probe_events(before, after) == []
    assert [e.reason for e in probe_events(None, before)] == ["QuotaExceeded"]
