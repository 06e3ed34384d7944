"""The operator's work per watch event at 5,000 pods x 500 probes (issue 18's churn goal).

In-process, no apiserver and no agents: kopf-like indexes hold the records, the control
loop runs its real pass (`snapshot` of the indexes, then `ControlLoop.reconcile_once`)
with a push planner whose agents answer at once (each push acknowledged with every probe
Loaded, as an agent would report it) and status writes that succeed and come back through
the "watch" (the probe's record updated in the index). After a steady state, pods are
created and deleted one at a time in random namespaces; each event's pass is timed, and so
is the agent-report pass and the status-echo pass it leads to. Beside them: one full pass
from scratch (a new control loop, nothing remembered). Then the lag: a steady stream of pod
events into the loop as it runs (`ControlLoop.run`, its debounce), each event's time to
the end of the pass that took it in, the stream's first half beside its second.

    .venv/bin/python -m bench.operator_events [--pods 5000 --probes 500 --namespaces 100
        --nodes 100 --events 200 --lag-events 1000 --rate 100 --profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from bench.common import Table, met, percentile, profile_table
from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import NodeReport, NodeState, ProbeOutcome
from tracekeeper_api.status import TraceFilterStatus, TraceProbeStatus
from tracekeeper_operator.agent_errors import AgentError
from tracekeeper_operator.control_loop import ControlLoop
from tracekeeper_operator.indexes import (
    AGENTS,
    FILTERS,
    NAMESPACES,
    NODES,
    PODS,
    PROBES,
    Snapshots,
)
from tracekeeper_operator.kube_events import EventSpec
from tracekeeper_operator.push_planner import PushAction, PushPlanner
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

GOAL_MS = 10.0
APPS = 5
"""Pods of a namespace are spread over this many app labels; each probe selects one."""
TRACEPOINTS = ("syscalls:sys_enter_openat", "syscalls:sys_enter_read", "sched:sched_switch")


class Store:
    """kopf's index store: the values objects contributed under one key, iterable."""

    def __init__(self) -> None:
        self.items: dict[str, Any] = {}

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items.values())


@dataclass
class Indexes:
    """The six kopf indexes as `indexes.snapshot` reads them: key -> Store."""

    by_id: dict[str, dict[str, Store]] = field(
        default_factory=lambda: {i: {} for i in (PODS, AGENTS, NODES, NAMESPACES, PROBES, FILTERS)}
    )

    def put(self, index: str, key: str, obj: str, value: Any) -> None:
        self.by_id[index].setdefault(key, Store()).items[obj] = value

    def drop(self, index: str, key: str, obj: str) -> None:
        store = self.by_id[index].get(key)
        if store is not None:
            store.items.pop(obj, None)
            if not store.items:
                del self.by_id[index][key]


class InstantAgents:
    """The pusher's client is never called: pushes are answered by `answer` below."""

    async def put_state(self, endpoint: str, state: NodeState) -> NodeReport:
        raise AgentError("not used")

    async def get_state(self, endpoint: str) -> NodeReport:
        raise AgentError("not used")


class EchoWrites:
    """Status patches succeed; the written statuses are kept to be echoed by the watch."""

    def __init__(self) -> None:
        self.pending: list[tuple[ObjectRef, dict[str, Any]]] = []
        self.patches = 0

    async def patch_status(self, ref: ObjectRef, status: dict[str, Any]) -> bool:
        self.pending.append((ref, status))
        self.patches += 1
        return True

    async def post_event(self, ref: ObjectRef, event: EventSpec) -> None:
        return None


def report_for(state: NodeState) -> NodeReport:
    return NodeReport(
        node=state.node,
        revision=state.revision,
        boot_id="boot",
        probes=[
            ProbeOutcome(id=p.id, spec_hash=p.spec_hash, state="Loaded", reason="Loaded")
            for p in state.probes
        ],
    )


