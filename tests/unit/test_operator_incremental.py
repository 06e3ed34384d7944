"""The incremental operator computes what the from-scratch one does, whatever the events.

Random event sequences (pods, probes, filters, namespaces, nodes, agents, kernels changing
in any order) are applied to a model of kopf's indexes. After every event the view built
pass after pass (`ViewBuilder`) must equal one built from nothing, the plan kept from pass
to pass (`PlanMemo`) the plan made from scratch (`plan_cluster`), and a control loop that
skips unchanged statuses must leave every status as a new control loop would fold it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracekeeper_api.budgets import BUDGET_ANNOTATION
from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import (
    KernelInfo,
    NodeReport,
    NodeState,
    Persistence,
    ProbeOutcome,
)
from tracekeeper_api.status import TraceFilterStatus, TraceProbeStatus
from tracekeeper_operator.agent_errors import AgentError
from tracekeeper_operator.cluster_plan import plan_cluster
from tracekeeper_operator.cluster_view import ClusterView, ViewBuilder
from tracekeeper_operator.control_loop import ControlLoop
from tracekeeper_operator.kube_events import EventSpec
from tracekeeper_operator.node_state import RevisionClock
from tracekeeper_operator.plan_memo import PlanMemo
from tracekeeper_operator.push_planner import PushPlanner, ResyncAction
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
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
NAMESPACES = ("tk", "team-a", "team-b")
NODES = ("n1", "n2", "n3")
APPS = ("web", "db")
KERNELS = (
    KernelInfo(release="6.1", headers=True, tracepoints=True, ring_buffer=True),
    KernelInfo(release="6.1", headers=False),
    KernelInfo(release="6.1", headers=True, tracepoints=True, ring_buffer=False),
)
OPS = (
    "pod+",
    "pod+",
    "pod+",
    "pod-",
    "pod~",
    "pod-done",
    "probe+",
    "probe-",
    "probe~",
    "filter+",
    "filter-",
    "namespace~",
    "node~",
    "agent~",
    "kernel~",
)


@dataclass
class World:
    """kopf's indexes as records by key, changed by events."""

    pods: dict[str, PodRecord] = field(default_factory=dict)
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    nodes: dict[str, LabelledRecord] = field(default_factory=dict)
    namespaces: dict[str, LabelledRecord] = field(default_factory=dict)
    probes: dict[str, ProbeRecord] = field(default_factory=dict)
    filters: dict[str, FilterRecord] = field(default_factory=dict)
    kernels: dict[str, KernelInfo] = field(default_factory=dict)
    serial: int = 0

    def __post_init__(self) -> None:
        for node in NODES:
            self.nodes[node] = LabelledRecord(node, {"zone": "a"})
            self.agents[node] = AgentRecord(node, f"tk/agent-{node}", f"http://{node}", True)
        for ns in NAMESPACES:
            self.namespaces[ns] = LabelledRecord(ns, {"team": ns})

    def pod_index(self) -> dict[str, list[PodRecord]]:
        by_ns: dict[str, list[PodRecord]] = {}
        for pod in self.pods.values():
            by_ns.setdefault(pod.namespace, []).append(pod)
        return by_ns

    def fresh(self) -> ClusterView:
        return ClusterView.build(
            pods=list(self.pods.values()),
            agents=list(self.agents.values()),
            nodes=list(self.nodes.values()),
            namespaces=list(self.namespaces.values()),
            probes=list(self.probes.values()),
            filters=list(self.filters.values()),
        )

    def built(self, builder: ViewBuilder) -> ClusterView:
        return builder.build(
            pods=self.pod_index(),
            agents=list(self.agents.values()),
            nodes=list(self.nodes.values()),
            namespaces=list(self.namespaces.values()),
            probes=list(self.probes.values()),
            filters=list(self.filters.values()),
        )

    def apply(self, op: str, rng: random.Random) -> None:
        self.serial += 1
        n = self.serial
        ns = rng.choice(NAMESPACES)
        if op == "pod+":
            name = f"pod-{n}"
            self.pods[f"{ns}/{name}"] = PodRecord(
                ns,
                name,
                f"00000000-0000-4000-8000-{n:012d}",
                rng.choice(NODES),
                {"app": rng.choice(APPS)},
                "Running",
                (ContainerRecord("app", f"containerd://{n:064x}"), ContainerRecord("side")),
            )
        elif op in ("pod-", "pod~", "pod-done") and self.pods:
            key = rng.choice(sorted(self.pods))
            if op == "pod-":
                del self.pods[key]
            elif op == "pod~":
                self.pods[key] = replace(self.pods[key], labels={"app": rng.choice(APPS)})
            else:
                self.pods[key] = replace(self.pods[key], phase="Succeeded")
        elif op in ("probe+", "probe~"):
            ns = rng.choice(("tk", *NAMESPACES))
            keys = [k for k in self.probes if op == "probe~"]
            key = rng.choice(sorted(keys)) if keys else f"{ns}/probe-{n}"
            ns, name = key.split("/")
            edited = self.probe(ns, name, n, rng)
            if key in self.probes:  # an edit: the apiserver keeps the stored status
                edited = replace(edited, status=self.probes[key].status)
            self.probes[key] = edited
        elif op == "probe-" and self.probes:
            del self.probes[rng.choice(sorted(self.probes))]
        elif op == "filter+":
            ns = rng.choice(("tk", *NAMESPACES))
            name = rng.choice(("f1", "f2"))
            raw: dict[str, Any] = {"podSelector": {"matchLabels": {"app": rng.choice(APPS)}}}
            if ns == "tk" and rng.random() < 0.5:
                raw["namespaceSelector"] = {"matchLabels": {"team": rng.choice(NAMESPACES)}}
            if rng.random() < 0.4:
                raw["pids"] = [1]  # host targets: every agent's node (refused outside tk)
            spec = TraceFilterSpec.model_validate(raw)
            key = f"{ns}/{name}"
            known = self.filters.get(key)
            self.filters[key] = FilterRecord(
                ObjectRef("TraceFilter", ns, name, f"uid-f-{ns}-{name}"),
                n,
                spec,
                status=known.status if known is not None else None,  # an edit keeps it
            )
        elif op == "filter-" and self.filters:
            del self.filters[rng.choice(sorted(self.filters))]
        elif op == "namespace~":
            budget = rng.choice(
                [
                    None,
                    {"probesPerNode": 1},
                    {"probesPerNode": 2, "eventsPerSecond": 1500, "defaultRateLimit": 700},
                    {"defaultRateLimit": 5, "maxDuration": "5m"},
                    "bad",
                ]
            )
            notes = {}
            if budget is not None:
                notes[BUDGET_ANNOTATION] = budget if budget == "bad" else json.dumps(budget)
            labels = {"team": rng.choice(NAMESPACES)}
            self.namespaces[ns] = LabelledRecord(ns, labels, notes)
        elif op == "node~":
            node = rng.choice(NODES)
            self.nodes[node] = LabelledRecord(node, {"zone": rng.choice(("a", "b"))})
        elif op == "agent~":
            node = rng.choice(NODES)
            if node in self.agents and rng.random() < 0.5:
                del self.agents[node]
            else:
                endpoint = f"http://{node}:{rng.choice((9000, 9001))}"
                self.agents[node] = AgentRecord(node, f"tk/agent-{node}", endpoint, True)
        elif op == "kernel~":
            node = rng.choice(NODES)
            if rng.random() < 0.3:
                self.kernels.pop(node, None)
            else:  # a new report's object, maybe with the same facts
                self.kernels[node] = rng.choice(KERNELS).model_copy()

    @staticmethod
    def probe(ns: str, name: str, n: int, rng: random.Random) -> ProbeRecord:
        raw: dict[str, Any] = {
            # sched_switch: privileged, refused outside tk
            "tracepoint": rng.choice(
                ("syscalls:sys_enter_openat", "syscalls:sys_enter_read", "sched:sched_switch")
            ),
            "output": {"kind": rng.choice(("count", "events"))},
        }
        which = rng.random()
        if which < 0.4:
            raw["filterRef"] = rng.choice(("f1", "f2", "missing"))
        elif which < 0.8:
            raw["filter"] = {
                "podSelector": {"matchLabels": {"app": rng.choice(APPS)}},
                "containers": rng.choice([[], ["app"], ["nope"]]),
            }
        if rng.random() < 0.2:
            raw["nodeSelector"] = {"zone": "a"}
        if rng.random() < 0.15:
            raw["suspend"] = True
        if rng.random() < 0.15:
            raw["duration"] = "10m"
        return ProbeRecord(
            ObjectRef("TraceProbe", ns, name, f"uid-p-{ns}-{name}"),
            n,
            TraceProbeSpec.model_validate(raw),
            created=f"2026-12-02T00:00:{rng.randrange(60):02d}Z",
        )


