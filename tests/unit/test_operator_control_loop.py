"""The control loop against fakes: statuses written once per change, never in a storm."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from tests.unit.test_operator_pushes import FakeAgents
from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.status import TraceFilterStatus, TraceProbeStatus
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.control_loop import ControlLoop
from tracekeeper_operator.kube_events import EventSpec
from tracekeeper_operator.push_planner import PushPlanner
from tracekeeper_operator.pusher import Pusher
from tracekeeper_operator.records import (
    AgentRecord,
    ContainerRecord,
    FilterRecord,
    LabelledRecord,
    ObjectRef,
    PodRecord,
    ProbeRecord,
)
from tracekeeper_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(namespace="tk", render_debounce=0.0)


class FakeWrites:
    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, EventSpec]] = []

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> bool:
        self.patches.append((ref.key, status))
        return True

    async def post_event(self, ref: ObjectRef, event: EventSpec) -> None:
        self.events.append((ref.key, event))


def pod(name: str, **labels: str) -> PodRecord:
    return PodRecord(
        "team-a",
        name,
        f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}",
        "n1",
        labels,
        "Running",
        (ContainerRecord("app", "containerd://ab"),),
    )


PROBE = ProbeRecord(
    ObjectRef("TraceProbe", "team-a", "opens", "uid-p"),
    1,
    TraceProbeSpec.model_validate({"tracepoint": "syscalls:sys_enter_openat", "filterRef": "web"}),
)
FILTER = FilterRecord(
    ObjectRef("TraceFilter", "team-a", "web", "uid-f"),
    2,
    TraceFilterSpec.model_validate({"podSelector": {"matchLabels": {"app": "web"}}}),
)


def cluster(probe: ProbeRecord, filt: FilterRecord, *pods: PodRecord) -> ClusterView:
    return ClusterView.build(
        pods=pods,
        agents=[AgentRecord("n1", "tk/a", "http://n1")],
        nodes=[LabelledRecord("n1")],
        probes=[probe],
        filters=[filt],
    )


async def test_statuses_follow_agents_and_are_not_rewritten_when_unchanged() -> None:
    agents = FakeAgents()
    writes = FakeWrites()
    pusher = Pusher(PushPlanner(debounce=0.0), agents)
    loop = ControlLoop(SETTINGS, pusher, writes)
    state = {"view": cluster(PROBE, FILTER, pod("web-0", app="web"), pod("db-0", app="db"))}
    loop.attach(lambda: state["view"])
    task = asyncio.create_task(pusher.run())
    try:
        await loop.reconcile_once()
        first = {key: st for key, st in writes.patches}
        probe_status = TraceProbeStatus.model_validate(first["team-a/opens"])
        ready = probe_status.condition("Ready")
        assert ready is not None and ready.reason == "NodesPending"
        filter_status = TraceFilterStatus.model_validate(first["team-a/web"])
        assert filter_status.matched_pods == 1 and filter_status.used_by == ["opens"]

        await loop.reconcile_once()  # the watch has not shown our write yet: no second write
        assert len(writes.patches) == 2

        await agents.until(pusher.planner.settled)
        await loop.reconcile_once()
        written = TraceProbeStatus.model_validate(writes.patches[-1][1])
        assert written.condition("Ready").reason == "Loaded"  # type: ignore[union-attr]
        assert [e.reason for _, e in writes.events] == ["ProbeLoaded"]
        ((_, sent),) = agents.puts
        assert [p.name for p in sent.resolved().probes[0].targets.pods] == ["web-0"]

        # The watch shows our writes: folding again writes nothing.
        patched = len(writes.patches)
        state["view"] = cluster(
            dataclasses.replace(PROBE, status=written),
            dataclasses.replace(FILTER, status=filter_status),
            pod("web-0", app="web"),
            pod("db-0", app="db"),
        )
        for _ in range(5):
            await loop.reconcile_once()
        assert len(writes.patches) == patched
        assert len(agents.puts) == 1
    finally:
        task.cancel()


async def test_filter_edit_changes_targets_not_the_program() -> None:
    agents = FakeAgents()
    pusher = Pusher(PushPlanner(debounce=0.0), agents)
    loop = ControlLoop(SETTINGS, pusher, FakeWrites())
    pods = (pod("web-0", app="web"), pod("db-0", app="db"))
    state = {"view": cluster(PROBE, FILTER, *pods)}
    loop.attach(lambda: state["view"])
    task = asyncio.create_task(pusher.run())
    try:
        await loop.reconcile_once()
        edited = dataclasses.replace(
            FILTER,
            spec=TraceFilterSpec.model_validate({"podSelector": {"matchLabels": {"app": "db"}}}),
        )
        await agents.until(pusher.planner.settled)
        state["view"] = cluster(PROBE, edited, *pods)
        await loop.reconcile_once()
        await agents.until(lambda: len(agents.puts) >= 2 and pusher.planner.settled())
        (_, before), (_, after) = agents.puts
        assert before.probes[0].spec_hash == after.probes[0].spec_hash
        assert [p.name for p in after.resolved().probes[0].targets.pods] == ["db-0"]
    finally:
        task.cancel()


async def test_deleting_probe_leaves_every_node_and_is_held_until_confirmed() -> None:
    agents = FakeAgents()
    pusher = Pusher(PushPlanner(debounce=0.0), agents)
    loop = ControlLoop(SETTINGS, pusher, FakeWrites())
    state = {"view": cluster(PROBE, FILTER, pod("web-0", app="web"))}
    loop.attach(lambda: state["view"])
    task = asyncio.create_task(pusher.run())
    try:
        await loop.reconcile_once()
        await agents.until(pusher.planner.settled)
        assert loop.holding_nodes(PROBE.id) == ["n1"]
        state["view"] = cluster(
            dataclasses.replace(PROBE, deleting=True), FILTER, pod("web-0", app="web")
        )
        await loop.reconcile_once()
        await agents.until(lambda: not loop.holding_nodes(PROBE.id))
        assert agents.puts[-1][1].probes == []
    finally:
        task.cancel()


async def test_a_restarted_operator_holds_a_deleted_probe_before_its_first_pass() -> None:
    """Issue 18's chaos: SIGKILLed and started again, the operator released the finalizer
    of a probe deleted meanwhile 16 ms after its indexes were complete, before any render
    (its planner knew no agent), while the agent still ran the probe."""
    agents = FakeAgents()
    pusher = Pusher(PushPlanner(debounce=0.0), agents)
    loop = ControlLoop(SETTINGS, pusher, FakeWrites())
    deleting = dataclasses.replace(PROBE, deleting=True)
    loop.attach(lambda: cluster(deleting, FILTER, pod("web-0", app="web")))
    assert loop.holding_nodes(PROBE.id) == ["n1"]  # no pass yet: n1 not heard from
    task = asyncio.create_task(pusher.run())
    try:
        await loop.reconcile_once()
        await agents.until(lambda: not loop.holding_nodes(PROBE.id))
        assert agents.puts[-1][1].probes == []
    finally:
        task.cancel()


async def test_a_restarted_operator_keeps_stored_statuses_until_agents_answer() -> None:
    """No NodesPending flap (nor ProbeLoaded Events again) on every operator restart."""
    agents = FakeAgents()
    writes = FakeWrites()
    first = ControlLoop(SETTINGS, Pusher(PushPlanner(debounce=0.0), agents), writes)
    state = {"view": cluster(PROBE, FILTER, pod("web-0", app="web"))}
    first.attach(lambda: state["view"])
    task = asyncio.create_task(first.pusher.run())
    try:
        await first.reconcile_once()
        await agents.until(first.pusher.planner.settled)
        await first.reconcile_once()
    finally:
        task.cancel()
    last = {key: status for key, status in writes.patches}
    stored = TraceProbeStatus.model_validate(last["team-a/opens"])
    assert stored.condition("Ready").reason == "Loaded"  # type: ignore[union-attr]
    stored_filter = TraceFilterStatus.model_validate(last["team-a/web"])
    state["view"] = cluster(
        dataclasses.replace(PROBE, status=stored),
        dataclasses.replace(FILTER, status=stored_filter),
        pod("web-0", app="web"),
    )
    writes.patches.clear()
    writes.events.clear()
    restarted = ControlLoop(SETTINGS, Pusher(PushPlanner(debounce=0.0), agents), writes)
    restarted.attach(lambda: state["view"])
    await restarted.reconcile_once()  # no report from n1 yet: nothing written
    assert writes.patches == []
    task = asyncio.create_task(restarted.pusher.run())
    try:
        await agents.until(restarted.pusher.planner.settled)
        await restarted.reconcile_once()
    finally:
        task.cancel()
    assert writes.patches == [] and writes.events == []


async def test_a_privileged_filter_in_a_tenant_namespace_is_refused_once() -> None:
    writes = FakeWrites()
    loop = ControlLoop(SETTINGS, Pusher(PushPlanner(debounce=0.0), FakeAgents()), writes)
    sneaky = dataclasses.replace(FILTER, spec=TraceFilterSpec.model_validate({"hostWide": True}))
    state = {"view": cluster(PROBE, sneaky, pod("web-0", app="web"))}
    loop.attach(lambda: state["view"])
    await loop.reconcile_once()
    last = {key: status for key, status in writes.patches}
    filter_status = TraceFilterStatus.model_validate(last["team-a/web"])
    (accepted,) = filter_status.conditions
    assert (accepted.status, accepted.reason) == ("False", "NotPermitted")
    probe_status = TraceProbeStatus.model_validate(last["team-a/opens"])
    assert probe_status.condition("Accepted").reason == "NotPermitted"  # type: ignore[union-attr]
    assert sorted((k, e.reason) for k, e in writes.events) == [
        ("team-a/opens", "NotPermitted"),
        ("team-a/web", "NotPermitted"),
    ]
    state["view"] = cluster(
        dataclasses.replace(PROBE, status=probe_status),
        dataclasses.replace(sneaky, status=filter_status),
        pod("web-0", app="web"),
    )
    await loop.reconcile_once()
    assert len(writes.events) == 2


async def test_a_loaded_probe_starts_a_pass_once_per_cost_interval() -> None:
    """Resyncs that only bring new costs start no pass; the cost timer does."""
    agents = FakeAgents()
    pusher = Pusher(PushPlanner(debounce=0.0), agents)
    settings = dataclasses.replace(SETTINGS, cost_interval=0.05)
    loop = ControlLoop(settings, pusher, FakeWrites())
    loop.attach(lambda: cluster(PROBE, FILTER, pod("web-0", app="web")))
    task = asyncio.create_task(pusher.run())
    try:
        await loop.reconcile_once()  # NodesPending: nothing loaded, no timer
        await asyncio.sleep(0.1)
        loop._dirty.clear()
        await agents.until(pusher.planner.settled)
        await loop.reconcile_once()  # Ready: the timer is armed
        assert not loop._dirty.is_set()
        await asyncio.sleep(0.1)
        assert loop._dirty.is_set()  # the refreshing pass was asked for
        loop.close()
    finally:
        task.cancel()


class SlowWrites(FakeWrites):
    """Patches wait until released: the apiserver is slow."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> bool:
        await self.release.wait()
        return await super().patch_status(ref, status)