@dataclass
class World:
    pods: int
    probes: int
    namespaces: int
    nodes: int
    seed: int = 1
    indexes: Indexes = field(default_factory=Indexes)
    serial: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        for n in range(self.nodes):
            node = f"node-{n:03d}"
            self.indexes.put(NODES, node, node, LabelledRecord(node, {"zone": f"z{n % 3}"}))
            agent = AgentRecord(node, f"tk/agent-{n}", f"http://10.0.{n // 250}.{n % 250}:9000")
            self.indexes.put(AGENTS, node, f"tk/agent-{n}", replace(agent, ready=True))
        for i in range(self.namespaces):
            ns = self.ns(i)
            self.indexes.put(NAMESPACES, ns, ns, LabelledRecord(ns, {"team": ns}))
        for _ in range(self.pods):
            self.add_pod(self.rng.randrange(self.namespaces))
        for p in range(self.probes):
            self.add_probe(p)

    @staticmethod
    def ns(i: int) -> str:
        return f"team-{i:03d}"

    def add_pod(self, ns_index: int) -> PodRecord:
        self.serial += 1
        ns = self.ns(ns_index)
        pod = PodRecord(
            ns,
            f"pod-{self.serial:06d}",
            f"00000000-0000-4000-8000-{self.serial:012d}",
            f"node-{self.rng.randrange(self.nodes):03d}",
            {"app": f"app-{self.rng.randrange(APPS)}"},
            "Running",
            (ContainerRecord("main", f"containerd://{self.serial:064x}"),),
        )
        self.indexes.put(PODS, ns, f"{ns}/{pod.name}", pod)
        return pod

    def delete_pod(self, pod: PodRecord) -> None:
        self.indexes.drop(PODS, pod.namespace, f"{pod.namespace}/{pod.name}")

    def pod_event(self, i: int, live: list[PodRecord]) -> str:
        """The `i`th of a run of pod events: creates and deletes alternating, in random
        namespaces (`live`: the pods the run created and has not deleted yet)."""
        if i % 2 == 0 or not live:
            live.append(self.add_pod(self.rng.randrange(self.namespaces)))
            return "pod created"
        self.delete_pod(live.pop(self.rng.randrange(len(live))))
        return "pod deleted"

    def add_probe(self, p: int) -> None:
        ns = self.ns(p % self.namespaces)
        selector = {"podSelector": {"matchLabels": {"app": f"app-{p // self.namespaces % APPS}"}}}
        raw: dict[str, Any] = {"tracepoint": TRACEPOINTS[p % len(TRACEPOINTS)]}
        if p % 2:  # half by a TraceFilter, half inline
            name = f"filter-{p:04d}"
            filt = FilterRecord(
                ObjectRef("TraceFilter", ns, name, f"uid-f-{p}"),
                1,
                TraceFilterSpec.model_validate(selector),
            )
            self.indexes.put(FILTERS, filt.ref.key, filt.ref.key, filt)
            raw["filterRef"] = name
        else:
            raw["filter"] = selector
        probe = ProbeRecord(
            ObjectRef("TraceProbe", ns, f"probe-{p:04d}", f"uid-p-{p}"),
            1,
            TraceProbeSpec.model_validate(raw),
            created=f"2026-12-02T00:{p // 60 % 60:02d}:{p % 60:02d}Z",
        )
        self.indexes.put(PROBES, probe.id, probe.id, probe)

    def echo(self, writes: EchoWrites) -> int:
        """The watch brings the written statuses back into the records."""
        echoed = 0
        for ref, status in writes.pending:
            if ref.kind == "TraceProbe":
                store = self.indexes.by_id[PROBES][ref.key]
                old = store.items[ref.key]
                new_p = replace(old, status=TraceProbeStatus.model_validate(status))
                store.items[ref.key] = new_p
            else:
                store = self.indexes.by_id[FILTERS][ref.key]
                old_f = store.items[ref.key]
                store.items[ref.key] = replace(
                    old_f, status=TraceFilterStatus.model_validate(status)
                )
            echoed += 1
        writes.pending.clear()
        return echoed


def answer(planner: PushPlanner) -> int:
    """Every due push acknowledged at once, every probe Loaded."""
    actions = [a for a in planner.due(time.monotonic()) if isinstance(a, PushAction)]
    for action in actions:
        planner.pushed(action, report_for(action.state), time.monotonic())
    return len(actions)