START = [
    *(("pod+", i) for i in range(12)),
    *(("filter+", i) for i in range(4)),
    *(("probe+", i) for i in range(8)),
]
"""A cluster to begin from: pods, filters and probes in every namespace."""
events = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2**32)), min_size=10, max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_the_kept_plan_equals_the_plan_from_scratch_after_any_events(
    sequence: list[tuple[str, int]],
) -> None:
    world = World()
    builder = ViewBuilder()
    memo = PlanMemo(SETTINGS)
    for op, seed in [*START, *sequence]:
        world.apply(op, random.Random(seed))
        fresh = world.fresh()
        built = world.built(builder)
        assert built == fresh
        kernels = dict(world.kernels)
        assert memo.plan(built, None, NOW, kernels) == plan_cluster(
            fresh, SETTINGS, None, NOW, kernels
        )


def test_a_pod_event_recomputes_only_its_namespaces_probes_and_nodes() -> None:
    world = World()
    rng = random.Random(7)
    for _ in range(30):
        world.apply("pod+", rng)
    for ns in ("team-a", "team-b"):
        for i in range(4):
            world.probes[f"{ns}/p{i}"] = ProbeRecord(
                ObjectRef("TraceProbe", ns, f"p{i}", f"uid-{ns}-{i}"),
                1,
                TraceProbeSpec.model_validate(
                    {"tracepoint": "syscalls:sys_enter_read", "filter": {"podSelector": {}}}
                ),
            )
    builder, memo = ViewBuilder(), PlanMemo(SETTINGS)
    memo.plan(world.built(builder), None, NOW)
    memo.plan(world.built(builder), None, NOW)
    assert (memo.counts.selected, memo.counts.rendered, memo.counts.allocated) == (0, 0, 0)
    world.pods["team-a/new"] = PodRecord(
        "team-a", "new", "00000000-0000-4000-8000-999999999999", "n2", {}, "Running"
    )
    memo.plan(world.built(builder), None, NOW)
    # The four team-a probes, on the one node the new pod is on; team-b's are left alone.
    assert (memo.counts.selected, memo.counts.rendered, memo.counts.allocated) == (4, 4, 1)


