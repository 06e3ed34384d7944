"""Status folding: every reason, bounded failures, stable transition times, no-change folds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import NodeReport, Persistence, ProbeOutcome, ProbeState, spec_hash
from tracekeeper_api.status import TraceProbeStatus
from tracekeeper_operator.agent_views import AgentView
from tracekeeper_operator.records import ObjectRef, ProbeRecord
from tracekeeper_operator.selection import Refusal, Selected
from tracekeeper_operator.status_folding import (
    fold_probe_status,
    node_outcomes,
    probe_events,
    status_differs,
)
from tracekeeper_operator.unloading import unload_verdict

T0 = "2024-05-01T10:00:00Z"
T1 = "2024-05-01T10:05:00Z"
SPEC = TraceProbeSpec.model_validate({"tracepoint": "syscalls:sys_enter_openat"})
HASH = spec_hash(SPEC)
PROBE = ProbeRecord(ObjectRef("TraceProbe", "team-a", "opens", "uid-1"), 3, SPEC)
ID = PROBE.id


def on(*nodes: str) -> Selected:
    from tracekeeper_api.protocol import ProbeTargets

    return Selected(targets={n: ProbeTargets() for n in nodes}, pods=len(nodes), containers=2)


def agent(
    node: str,
    state: ProbeState | None = "Loaded",
    reason: str = "Loaded",
    message: str = "",
    *,
    spec_hash_: str = HASH,
    error: str | None = None,
) -> AgentView:
    probes = []
    if state is not None:
        probes = [
            ProbeOutcome(
                id=ID,
                spec_hash=spec_hash_,
                state=state,
                reason=reason,
                message=message,
                program_ids=[42],
            )
        ]
    report = NodeReport(node=node, revision=1, boot_id="b", probes=probes)
    return AgentView(node, f"http://{node}", report, error)


def fold(
    selection: Selected | Refusal,
    views: dict[str, AgentView],
    previous: TraceProbeStatus | None = None,
    now: str = T0,
    probe: ProbeRecord = PROBE,
    max_failures: int = 10,
) -> TraceProbeStatus:
    outcomes = []
    if isinstance(selection, Selected):
        outcomes = node_outcomes(ID, HASH, selection.nodes, views)
    return fold_probe_status(
        probe, selection, outcomes, previous=previous, now=now, max_failures=max_failures
    )


def cond(status: TraceProbeStatus, type_: str) -> tuple[str, str]:
    c = status.condition(type_)  # type: ignore[arg-type]
    assert c is not None
    return c.status, c.reason


def test_loaded_everywhere_is_ready() -> None:
    st = fold(on("n1", "n2"), {"n1": agent("n1"), "n2": agent("n2")})
    assert cond(st, "Ready") == ("True", "Loaded")
    assert cond(st, "Accepted") == ("True", "Accepted")
    assert cond(st, "Loaded") == ("True", "Loaded")
    assert cond(st, "Degraded") == ("False", "NoFailures")
    assert (st.nodes.targeted, st.nodes.loaded, st.nodes.failed) == (2, 2, 0)
    assert (st.targets.pods, st.targets.containers) == (2, 2)
    assert st.observed_generation == 3 and st.failures == []
    assert all(c.observed_generation == 3 and c.last_transition_time == T0 for c in st.conditions)
    assert "loaded on 2 of 2 nodes" in st.condition("Ready").message  # type: ignore[union-attr]


@pytest.mark.parametrize("reason", ["NotPermitted", "InvalidSpec", "FilterNotFound"])
def test_refusals_are_not_accepted(reason: str) -> None:
    st = fold(Refusal(reason, f"because {reason}"), {})  # type: ignore[arg-type]
    assert cond(st, "Accepted") == ("False", reason)
    assert cond(st, "Ready") == ("False", reason)
    assert cond(st, "Loaded") == ("False", reason)
    assert st.condition("Accepted").message == f"because {reason}"  # type: ignore[union-attr]
    assert st.nodes.targeted == 0


def test_no_matching_pods() -> None:
    st = fold(Selected(), {})
    assert cond(st, "Ready") == ("False", "NoMatchingPods")
    assert cond(st, "Loaded") == ("False", "NoMatchingPods")
    assert "team-a" in st.condition("Ready").message  # type: ignore[union-attr]


def test_suspended() -> None:
    suspended = ProbeRecord(PROBE.ref, 4, SPEC.model_copy(update={"suspend": True}))
    st = fold(on("n1"), {}, probe=suspended)
    assert cond(st, "Ready") == ("False", "Suspended")
    assert cond(st, "Accepted") == ("True", "Accepted")


def test_nodes_pending_until_the_agent_reports_this_spec() -> None:
    views = {"n1": agent("n1"), "n2": agent("n2", spec_hash_="0ldspec0"), "n3": agent("n3", None)}
    st = fold(on("n1", "n2", "n3"), views)
    assert cond(st, "Ready") == ("False", "NodesPending")
    assert cond(st, "Loaded") == ("False", "NodesPending")
    assert cond(st, "Degraded") == ("False", "NoFailures")
    assert (st.nodes.targeted, st.nodes.loaded, st.nodes.failed) == (3, 1, 0)
    assert "waiting for n2, n3" in st.condition("Ready").message  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("state", "reason", "message"),
    [
        ("Unsupported", "Unsupported", "kprobes are not available: CONFIG_KPROBES is not set"),
        ("Failed", "CompileFailed", "error: use of undeclared identifier 'x'"),
        ("Failed", "AttachFailed", "cannot attach kprobe, probe entry may not exist"),
        ("KernelHeadersMissing", "KernelHeadersMissing", "no /lib/modules/6.1.0/build"),
    ],
)
def test_agent_failures_degrade_with_the_agents_text(
    state: ProbeState, reason: str, message: str
) -> None:
    st = fold(
        on("n1", "n2"),
        {"n1": agent("n1", state, reason, message), "n2": agent("n2", state, reason, message)},
    )
    assert cond(st, "Degraded") == ("True", reason)
    assert cond(st, "Ready") == ("False", reason)
    assert cond(st, "Loaded") == ("False", reason)
    assert message in st.condition("Degraded").message  # type: ignore[union-attr]
    assert [(f.node, f.reason, f.message) for f in st.failures] == [
        ("n1", reason, message),
        ("n2", reason, message),
    ]
    assert (st.nodes.loaded, st.nodes.failed) == (0, 2)


def test_partial_failure_names_the_dominant_reason() -> None:
    views = {
        "n1": agent("n1"),
        "n2": agent("n2", "Unsupported", "Unsupported", "no kprobes"),
        "n3": agent("n3", "Unsupported", "Unsupported", "no kprobes"),
        "n4": agent("n4", "Failed", "AttachFailed", "busy"),
    }
    st = fold(on("n1", "n2", "n3", "n4"), views)
    assert cond(st, "Degraded") == ("True", "Unsupported")
    assert (st.nodes.targeted, st.nodes.loaded, st.nodes.failed) == (4, 1, 3)


def test_unreachable_and_missing_agents_are_failures() -> None:
    views = {"n1": agent("n1", error="PUT http://n1/v1/state: ClientConnectorError: refused")}
    st = fold(on("n1", "n2"), views)
    assert [(f.node, f.reason) for f in st.failures] == [
        ("n1", "AgentUnreachable"),
        ("n2", "AgentUnreachable"),
    ]
    assert "refused" in st.failures[0].message
    assert "no tracekeeper agent" in st.failures[1].message


def test_failure_list_is_bounded() -> None:
    nodes = [f"n{i:04d}" for i in range(5000)]
    views = {n: agent(n, "Unsupported", "Unsupported", "no kprobes") for n in nodes}
    st = fold(on(*nodes), views, max_failures=10)
    assert len(st.failures) == 10 and st.nodes.failed == 5000
    assert [f.node for f in st.failures] == nodes[:10]
    assert len(st.condition("Degraded").message) <= 1024  # type: ignore[union-attr]
    assert "and 4995 more" in st.condition("Degraded").message  # type: ignore[union-attr]


def test_folding_again_changes_nothing_so_nothing_is_written() -> None:
    views = {"n1": agent("n1"), "n2": agent("n2", "Unsupported", "Unsupported", "x")}
    first = fold(on("n1", "n2"), views, now=T0)
    again = fold(on("n1", "n2"), views, previous=first, now=T1)
    assert again == first and not status_differs(first, again)
    assert status_differs(None, first)


def test_transition_time_moves_only_when_the_status_flips() -> None:
    pending = fold(on("n1"), {"n1": agent("n1", None)}, now=T0)
    # Another pending message (different reason text) keeps the time: status is still False.
    failed = fold(
        on("n1"), {"n1": agent("n1", "Failed", "AttachFailed", "x")}, previous=pending, now=T1
    )
    ready_false = failed.condition("Ready")
    assert ready_false is not None and ready_false.last_transition_time == T0
    assert failed.condition("Degraded").last_transition_time == T1  # type: ignore[union-attr]
    loaded = fold(on("n1"), {"n1": agent("n1")}, previous=failed, now=T1)
    assert loaded.condition("Ready").last_transition_time == T1  # type: ignore[union-attr]
    assert loaded.condition("Accepted").last_transition_time == T0  # type: ignore[union-attr]


def test_events_follow_transitions_only() -> None:
    pending = fold(on("n1", "n2"), {"n1": agent("n1", None), "n2": agent("n2", None)})
    assert probe_events(None, pending) == []
    views = {"n1": agent("n1"), "n2": agent("n2")}
    loaded = fold(on("n1", "n2"), views, previous=pending)
    assert [e.reason for e in probe_events(pending, loaded)] == ["ProbeLoaded"]
    assert probe_events(loaded, fold(on("n1", "n2"), views, previous=loaded)) == []
    broken = {"n1": agent("n1"), "n2": agent("n2", "Failed", "CompileFailed", "bad C")}
    degraded = fold(on("n1", "n2"), broken, previous=loaded)
    (event,) = probe_events(loaded, degraded)
    assert (event.type, event.reason) == ("Warning", "ProbeLoadFailed")
    assert event.message == "n2: CompileFailed: bad C"
    assert probe_events(degraded, fold(on("n1", "n2"), broken, previous=degraded)) == []


def test_not_permitted_is_announced_once() -> None:
    refused = fold(Refusal("NotPermitted", "pids is privileged"), {})
    (event,) = probe_events(None, refused)
    assert (event.type, event.reason, event.message) == (
        "Warning",
        "NotPermitted",
        "pids is privileged",
    )
    assert (
        probe_events(
            refused, fold(Refusal("NotPermitted", "pids is privileged"), {}, previous=refused)
        )
        == []
    )


def test_suspending_a_loaded_probe_announces_the_unload() -> None:
    loaded = fold(on("n1"), {"n1": agent("n1")})
    suspended = ProbeRecord(PROBE.ref, 4, SPEC.model_copy(update={"suspend": True}))
    st = fold(on("n1"), {}, previous=loaded, probe=suspended)
    assert [e.reason for e in probe_events(loaded, st)] == ["ProbeUnloaded"]


FULL = "revision 7 not saved: [Errno 28] No space left on device"


def unsaved(view: AgentView, error: str | None = FULL) -> AgentView:
    """`view` with its agent's report saying the state it applied is not on disk."""
    assert view.report is not None
    persisted = Persistence(revision=5, error=error)
    return replace(view, report=view.report.model_copy(update={"persisted": persisted}))


