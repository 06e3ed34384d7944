"""Per-node desired state: what each agent is sent, and revisions across restarts."""

from __future__ import annotations

from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import NodeState, PodTarget, ProbeTargets, spec_hash
from tracekeeper_operator.budgets import NamespaceBudgets
from tracekeeper_operator.node_state import RevisionClock, node_state, render_nodes
from tracekeeper_operator.records import ObjectRef, ProbeRecord
from tracekeeper_operator.selection import Selected
from tracekeeper_operator.settings import OperatorSettings

BUDGETS = NamespaceBudgets(OperatorSettings(), {})

UID = "00000000-0000-4000-8000-000000000001"


def probe(name: str, **spec: object) -> ProbeRecord:
    full = {"tracepoint": "syscalls:sys_enter_openat", **spec}
    return ProbeRecord(
        ObjectRef("TraceProbe", "team-a", name, f"uid-{name}"),
        1,
        TraceProbeSpec.model_validate(full),
    )


def on(*nodes: str) -> Selected:
    pod = PodTarget(uid=UID, namespace="team-a", name="web-0")
    return Selected(targets={n: ProbeTargets(pods=[pod]) for n in nodes}, pods=1, containers=1)


def test_each_node_gets_only_the_probes_with_targets_there() -> None:
    probes = {"team-a/a": probe("a"), "team-a/b": probe("b")}
    rendered = render_nodes(
        probes,
        {"team-a/a": on("n1"), "team-a/b": on("n1", "n2")},
        ["n1", "n2", "n3"],
        allow_raw=False,
        budgets=BUDGETS,
    )
    assert {n: [a.id for a in v] for n, v in rendered.nodes.items()} == {
        "n1": ["team-a/a", "team-a/b"],
        "n2": ["team-a/b"],
        "n3": [],  # an agent with nothing to run still gets its (empty) state
    }
    first = rendered.nodes["n1"][0]
    assert first.spec_hash == spec_hash(probes["team-a/a"].spec)  # type: ignore[arg-type]
    assert first.targets.pods[0].uid == UID and not first.allow_program


def test_suspended_and_deleting_probes_are_left_out() -> None:
    suspended = probe("s", suspend=True)
    deleting = ProbeRecord(probe("d").ref, 1, probe("d").spec, deleting=True)
    rendered = render_nodes(
        {"team-a/s": suspended, "team-a/d": deleting},
        {"team-a/s": on("n1"), "team-a/d": on("n1")},
        ["n1"],
        allow_raw=True,
        budgets=BUDGETS,
    )
    assert rendered.nodes == {"n1": ()}


def test_raw_programs_carry_allow_program_only_when_allowed() -> None:
    raw = ProbeRecord(
        ObjectRef("TraceProbe", "tk", "raw", "u"),
        1,
        TraceProbeSpec.model_validate({"program": {"source": "x"}}),
    )
    for allow in (True, False):
        rendered = render_nodes(
            {"tk/raw": raw}, {"tk/raw": on("n1")}, [], allow_raw=allow, budgets=BUDGETS
        )
        assert rendered.nodes["n1"][0].allow_program is allow


def test_rendering_is_deterministic_and_validates_as_a_node_state() -> None:
    probes = {"team-a/b": probe("b"), "team-a/a": probe("a")}
    sel = {"team-a/b": on("n1"), "team-a/a": on("n1")}
    one = render_nodes(probes, sel, ["n1"], allow_raw=False, budgets=BUDGETS)
    two = render_nodes(
        dict(reversed(probes.items())),
        dict(reversed(sel.items())),
        ["n1"],
        allow_raw=False,
        budgets=BUDGETS,
    )
    assert one == two
    state = node_state("n1", 7, one.nodes["n1"])
    assert NodeState.model_validate_json(state.model_dump_json(by_alias=True)) == state


def test_revisions_are_monotonic_and_above_a_predecessors() -> None:
    wall = [1_000]
    clock = RevisionClock(lambda: wall[0])
    assert [clock.next(), clock.next(), clock.next()] == [1_000, 1_001, 1_002]
    wall[0] = 500  # the wall clock went back: revisions still increase
    assert clock.next() == 1_003
    restarted = RevisionClock(lambda: 5_000)  # a new operator, later
    assert restarted.next() > 1_003
    restarted.move_past(9_999)  # an agent answered 409 with a higher applied revision
    assert restarted.next() == 10_000