class AnsweringAgents:
    async def put_state(self, endpoint: str, state: NodeState) -> NodeReport:
        raise AgentError("not used: pushes are answered by the test")

    async def get_state(self, endpoint: str) -> NodeReport:
        raise AgentError("not used")


class Writes:
    """Status patches that take a moment and fail when told to (as an apiserver may)."""

    def __init__(self) -> None:
        self.written: list[tuple[ObjectRef, dict[str, Any]]] = []
        self.failing = False

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> bool:
        await asyncio.sleep(0)
        if self.failing:
            raise RuntimeError("apiserver unavailable")
        self.written.append((ref, status))
        return True

    async def post_event(self, ref: ObjectRef, event: EventSpec) -> None:
        return None


def resync(planner: PushPlanner, action: ResyncAction, rng: random.Random) -> None:
    """What the agent holds, in a new report: as it was, or with some probe failed since
    (nothing else moves: only the agent's view of the probes on the node), or unreachable."""
    report = planner.views()[action.node].report
    if report is None or rng.random() < 0.1:
        planner.resync_failed(action, AgentError("connection refused"), 0.0)
        return
    if rng.random() < 0.3:
        probes = [
            p.model_copy(update={"state": "Failed", "reason": "AttachFailed", "message": "gone"})
            if rng.random() < 0.5
            else p
            for p in report.probes
        ]
        report = report.model_copy(update={"probes": probes})
    planner.resynced(action, report.model_copy(), 0.0)