def test_a_state_not_saved_is_said_with_the_agents_text_and_tracing_stays_ready() -> None:
    st = fold(on("n1", "n2"), {"n1": unsaved(agent("n1")), "n2": agent("n2")})
    assert cond(st, "Persisted") == ("False", "StateNotSaved")
    message = st.condition("Persisted").message  # type: ignore[union-attr]
    assert f"n1: {FULL}" in message and "1 of 2 nodes" in message and "n2" not in message
    # It still traces there: not a failure, not Degraded, not unready.
    assert cond(st, "Ready") == ("True", "Loaded")
    assert cond(st, "Degraded") == ("False", "NoFailures")
    assert (st.nodes.loaded, st.nodes.failed, st.failures) == (2, 0, [])
    saved = fold(on("n1", "n2"), {"n1": agent("n1"), "n2": agent("n2")}, previous=st, now=T1)
    assert cond(saved, "Persisted") == ("True", "StateSaved")
    assert saved.condition("Persisted").last_transition_time == T1  # type: ignore[union-attr]


def test_persisted_covers_the_nodes_that_run_the_probe_only() -> None:
    # n1 failed to load it: its unsaved state is nothing this probe would lose.
    views = {"n1": unsaved(agent("n1", "Failed", "AttachFailed", "x")), "n2": agent("n2")}
    assert cond(fold(on("n1", "n2"), views), "Persisted") == ("True", "StateSaved")
    # Loaded nowhere (pending, refused, no pods): no Persisted condition at all.
    pending = {"n1": unsaved(agent("n1", spec_hash_="0ldspec0"))}
    assert fold(on("n1"), pending).condition("Persisted") is None
    assert fold(Refusal("NotPermitted", "no"), {}).condition("Persisted") is None
    assert fold(Selected(), {}).condition("Persisted") is None


