"""Push scheduling: coalescing, backoff on a fake clock, full state after an agent restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import (
    NodeReport,
    NodeState,
    Persistence,
    PodTarget,
    ProbeAssignment,
    ProbeOutcome,
    ProbeTargets,
    spec_hash,
)
from tracekeeper_operator.agent_errors import AgentError, StaleRevision
from tracekeeper_operator.agent_views import holding_nodes
from tracekeeper_operator.metrics import OperatorMetrics
from tracekeeper_operator.node_state import Assignments, RevisionClock
from tracekeeper_operator.push_planner import PushAction, PushPlanner, ResyncAction
from tracekeeper_operator.pusher import Pusher

SPEC = TraceProbeSpec.model_validate({"tracepoint": "syscalls:sys_enter_openat"})


def probes(n_pods: int, probe_id: str = "team-a/opens") -> Assignments:
    pods = [
        PodTarget(uid=f"00000000-0000-4000-8000-{i:012x}", namespace="team-a", name=f"p{i}")
        for i in range(n_pods)
    ]
    return (
        ProbeAssignment(
            id=probe_id, spec_hash=spec_hash(SPEC), spec=SPEC, targets=ProbeTargets(pods=pods)
        ),
    )


def report_for(state: NodeState, boot_id: str = "boot-1") -> NodeReport:
    outcomes = [
        ProbeOutcome(id=p.id, spec_hash=p.spec_hash, state="Loaded", reason="Loaded")
        for p in state.probes
    ]
    return NodeReport(node=state.node, revision=state.revision, boot_id=boot_id, probes=outcomes)


ENDPOINTS = {"n1": "http://n1", "n2": "http://n2"}


def planner(**kw: float) -> PushPlanner:
    wall = iter(range(1000, 10**6))
    settings: dict[str, float] = {
        "debounce": 0.2,
        "max_delay": 1.0,
        "backoff_base": 0.5,
        "backoff_max": 8.0,
        "resync_interval": 30.0,
    }
    settings.update(kw)
    return PushPlanner(revisions=RevisionClock(lambda: next(wall)), **settings)


def pushes(actions: list[PushAction | ResyncAction]) -> list[PushAction]:
    return [a for a in actions if isinstance(a, PushAction)]


def settled_planner(**kw: float) -> PushPlanner:
    """n1 and n2 pushed once at t=0 and acknowledged: quiet from there on."""
    p = planner(**kw)
    p.set_desired({"n1": probes(0), "n2": probes(0)}, ENDPOINTS, now=0)
    for a in pushes(p.due(0)):
        p.pushed(a, report_for(a.state), now=0)
    assert p.settled()
    return p


def test_an_isolated_change_is_pushed_at_once() -> None:
    p = settled_planner()
    p.set_desired({"n1": probes(1), "n2": probes(0)}, ENDPOINTS, now=10.0)
    (a,) = pushes(p.due(10.0))  # no debounce: a new pod's probes reach its agent first
    assert a.node == "n1" and len(a.state.resolved().probes[0].targets.pods) == 1


def test_a_change_right_after_a_push_waits_for_the_quiet_window() -> None:
    p = settled_planner()
    p.set_desired({"n1": probes(1), "n2": probes(0)}, ENDPOINTS, now=0.1)
    assert p.due(0.1) == [] and p.due(0.29) == []
    (a,) = pushes(p.due(0.31))
    assert len(a.state.resolved().probes[0].targets.pods) == 1


def test_a_burst_is_pushed_at_its_start_then_once_after_the_quiet_window() -> None:
    p = settled_planner()
    for i in range(1, 101):  # a pod churn storm within 10 ms, the node quiet before it
        p.set_desired({"n1": probes(i), "n2": probes(i)}, ENDPOINTS, now=10 + i * 0.0001)
        for a in pushes(p.due(10 + i * 0.0001)):  # its first change goes at once
            assert i == 1
            p.pushed(a, report_for(a.state), now=10 + i * 0.0001)
    assert p.due(10.1) == []
    sent = pushes(p.due(10.2101))
    assert [a.node for a in sent] == ["n1", "n2"]
    assert all(
        len(a.state.resolved().probes[0].targets.pods) == 100 for a in sent
    )  # the latest state
    for a in sent:
        p.pushed(a, report_for(a.state), now=10.3)
    assert p.due(10.5) == [] and p.settled()


def test_constant_churn_still_pushes_every_max_delay() -> None:
    p = planner()
    count = 0
    t = 0.0
    for step in range(300):  # a change every 10 ms for 3 s
        t = step * 0.01
        p.set_desired({"n1": probes(step)}, {"n1": "http://n1"}, now=t)
        for a in pushes(p.due(t)):
            count += 1
            p.pushed(a, report_for(a.state), now=t)
    assert count == 3  # at 0 (the node was quiet), 1.01 s and 2.02 s, though never quiet
    (last,) = pushes(p.due(t + 0.2))  # and the final state once it is
    assert len(last.state.resolved().probes[0].targets.pods) == 299


def test_unchanged_rendering_pushes_nothing() -> None:
    p = planner()
    p.set_desired({"n1": probes(1)}, {"n1": "http://n1"}, now=0)
    (a,) = pushes(p.due(1))
    p.pushed(a, report_for(a.state), now=1)
    assert p.set_desired({"n1": probes(1)}, {"n1": "http://n1"}, now=2) == []
    assert pushes(p.due(5)) == []


def test_failures_back_off_exponentially_then_recover() -> None:
    p = planner()
    p.set_desired({"n1": probes(1)}, {"n1": "http://n1"}, now=0)
    t = 0.2
    delays = []
    for _ in range(6):
        (a,) = pushes(p.due(t))
        p.push_failed(a, AgentError("connection refused"), now=t)
        wake = p.next_wakeup()
        assert wake is not None
        assert pushes(p.due(wake - 0.001)) == []
        delays.append(round(wake - t, 3))
        t = wake
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]  # capped at backoff_max
    assert p.views()["n1"].error == "connection refused"
    (a,) = pushes(p.due(t))
    p.pushed(a, report_for(a.state), now=t)
    assert p.views()["n1"].error is None and p.settled()
    assert a.state.revision > 1000  # each attempt carries a fresh revision


def test_a_change_during_a_push_is_sent_after_it() -> None:
    p = planner()
    p.set_desired({"n1": probes(1)}, {"n1": "http://n1"}, now=0)
    (first,) = pushes(p.due(1))
    p.set_desired({"n1": probes(2)}, {"n1": "http://n1"}, now=1.1)
    assert p.due(5) == []  # one push per node at a time
    p.pushed(first, report_for(first.state), now=1.2)
    (second,) = pushes(p.due(1.31))
    assert len(second.state.resolved().probes[0].targets.pods) == 2
    assert second.state.revision > first.state.revision


def test_a_restarted_agent_gets_the_full_state_again() -> None:
    p = planner(resync_interval=5)
    p.set_desired({"n1": probes(3)}, {"n1": "http://n1"}, now=0)
    (a,) = pushes(p.due(1))
    p.pushed(a, report_for(a.state, boot_id="boot-1"), now=1)
    (resync,) = p.due(6)
    assert isinstance(resync, ResyncAction)
    p.resynced(resync, report_for(a.state, boot_id="boot-1"), now=6)
    assert p.settled()  # same agent, same state: nothing to do
    (resync,) = p.due(11)
    assert isinstance(resync, ResyncAction)
    # The agent restarted and resumed its persisted state: same revision, new bootId.
    p.resynced(resync, report_for(a.state, boot_id="boot-2"), now=11)
    (again,) = pushes(p.due(11))
    assert again.state.probes == a.state.probes and again.state.revision > a.state.revision


@pytest.mark.parametrize(
    "drift",
    ["revision", "hash", "missing"],
)
def test_a_report_that_differs_from_what_was_sent_gets_the_state_again(drift: str) -> None:
    p = planner(resync_interval=5)
    p.set_desired({"n1": probes(1)}, {"n1": "http://n1"}, now=0)
    (a,) = pushes(p.due(1))
    p.pushed(a, report_for(a.state), now=1)
    report = report_for(a.state)
    if drift == "revision":
        report = report.model_copy(update={"revision": 1})
    elif drift == "hash":
        report = report.model_copy(
            update={
                "probes": [report.probes[0].model_copy(update={"spec_hash": "ffffffffffffffff"})]
            }
        )
    else:
        report = report.model_copy(update={"probes": []})
    (resync,) = p.due(6)
    assert isinstance(resync, ResyncAction)
    p.resynced(resync, report, now=6)
    assert [x.node for x in pushes(p.due(6))] == ["n1"]


def test_stale_revision_moves_the_clock_past_the_agents() -> None:
    p = planner()
    p.set_desired({"n1": probes(1)}, {"n1": "http://n1"}, now=0)
    (a,) = pushes(p.due(1))
    p.push_failed(a, StaleRevision("409", applied_revision=5_000_000), now=1)
    assert p.views()["n1"].error is None  # the agent is fine, only our clock was behind
    (b,) = pushes(p.due(2))
    assert b.state.revision == 5_000_001


def test_a_new_agent_pod_gets_the_full_state() -> None:
    p = planner()
    p.set_desired({"n1": probes(1)}, {"n1": "http://old"}, now=0)
    (a,) = pushes(p.due(1))
    p.pushed(a, report_for(a.state), now=1)
    assert p.set_desired({"n1": probes(1)}, {"n1": "http://new"}, now=2) == ["n1"]
    (b,) = pushes(p.due(3))
    assert b.endpoint == "http://new" and b.state.probes == a.state.probes


def test_nodes_without_agents_are_never_pushed() -> None:
    p = planner()
    p.set_desired({"n1": probes(1)}, {}, now=0)
    assert p.due(10) == [] and p.next_wakeup() is None
    assert p.views()["n1"].endpoint is None


def test_holding_nodes_until_every_agent_that_loaded_it_confirms() -> None:
    p = planner()
    p.set_desired({"n1": probes(1), "n2": ()}, ENDPOINTS, now=0)
    # Not heard from yet: either may run it (a predecessor's push), both are waited for.
    assert holding_nodes("team-a/opens", p.views()) == ["n1", "n2"]
    acts = pushes(p.due(1))
    assert holding_nodes("team-a/opens", p.views()) == ["n1", "n2"]
    for a in acts:
        p.pushed(a, report_for(a.state), now=1)
    assert holding_nodes("team-a/opens", p.views()) == ["n1"]
    p.set_desired({"n1": (), "n2": ()}, ENDPOINTS, now=2)
    assert holding_nodes("team-a/opens", p.views()) == ["n1"]  # desired gone, not confirmed
    (a,) = pushes(p.due(3))
    p.pushed(a, report_for(a.state), now=3)
    assert holding_nodes("team-a/opens", p.views()) == []


def test_a_node_whose_agent_never_answered_holds_no_finalizer() -> None:
    """Only nodes that reported the probe (or were not heard from yet) are waited for; one
    whose contact failed before any answer is not."""
    p = planner()
    p.set_desired({"n1": probes(1), "n2": probes(1)}, ENDPOINTS, now=0)
    for a in pushes(p.due(1)):
        if a.node == "n1":
            p.pushed(a, report_for(a.state), now=1)
        else:
            p.push_failed(a, AgentError("agent unreachable (ClientConnectorError)"), now=1)
    p.set_desired({"n1": (), "n2": ()}, ENDPOINTS, now=2)  # the probe is being deleted
    assert holding_nodes("team-a/opens", p.views()) == ["n1"]
    (a,) = [a for a in pushes(p.due(3)) if a.node == "n1"]
    p.pushed(a, report_for(a.state), now=3)
    assert holding_nodes("team-a/opens", p.views()) == []


def test_a_restarted_operator_waits_for_the_first_answer_of_each_agent() -> None:
    """Issue 18's chaos: an operator SIGKILLed and started again released a deleted probe's
    finalizer at once, while the agent still ran it from the predecessor's push."""
    p = planner()
    p.set_desired({"n1": ()}, {"n1": ENDPOINTS["n1"]}, now=0)  # the probe is being deleted
    assert holding_nodes("team-a/opens", p.views()) == ["n1"]
    (a,) = pushes(p.due(1))
    p.pushed(a, report_for(a.state), now=1)  # the state without it: unloaded
    assert holding_nodes("team-a/opens", p.views()) == []