def answer(planner: PushPlanner, rng: random.Random) -> None:
    """Due pushes answered: Loaded, failed, or with a stale report; saved or not. Due
    resyncs answered too (`resync`)."""
    for action in planner.due(1e9):
        if isinstance(action, ResyncAction):
            resync(planner, action, rng)
            continue
        state = rng.choice(("Loaded", "Loaded", "Failed"))
        unsaved = rng.choice((None, None, f"revision {action.state.revision} not saved: full"))
        report = NodeReport(
            node=action.node,
            revision=action.state.revision,
            boot_id="b",
            persisted=Persistence(revision=1, error=unsaved),
            probes=[
                ProbeOutcome(
                    id=p.id,
                    spec_hash=p.spec_hash,
                    state=state,
                    reason="Loaded" if state == "Loaded" else "AttachFailed",
                    message="" if state == "Loaded" else "E2BIG",
                )
                for p in action.state.probes
            ],
        )
        planner.pushed(action, report, 0.0)


def echo(world: World, writes: Writes) -> None:
    """The watch brings written statuses back into the records."""
    for ref, status in writes.written:
        if ref.kind == "TraceProbe" and ref.key in world.probes:
            record = world.probes[ref.key]
            world.probes[ref.key] = replace(record, status=TraceProbeStatus.model_validate(status))
        elif ref.kind == "TraceFilter" and ref.key in world.filters:
            filt = world.filters[ref.key]
            world.filters[ref.key] = replace(filt, status=TraceFilterStatus.model_validate(status))
    writes.written.clear()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.lists(st.booleans(), min_size=60, max_size=60))
def test_a_loop_that_skips_unchanged_statuses_leaves_them_as_a_new_loop_folds_them(
    sequence: list[tuple[str, int]], echoes: list[bool]
) -> None:
    async def run() -> None:
        world = World()
        planner = PushPlanner(debounce=0.0, max_delay=0.0)
        pusher = Pusher(planner, AnsweringAgents(), clock=lambda: 0.0)
        writes = Writes()
        builder = ViewBuilder()
        kept = ControlLoop(SETTINGS, pusher, writes, now=lambda: NOW)
        kept.attach(lambda: world.built(builder))
        for i, (op, seed) in enumerate([*START, *sequence]):
            rng = random.Random(seed)
            world.apply(op, rng)
            writes.failing = rng.random() < 0.1
            # As the loop runs: the next pass may start before the last one's writes are made.
            await kept.reconcile_once(wait_for_writes=rng.random() < 0.5)
            answer(planner, rng)
            await kept.reconcile_once(wait_for_writes=False)
            if echoes[i % len(echoes)]:  # the watch may lag behind the writes
                await asyncio.sleep(0)
                echo(world, writes)
        writes.failing = False
        for _ in range(3):
            await kept.reconcile_once()
            echo(world, writes)
        await kept.reconcile_once()
        assert writes.written == []  # settled
        # A new loop, nothing remembered, over the same agents: nothing left to write.
        checking = Writes()
        fresh = ControlLoop(SETTINGS, pusher, checking, now=lambda: NOW)
        fresh.attach(world.fresh)
        await fresh.reconcile_once()
        assert checking.written == []
        assert fresh.probe_readiness() == kept.probe_readiness()

    asyncio.run(run())