def test_state_not_saved_events_on_the_transitions_only() -> None:
    views = {"n1": agent("n1"), "n2": agent("n2")}
    loaded = fold(on("n1", "n2"), views)
    full = fold(on("n1", "n2"), {**views, "n2": unsaved(views["n2"])}, previous=loaded, now=T1)
    (event,) = probe_events(loaded, full)
    assert (event.type, event.reason) == ("Warning", "StateNotSaved")
    assert f"n2: {FULL}" in event.message
    # Still full, the next push's revision in the agent's text: the status follows, no Event.
    later = FULL.replace("revision 7", "revision 8")
    still = fold(on("n1", "n2"), {**views, "n2": unsaved(views["n2"], later)}, previous=full)
    assert status_differs(full, still) and probe_events(full, still) == []
    assert still.condition("Persisted").last_transition_time == T1  # type: ignore[union-attr]
    saved = fold(on("n1", "n2"), views, previous=still)
    (event,) = probe_events(still, saved)
    assert (event.type, event.reason) == ("Normal", "StateSaved")
    assert probe_events(saved, fold(on("n1", "n2"), views, previous=saved)) == []


def test_a_state_not_saved_on_many_nodes_is_bounded() -> None:
    nodes = [f"n{i:04d}" for i in range(5000)]
    st = fold(on(*nodes), {n: unsaved(agent(n)) for n in nodes})
    message = st.condition("Persisted").message  # type: ignore[union-attr]
    assert len(message) <= 1024 and "5000 of 5000 nodes" in message
    assert "and 4995 more" in message


def test_unload_verdicts() -> None:
    now = datetime(2024, 5, 1, 10, 0, 30, tzinfo=UTC)
    started = (now - timedelta(seconds=20)).strftime("%Y-%m-%dT%H:%M:%SZ")
    done = unload_verdict([], deletion_started=started, now=now, timeout=60)
    assert done.release and done.event is not None and done.event.reason == "ProbeUnloaded"
    waiting = unload_verdict(["n1", "n2"], deletion_started=started, now=now, timeout=60)
    assert not waiting.release and "n1, n2" in waiting.message
    late = unload_verdict(["n2"], deletion_started=started, now=now, timeout=10)
    assert late.release and late.event is not None and late.event.type == "Warning"
    assert "n2" in late.event.message and "10s" in late.event.message