class FakeAgents:
    """An AgentClient that answers like an agent, optionally failing first."""

    def __init__(self, failures: int = 0) -> None:
        self.puts: list[tuple[str, NodeState]] = []
        self.gets: list[str] = []
        self.failures = failures
        self.boot_id = "boot-1"
        self.unsaved: str | None = None
        """The agents' persisted.error (a full state directory)."""
        self.held: dict[str, NodeState] = {}
        self.answered = asyncio.Event()
        """Set after every call: waiters re-check what they wait for."""

    async def put_state(self, endpoint: str, state: NodeState) -> NodeReport:
        await asyncio.sleep(0.001)
        self.answered.set()
        if self.failures:
            self.failures -= 1
            raise AgentError("connection refused")
        self.puts.append((endpoint, state))
        self.held[endpoint] = state
        return self._report(state)

    async def get_state(self, endpoint: str) -> NodeReport:
        self.gets.append(endpoint)
        self.answered.set()
        return self._report(self.held[endpoint])

    def _report(self, state: NodeState) -> NodeReport:
        report = report_for(state, self.boot_id)
        persisted = Persistence(revision=state.revision, error=self.unsaved)
        return report.model_copy(update={"persisted": persisted})

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait (5 s at most) until `predicate` holds, re-checked after each agent call."""
        async with asyncio.timeout(5):
            while not predicate():
                self.answered.clear()
                await self.answered.wait()


async def test_pusher_coalesces_100_triggers_into_two_pushes_per_node() -> None:
    agents = FakeAgents()
    metrics = OperatorMetrics()
    changes = []
    pusher = Pusher(
        planner(debounce=0.05), agents, metrics=metrics, on_change=lambda: changes.append(1)
    )
    task = asyncio.create_task(pusher.run())
    try:
        for i in range(100):
            pusher.update({"n1": probes(i), "n2": probes(i)}, ENDPOINTS)
            await asyncio.sleep(0)
        await agents.until(pusher.planner.settled)
        # Each node's first change at once (it was quiet), then the rest of the storm.
        assert sorted(e for e, _ in agents.puts) == ["http://n1"] * 2 + ["http://n2"] * 2
        last = {e: s for e, s in agents.puts}
        assert all(len(s.resolved().probes[0].targets.pods) == 99 for s in last.values())
        assert len(changes) == 4
        assert metrics.pushes.labels("ok")._value.get() == 4
    finally:
        task.cancel()


async def test_pusher_retries_until_the_agent_answers() -> None:
    agents = FakeAgents(failures=3)
    p = planner(debounce=0.0, backoff_base=0.01, backoff_max=0.02)
    pusher = Pusher(p, agents)
    task = asyncio.create_task(pusher.run())
    try:
        pusher.update({"n1": probes(1)}, {"n1": "http://n1"})
        await agents.until(pusher.planner.settled)
        assert len(agents.puts) == 1 and agents.failures == 0
    finally:
        task.cancel()


async def test_pusher_resyncs_and_repushes_after_a_restart() -> None:
    agents = FakeAgents()
    changes: list[int] = []
    pusher = Pusher(
        planner(debounce=0.0, resync_interval=0.02), agents, on_change=lambda: changes.append(1)
    )
    task = asyncio.create_task(pusher.run())
    try:
        pusher.update({"n1": probes(2)}, {"n1": "http://n1"})
        await agents.until(pusher.planner.settled)
        await agents.until(lambda: len(agents.gets) >= 3)
        assert len(agents.puts) == 1
        assert len(changes) == 1  # resyncs that find nothing new cost no render
        agents.boot_id = "boot-2"
        await agents.until(lambda: len(agents.puts) >= 2)
        first, second = agents.puts[0][1], agents.puts[1][1]
        assert second.probes == first.probes and second.revision > first.revision
    finally:
        task.cancel()


async def test_a_resync_that_finds_the_state_saved_again_costs_a_render() -> None:
    """The probes' Persisted condition follows the agent's report: a resync whose report
    differs only in persisted.error must start a pass (one, not one per resync)."""
    agents = FakeAgents()
    agents.unsaved = "revision 2 not saved: [Errno 28] No space left on device"
    changes: list[int] = []
    pusher = Pusher(
        planner(debounce=0.0, resync_interval=0.02), agents, on_change=lambda: changes.append(1)
    )
    task = asyncio.create_task(pusher.run())
    try:
        pusher.update({"n1": probes(2)}, {"n1": "http://n1"})
        await agents.until(pusher.planner.settled)
        await agents.until(lambda: len(agents.gets) >= 2)
        assert len(changes) == 1  # the push's answer; resyncs that find it still unsaved: none
        agents.unsaved = None
        seen = len(agents.gets)
        await agents.until(lambda: len(agents.gets) >= seen + 2)
        assert len(changes) == 2 and len(agents.puts) == 1
    finally:
        task.cancel()