class RecordingWrites(Writes):
    """`Writes` that also keeps the Events posted."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    async def post_event(self, ref: ObjectRef, event: EventSpec) -> None:
        self.events.append((ref.key, event.reason))


def _made(writes: RecordingWrites) -> list[tuple[str, str, str]]:
    return sorted((r.kind, r.key, json.dumps(s, sort_keys=True)) for r, s in writes.written)


@dataclass
class _Side:
    world: World
    planner: PushPlanner
    writes: RecordingWrites
    loop: ControlLoop


class SideBySide:
    """Two loops over two copies of the same cluster and agents: one given views built pass
    after pass (it folds only what the changes may concern), one given views built from
    nothing (every part new: it looks at every probe and filter)."""

    def __init__(self) -> None:
        self.sides: list[_Side] = []
        for fresh in (False, True):
            world = World()
            planner = PushPlanner(
                revisions=RevisionClock(wall_ms=lambda: 0), debounce=0.0, max_delay=0.0
            )
            writes = RecordingWrites()
            builder = ViewBuilder()
            loop = ControlLoop(
                SETTINGS, Pusher(planner, AnsweringAgents()), writes, now=lambda: NOW
            )
            loop.attach(world.fresh if fresh else functools.partial(world.built, builder))
            self.sides.append(_Side(world, planner, writes, loop))

    def same(self) -> None:
        """Both have written the same statuses and posted the same Events."""
        a, b = self.sides
        assert _made(a.writes) == _made(b.writes)
        assert sorted(a.writes.events) == sorted(b.writes.events)
        assert a.loop.probe_readiness() == b.loop.probe_readiness()

    async def step(
        self, change: Callable[[World, random.Random], None], seed: int, echo_: bool
    ) -> None:
        """`change` made to both clusters, a pass, the agents' answers, a pass; the writes
        compared after each pass, then seen by the watch (`echo_`) or not."""
        for side in self.sides:
            rng = random.Random(seed)
            change(side.world, rng)
            side.writes.failing = rng.random() < 0.1
            await side.loop.reconcile_once()
        self.same()
        for side in self.sides:
            answer(side.planner, random.Random(seed + 1))
            await side.loop.reconcile_once()
        self.same()
        for side in self.sides:
            if echo_:
                echo(side.world, side.writes)
            side.writes.written.clear()


def _op(op: str) -> Callable[[World, random.Random], None]:
    def change(world: World, rng: random.Random) -> None:
        world.apply(op, rng)

    return change


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.lists(st.booleans(), min_size=60, max_size=60))
def test_a_loop_that_looks_only_at_what_changed_writes_what_a_loop_looking_at_all_writes(
    sequence: list[tuple[str, int]], echoes: list[bool]
) -> None:
    """After every pass the two loops of `SideBySide` have written the same statuses and
    posted the same Events."""

    async def run() -> None:
        pair = SideBySide()
        for i, (op, seed) in enumerate([*START, *sequence]):
            await pair.step(_op(op), seed, echoes[i % len(echoes)])

    asyncio.run(run())


def ready_reason(world: World, key: str) -> str | None:
    status = world.probes[key].status
    ready = status.condition("Ready") if status is not None else None
    return ready.reason if ready is not None else None


def test_a_probe_let_in_by_another_leaving_its_node_is_folded_again() -> None:
    """Only the node's allocation moved for the newer probe (its own inputs did not): the
    loop that looks at what changed still folds it, from QuotaExceeded to Loaded."""

    def budget(world: World, _: random.Random) -> None:
        world.namespaces["team-a"] = LabelledRecord(
            "team-a", {"team": "team-a"}, {BUDGET_ANNOTATION: json.dumps({"probesPerNode": 1})}
        )
        world.pods["team-a/web"] = PodRecord(
            "team-a", "web", "00000000-0000-4000-8000-000000000001", "n1", {"app": "web"}, "Running"
        )
        for name, created in (("old", "00:00:01"), ("new", "00:00:02")):
            world.probes[f"team-a/{name}"] = ProbeRecord(
                ObjectRef("TraceProbe", "team-a", name, f"uid-{name}"),
                1,
                TraceProbeSpec.model_validate(
                    {"tracepoint": "syscalls:sys_enter_read", "filter": {"podSelector": {}}}
                ),
                created=f"2026-12-02T{created}Z",
            )

    def delete_old(world: World, _: random.Random) -> None:
        del world.probes["team-a/old"]

    async def run() -> None:
        pair = SideBySide()
        await pair.step(budget, 1, True)
        await pair.step(lambda w, rng: None, 2, True)
        assert ready_reason(pair.sides[0].world, "team-a/new") == "QuotaExceeded"
        await pair.step(delete_old, 3, True)
        await pair.step(lambda w, rng: None, 4, True)
        assert ready_reason(pair.sides[0].world, "team-a/new") == "Loaded"

    asyncio.run(run())
