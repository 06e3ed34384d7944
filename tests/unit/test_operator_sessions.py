"""Debug sessions (spec.duration): the clock starts at the first Ready, an ended session
leaves every node and says Expired with its last values, a new duration runs again, and a
namespace's maxDuration caps and defaults it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from tests.unit.test_operator_budgets import NODE, SETTINGS, pod, probe, view
from tracekeeper_api.durations import format_duration, parse_duration
from tracekeeper_api.output import CountRow, EventTotals, HistogramRow, ProbeValues
from tracekeeper_api.output_text import session_text
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import NodeReport, ProbeAssignment, ProbeOutcome
from tracekeeper_api.status import DebugSession, SessionValues, TraceProbeStatus
from tracekeeper_operator.agent_views import AgentView
from tracekeeper_operator.cluster_plan import ClusterPlan, plan_cluster
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.control_loop import probe_status
from tracekeeper_operator.records import ProbeRecord
from tracekeeper_operator.sessions import next_expiry, summarize
from tracekeeper_operator.status_folding import probe_events, status_differs

NS = "team-a"
T0 = datetime(2026, 12, 2, 5, 0, 0, tzinfo=UTC)


def on_node(plan: ClusterPlan, ns: str) -> list[str]:
    return [a.name for a in plan.rendered.nodes.get(NODE, []) if a.namespace == ns]


def loaded_views(plan: ClusterPlan) -> dict[str, AgentView]:
    """The node's agent reports every probe it was sent as Loaded."""
    sent: Sequence[ProbeAssignment] = plan.rendered.nodes.get(NODE, [])
    report = NodeReport(
        node=NODE,
        revision=1,
        boot_id="b",
        probes=[
            ProbeOutcome(id=a.id, spec_hash=plan.rendered.spec_hashes[a.id], state="Loaded",
                         reason="Loaded")
            for a in sent
        ],
    )  # fmt: skip
    return {NODE: AgentView(NODE, "http://n1:1", report, None)}


def fold(
    v: ClusterView, previous: TraceProbeStatus | None, now: datetime
) -> tuple[ClusterPlan, TraceProbeStatus]:
    p = next(iter(v.probes.values()))
    plan = plan_cluster(v, SETTINGS, {p.id: previous}, now)
    status = probe_status(
        p, plan.selections[p.id], plan, loaded_views(plan), previous=previous, now=now,
        max_failures=10,
    )  # fmt: skip
    assert status is not None
    return plan, status


def with_spec(p: ProbeRecord, **changes: object) -> ProbeRecord:
    assert p.spec is not None
    spec = TraceProbeSpec.model_validate({**p.spec.to_wire(), **changes})
    return ProbeRecord(p.ref, p.generation + 1, spec, created=p.created)


def reason(status: TraceProbeStatus, type_: str = "Ready") -> tuple[str, str]:
    c = status.condition(type_)  # type: ignore[arg-type]
    assert c is not None
    return c.status, c.reason


def test_durations_parse_and_print_as_kubectl_writes_them() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("500ms") == 0.5
    assert format_duration(5400) == "1h30m" and format_duration(0.25) == "250ms"
    for bad in ("10", "1.5h", "5 m", "-1s", "1d"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="out of range"):
        TraceProbeSpec.model_validate({"tracepoint": "a:b", "duration": "200h"})


def test_the_clock_starts_at_the_first_ready_and_the_session_ends_everywhere() -> None:
    p = probe(NS, "opens", duration="10m")
    v = view([p], [pod(NS, "web-0")])
    # Not Ready yet (no agent answered): pending, not started.
    plan = plan_cluster(v, SETTINGS, {p.id: None}, T0)
    pending = probe_status(
        p, plan.selections[p.id], plan, {}, previous=None, now=T0, max_failures=10
    )
    assert pending is not None and pending.session == DebugSession(duration="10m")
    assert reason(pending, "Expired") == ("False", "SessionPending")
    # Ready one minute later: 10 minutes from then.
    _, running = fold(v, pending, T0 + timedelta(minutes=1))
    assert reason(running) == ("True", "Loaded")
    assert running.session is not None
    assert running.session.started_at == "2026-12-02T05:01:00Z"
    assert running.session.expires_at == "2026-12-02T05:11:00Z"
    assert reason(running, "Expired") == ("False", "SessionRunning")
    # Passes while it runs fold to the same status: nothing written, no time-left churn.
    plan, again = fold(v, running, T0 + timedelta(minutes=7))
    assert not status_differs(running, again)
    assert on_node(plan, NS) == ["opens"]
    assert next_expiry(plan.sessions.values(), T0 + timedelta(minutes=7)) == 240
    # At the end: left out of every node, Ready=False Expired, Expired=True, an Event.
    plan, ended = fold(v, running, T0 + timedelta(minutes=11))
    assert p.id in plan.expired and on_node(plan, NS) == []
    assert reason(ended) == ("False", "Expired") and reason(ended, "Loaded") == ("False", "Expired")
    assert reason(ended, "Expired") == ("True", "Expired")
    assert ended.session is not None and ended.session.expires_at == "2026-12-02T05:11:00Z"
    assert [e.reason for e in probe_events(running, ended)] == ["Expired"]
    # And it stays so: the object is kept, the session too.
    plan, later = fold(v, ended, T0 + timedelta(hours=3))
    assert p.id in plan.expired and not status_differs(ended, later)