async def test_passes_do_not_wait_for_slow_status_writes_nor_repeat_them() -> None:
    agents = FakeAgents()
    writes = SlowWrites()
    pusher = Pusher(PushPlanner(debounce=0.0), agents)
    loop = ControlLoop(SETTINGS, pusher, writes)
    loop.attach(lambda: cluster(PROBE, FILTER, pod("web-0", app="web")))
    task = asyncio.create_task(pusher.run())
    try:
        await loop.reconcile_once(wait_for_writes=False)
        await agents.until(pusher.planner.settled)
        # The first statuses are still on their way; the passes go on, each folding over
        # the status on its way, so Loaded is written (and told) once.
        for _ in range(3):
            await loop.reconcile_once(wait_for_writes=False)
        assert writes.patches == []
        writes.release.set()
        await loop.writes_done()
        probe_patches = [st for key, st in writes.patches if key == "team-a/opens"]
        assert len(probe_patches) <= 2  # the first fold, then Loaded (if it came in time)
        last = TraceProbeStatus.model_validate(probe_patches[-1])
        assert last.condition("Ready").reason == "Loaded"  # type: ignore[union-attr]
        assert [e.reason for _, e in writes.events] == ["ProbeLoaded"]
        await loop.reconcile_once()
        assert [e.reason for _, e in writes.events] == ["ProbeLoaded"]
    finally:
        task.cancel()