def control_loop(settings: OperatorSettings, world: World) -> tuple[ControlLoop, EchoWrites]:
    planner = PushPlanner(debounce=0.0, max_delay=0.0)
    writes = EchoWrites()
    loop = ControlLoop(settings, Pusher(planner, InstantAgents()), writes)
    snapshots = Snapshots()
    loop.attach(lambda: snapshots.take(world.indexes.by_id))
    return loop, writes


async def timed_pass(loop: ControlLoop, profile: cProfile.Profile | None = None) -> float:
    """The pass's CPU time (the process's: nothing else runs in it meanwhile), which other
    work on the shared machine changes less than the wall clock."""
    started = time.process_time()
    if profile is not None:
        profile.enable()
    await loop.reconcile_once()
    if profile is not None:
        profile.disable()
    return time.process_time() - started


async def settle(loop: ControlLoop, writes: EchoWrites, world: World) -> int:
    """Passes until nothing is pushed nor written: the steady state before events."""
    for rounds in range(1, 20):
        await loop.reconcile_once()
        pushed = answer(loop.pusher.planner)
        if not pushed and not writes.pending:
            return rounds
        world.echo(writes)
    raise RuntimeError("no steady state after 20 passes")


async def run(args: argparse.Namespace) -> None:
    settings = OperatorSettings(namespace="tk", render_debounce=0.0)
    started = time.perf_counter()
    world = World(args.pods, args.probes, args.namespaces, args.nodes, seed=args.seed)
    built = time.perf_counter() - started
    loop, writes = control_loop(settings, world)
    await settle(loop, writes, world)

    full = []
    for _ in range(3):
        fresh, _ = control_loop(settings, world)
        full.append(await timed_pass(fresh))

    kinds: dict[str, list[float]] = {
        "pod created": [],
        "pod deleted": [],
        "agent report (push answered)": [],
        "status written, seen by the watch": [],
    }
    live: list[PodRecord] = []
    patches = writes.patches
    await pod_events(loop, writes, world, live, args.events, kinds)
    patches = writes.patches - patches

    table = Table(
        f"operator pass per watch event ({args.pods:,} pods x {args.probes} probes, "
        f"{args.namespaces} namespaces, {args.nodes} nodes)",
        ["pass", "samples", "p50 ms", "p99 ms", "max ms", "goal", "met?"],
    )
    for kind, times in kinds.items():
        if not times:
            continue
        p99 = percentile(times, 99) * 1e3
        goal = f"<= {GOAL_MS:g} ms" if kind.startswith("pod") else "none"
        table.add(
            kind,
            len(times),
            f"{percentile(times, 50) * 1e3:.2f}",
            f"{p99:.2f}",
            f"{max(times) * 1e3:.2f}",
            goal,
            met(p99 <= GOAL_MS) if kind.startswith("pod") else "-",
        )
    table.add(
        "full pass from scratch (new loop)",
        len(full),
        f"{percentile(full, 50) * 1e3:.2f}",
        f"{percentile(full, 99) * 1e3:.2f}",
        f"{max(full) * 1e3:.2f}",
        "none",
        "-",
    )
    table.notes.append(
        "a pass = the indexes' snapshot + ControlLoop.reconcile_once (selection, rendering, "
        "push planning, status folding, the writes' coroutines); no I/O: pushes are answered "
        "and writes succeed in-process"
    )
    table.notes.append(
        f"{args.events} pod events in random namespaces, creates and deletes alternating; "
        f"{patches} status patches followed them; world built in {built:.1f} s"
    )
    table.print()
    pod_p99 = percentile(kinds["pod created"] + kinds["pod deleted"], 99) * 1e3
    if args.lag_events:
        lag_world = World(args.pods, args.probes, args.namespaces, args.nodes, seed=args.seed)
        (await stream_lag(lag_world, args.lag_events, args.rate)).print()
    if args.profile or pod_p99 > GOAL_MS:
        profile = cProfile.Profile()
        scratch: dict[str, list[float]] = {k: [] for k in kinds}
        await pod_events(loop, writes, world, live, 40, scratch, profile, pods_only=True)
        title = "what limits a pod event's pass (cProfile of 40 more pod-event passes, own time)"
        profile_table(title, profile, top=15, per=("event", 40)).print()