def test_a_new_duration_runs_again_and_no_duration_runs_until_deleted() -> None:
    p = probe(NS, "opens", duration="10m")
    pods = [pod(NS, "web-0")]
    _, running = fold(view([p], pods), None, T0)
    _, ended = fold(view([p], pods), running, T0 + timedelta(minutes=10))
    assert reason(ended) == ("False", "Expired")
    # Another field changed: still over.
    other = with_spec(p, sampling=2)
    plan, still = fold(view([other], pods), ended, T0 + timedelta(minutes=12))
    assert reason(still) == ("False", "Expired") and on_node(plan, NS) == []
    # A new duration: pushed again, a new session from this Ready.
    longer = with_spec(p, duration="20m")
    plan, rearmed = fold(view([longer], pods), ended, T0 + timedelta(minutes=12))
    assert on_node(plan, NS) == ["opens"] and reason(rearmed) == ("True", "Loaded")
    assert rearmed.session is not None and rearmed.session.duration == "20m"
    assert rearmed.session.expires_at == "2026-12-02T05:32:00Z"
    assert rearmed.session.final is None
    # Duration removed: no session, no Expired condition, loaded.
    plain = with_spec(p, duration=None)
    plan, forever = fold(view([plain], pods), ended, T0 + timedelta(minutes=12))
    assert on_node(plan, NS) == ["opens"] and forever.session is None
    assert forever.condition("Expired") is None


def test_a_namespace_max_duration_caps_and_defaults_sessions() -> None:
    pods = [pod(NS, "web-0")]
    budget = {NS: {"maxDuration": "30m"}}
    _, bounded = fold(view([probe(NS, "opens")], pods, budget), None, T0)
    assert bounded.session is not None and bounded.session.duration == "30m"
    assert bounded.session.expires_at == "2026-12-02T05:30:00Z"
    long = probe(NS, "opens", duration="2h")
    plan, refused = fold(view([long], pods, budget), None, T0)
    ok, why = reason(refused, "Accepted")
    assert (ok, why) == ("False", "NotPermitted") and on_node(plan, NS) == []
    cond = refused.condition("Accepted")
    assert cond is not None and "maxDuration 30m" in cond.message
    # A privileged namespace has no budget: no default session.
    system = probe(SETTINGS.namespace, "opens")
    _, free = fold(view([system], [pod(SETTINGS.namespace, "x")], budget), None, T0)
    assert free.session is None


def test_final_values_keep_the_total_and_the_largest_keys() -> None:
    counts = ProbeValues(
        probe="a/b", kind="count", by=["pod"], nodes=["n1", "n2"],
        counts=[CountRow(key={"pod": f"web-{i}"}, count=100 - i) for i in range(15)],
    )  # fmt: skip
    final = summarize(counts, read_at="t", unread=["n3"])
    assert final.total == sum(100 - i for i in range(15))
    assert [r.count for r in final.top] == list(range(100, 90, -1))
    assert final.nodes == ["n1", "n2"] and final.unread == ["n3"]
    hist = ProbeValues(
        probe="a/b", kind="histogram", by=["comm"],
        histograms=[HistogramRow(key={"comm": "a"}, buckets={1: 2, 3: 4}),
                    HistogramRow(key={"comm": "b"}, buckets={0: 10})],
    )  # fmt: skip
    h = summarize(hist, read_at="t", unread=[])
    assert h.total == 16 and [(r.key, r.count) for r in h.top] == [
        ({"comm": "b"}, 10),
        ({"comm": "a"}, 6),
    ]
    events = ProbeValues(probe="a/b", kind="events", events=EventTotals(produced=42))
    assert summarize(events, read_at="t", unread=[]).total == 42


def test_session_text() -> None:
    pending = DebugSession(duration="10m")
    assert session_text(pending, T0) == "SESSION: 10m, starts when the probe is first Ready\n"
    running = DebugSession(
        duration="10m", started_at="2026-12-02T05:00:00Z", expires_at="2026-12-02T05:10:00Z"
    )
    assert "4m30s left" in session_text(running, T0 + timedelta(minutes=5, seconds=30))
    final = SessionValues(
        read_at="2026-12-02T05:10:00Z", total=7, top=[], nodes=["n1"], unread=["n2"]
    )
    ended = session_text(running.model_copy(update={"final": final}), T0 + timedelta(hours=1))
    assert "ended at 2026-12-02T05:10:00Z" in ended and "total 7" in ended
    assert "not read (agent unreachable): n2" in ended


def test_a_status_patch_deletes_what_the_status_no_longer_has() -> None:
    ended = DebugSession(duration="5s", final=SessionValues(read_at="t"))
    rearmed = TraceProbeStatus(session=DebugSession(duration="1h"))
    patch = rearmed.to_merge_patch()
    assert patch["session"]["final"] is None  # deletes the stored final values
    assert "final" in ended.to_wire() and patch["session"]["duration"] == "1h"
    # Lists are replaced whole and stored as written: no nulls inside them.
    with_conditions = TraceProbeStatus.model_validate(
        {"conditions": [{"type": "Ready", "status": "True", "reason": "Loaded"}]}
    )
    assert with_conditions.to_merge_patch()["conditions"] == [
        {"type": "Ready", "status": "True", "reason": "Loaded", "message": ""}
    ]
