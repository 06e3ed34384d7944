"""tracekeeper_operator_probe_ready: each TraceProbe's Ready condition, read at scrape time
from the control loop's last pass, one series per probe."""

from __future__ import annotations

import asyncio
import dataclasses

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_operator_control_loop import (
    FILTER,
    PROBE,
    SETTINGS,
    FakeWrites,
    cluster,
    pod,
)
from tests.unit.test_operator_pushes import FakeAgents
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.status import TraceProbeStatus
from tracekeeper_operator.control_loop import ControlLoop
from tracekeeper_operator.metrics import OperatorMetrics, ProbeReadiness
from tracekeeper_operator.push_planner import PushPlanner
from tracekeeper_operator.pusher import Pusher
from tracekeeper_operator.records import ObjectRef, ProbeRecord

NAME = "tracekeeper_operator_probe_ready"

Series = dict[tuple[str, str, str], float]


def probe_ready(metrics: OperatorMetrics) -> Series:
    """namespace, probe, reason -> value, as Prometheus would read the scrape."""
    text = generate_latest(metrics.registry).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == NAME]
    assert family.type == "gauge"
    return {
        (s.labels["namespace"], s.labels["probe"], s.labels["reason"]): s.value
        for s in family.samples
    }


def test_the_gauge_reads_its_source_at_every_scrape() -> None:
    metrics = OperatorMetrics()
    assert probe_ready(metrics) == {}  # declared (HELP, TYPE) before any pass
    current = [ProbeReadiness("team-a", "opens", False, "NodesPending")]
    metrics.watch_probes(lambda: current)
    assert probe_ready(metrics) == {("team-a", "opens", "NodesPending"): 0.0}
    current = [
        ProbeReadiness("team-a", "opens", True, "Loaded"),
        ProbeReadiness("team-b", "execs", False, "CompileFailed"),
    ]
    # A new reason replaces the old series: nothing stale stays behind.
    assert probe_ready(metrics) == {
        ("team-a", "opens", "Loaded"): 1.0,
        ("team-b", "execs", "CompileFailed"): 0.0,
    }


def suspended_probe() -> ProbeRecord:
    spec = TraceProbeSpec.model_validate({"tracepoint": "syscalls:sys_enter_read", "suspend": True})
    return ProbeRecord(ObjectRef("TraceProbe", "team-a", "paused", "uid-s"), 1, spec)


async def test_one_series_per_probe_follows_the_folded_status() -> None:
    agents = FakeAgents()
    metrics = OperatorMetrics()
    pusher = Pusher(PushPlanner(debounce=0.0), agents)
    loop = ControlLoop(SETTINGS, pusher, FakeWrites(), metrics=metrics)
    web = pod("web-0", app="web")
    state = {"view": cluster(PROBE, FILTER, web)}
    loop.attach(lambda: state["view"])
    assert probe_ready(metrics) == {}  # no pass yet: nothing is known
    task = asyncio.create_task(pusher.run())
    try:
        await loop.reconcile_once()
        assert probe_ready(metrics) == {("team-a", "opens", "NodesPending"): 0.0}
        await agents.until(pusher.planner.settled)
        await loop.reconcile_once()
        assert probe_ready(metrics) == {("team-a", "opens", "Loaded"): 1.0}

        # A suspended probe is not Ready (the alert leaves reason Suspended out); a probe
        # being deleted has no series, nor has one that is gone.
        view = cluster(PROBE, FILTER, web)
        state["view"] = dataclasses.replace(
            view, probes={**view.probes, "team-a/paused": suspended_probe()}
        )
        await loop.reconcile_once()
        assert probe_ready(metrics) == {
            ("team-a", "opens", "Loaded"): 1.0,
            ("team-a", "paused", "Suspended"): 0.0,
        }
        state["view"] = cluster(dataclasses.replace(PROBE, deleting=True), FILTER, web)
        await loop.reconcile_once()
        assert probe_ready(metrics) == {}
    finally:
        task.cancel()


async def test_a_refused_probe_is_not_ready_with_the_refusal_reason() -> None:
    metrics = OperatorMetrics()
    loop = ControlLoop(
        SETTINGS, Pusher(PushPlanner(debounce=0.0), FakeAgents()), FakeWrites(), metrics=metrics
    )
    host_wide = dataclasses.replace(
        PROBE,
        spec=TraceProbeSpec.model_validate(
            {"tracepoint": "syscalls:sys_enter_openat", "filter": {"hostWide": True}}
        ),
    )
    loop.attach(lambda: cluster(host_wide, FILTER))
    await loop.reconcile_once()
    assert probe_ready(metrics) == {("team-a", "opens", "NotPermitted"): 0.0}


async def test_a_restarted_operator_reports_the_stored_status_until_agents_answer() -> None:
    stored = TraceProbeStatus.model_validate(
        {
            "observedGeneration": 1,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Loaded", "message": "loaded"}
            ],
        }
    )
    metrics = OperatorMetrics()
    loop = ControlLoop(
        SETTINGS, Pusher(PushPlanner(debounce=0.0), FakeAgents()), FakeWrites(), metrics=metrics
    )
    loop.attach(
        lambda: cluster(dataclasses.replace(PROBE, status=stored), FILTER, pod("web-0", app="web"))
    )
    await loop.reconcile_once()  # n1 has not answered: the stored status is kept
    assert probe_ready(metrics) == {("team-a", "opens", "Loaded"): 1.0}