async def stream_lag(world: World, events: int, rate: float) -> Table:
    """Pod events at `rate` per second into a control loop as it runs (`ControlLoop.run`,
    the operator's own debounce), the agents answering and the watch echoing the statuses
    between events, as kopf and the pusher would poke it. Each event's lag: from its change
    in the indexes to the end of the first pass that started after it (the pass that pushed
    it and queued its statuses). Lag that grows means the loop does not keep up."""
    settings = OperatorSettings(namespace="tk")  # the default render_debounce
    loop, writes = control_loop(settings, world)
    await settle(loop, writes, world)
    passes: list[tuple[float, float]] = []
    reconcile = loop.reconcile_once
    changed: list[float] = []
    caught_up = asyncio.Event()

    async def timed(*, wait_for_writes: bool = True) -> None:
        started = time.perf_counter()
        await reconcile(wait_for_writes=wait_for_writes)
        passes.append((started, time.perf_counter()))
        if len(changed) == events and started >= changed[-1]:
            caught_up.set()

    loop.reconcile_once = timed  # type: ignore[method-assign]
    runner = asyncio.create_task(loop.run())
    live: list[PodRecord] = []
    cpu = time.process_time()
    due = time.perf_counter()
    for i in range(events):
        world.pod_event(i, live)
        changed.append(time.perf_counter())
        loop.poke()  # kopf's pod handler
        if answer(loop.pusher.planner):
            loop.poke()  # the pusher's on_change
        if world.echo(writes):
            loop.poke()  # the watch brings the statuses back
        due += 1 / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
    await caught_up.wait()
    cpu = time.process_time() - cpu
    runner.cancel()
    lags: list[float] = []
    first = 0
    for at in changed:
        while passes[first][0] < at:
            first += 1
        lags.append(passes[first][1] - at)
    half = len(lags) // 2
    early, late = lags[:half], lags[half:]
    table = Table(
        f"operator lag under a stream of pod events ({rate:g}/s, {world.pods:,} pods x "
        f"{world.probes} probes)",
        ["events", "samples", "lag p50 ms", "lag p99 ms", "max ms", "goal", "met?"],
    )
    grows = percentile(late, 50) > 1.5 * percentile(early, 50)
    for name, part in (("first half", early), ("second half", late)):
        table.add(
            name,
            len(part),
            f"{percentile(part, 50) * 1e3:.1f}",
            f"{percentile(part, 99) * 1e3:.1f}",
            f"{max(part) * 1e3:.1f}",
            "no growth" if name == "second half" else "",
            met(not grows) if name == "second half" else "",
        )
    table.notes.append(
        f"{len(passes)} passes for {events} events (the {settings.render_debounce * 1e3:g} ms "
        f"debounce coalesces), the process's CPU {cpu / events * 1e3:.2f} ms per event over the "
        "stream (passes, answers, echoes, the writes' coroutines); 'no growth': the second "
        "half's p50 within 1.5x the first's"
    )
    return table


async def pod_events(
    loop: ControlLoop,
    writes: EchoWrites,
    world: World,
    live: list[PodRecord],
    count: int,
    kinds: dict[str, list[float]],
    profile: cProfile.Profile | None = None,
    *,
    pods_only: bool = False,
) -> None:
    """`count` pod events (creates and deletes alternating), each pass timed, then the
    agents' answer and the statuses' echo, each in a pass timed too (and profiled unless
    `pods_only`)."""
    for i in range(count):
        kind = world.pod_event(i, live)
        kinds[kind].append(await timed_pass(loop, profile))
        rest = None if pods_only else profile
        if answer(loop.pusher.planner):
            kinds["agent report (push answered)"].append(await timed_pass(loop, rest))
        if world.echo(writes):
            kinds["status written, seen by the watch"].append(await timed_pass(loop, rest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--probes", type=int, default=500)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--lag-events", type=int, default=1000, help="pod events of the lag stream (0: none)"
    )
    parser.add_argument("--rate", type=float, default=100.0, help="the lag stream's events/s")
    parser.add_argument(
        "--profile", action="store_true", help="profile pod events even when the goal is met"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