async def test_a_node_whose_agent_cannot_save_its_state_is_said_on_the_probe() -> None:
    """A full state directory reaches the probe's status and Events (once per transition),
    and clears with the agent's next report that says it is saved."""
    agents = FakeAgents()
    agents.unsaved = "revision 9 not saved: [Errno 28] No space left on device"
    writes = FakeWrites()
    pusher = Pusher(PushPlanner(debounce=0.0, resync_interval=0.01), agents)
    loop = ControlLoop(SETTINGS, pusher, writes)
    loop.attach(lambda: cluster(PROBE, FILTER, pod("web-0", app="web")))
    task = asyncio.create_task(pusher.run())

    def persisted() -> tuple[str, str, str]:
        status = TraceProbeStatus.model_validate(
            next(st for key, st in reversed(writes.patches) if key == "team-a/opens")
        )
        c = status.condition("Persisted")
        assert c is not None and status.condition("Ready").status == "True"  # type: ignore[union-attr]
        return c.status, c.reason, c.message

    try:
        await loop.reconcile_once()
        await agents.until(lambda: bool(agents.puts) and pusher.planner.settled())
        await loop.reconcile_once()
        status, reason, message = persisted()
        assert (status, reason) == ("False", "StateNotSaved") and f"n1: {agents.unsaved}" in message
        agents.unsaved = None
        seen = len(agents.gets)
        await agents.until(lambda: len(agents.gets) > seen)  # a resync reads the saved state
        await loop.reconcile_once()
        assert persisted()[:2] == ("True", "StateSaved")
        reasons = [e.reason for _, e in writes.events if e.reason.startswith("State")]
        assert reasons == ["StateNotSaved", "StateSaved"]
    finally:
        task.cancel()
