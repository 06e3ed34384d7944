"""Fair shares of a node: per-namespace budgets, and the order probes are admitted in.

Per node: the privileged namespaces' probes first (they have no budget, only the node-wide
limits bound them), then the tenant namespaces round-robin, one probe per turn, each
namespace's probes oldest first. A probe that does not fit its namespace's budget or the
node's limits is left out of that node, with a message naming the budget and the numbers;
the next probe still gets its turn. So one namespace's excess only ever costs that
namespace: it cannot push out another namespace's probes, nor the platform team's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from tracekeeper_api.budgets import (
    BUDGET_ANNOTATION,
    PROGRAMS_PER_ATTACH_POINT,
    Budget,
    parse_override,
)
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import (
    MAX_PROBES_PER_NODE,
    MAX_STATE_BYTES,
    ContainerTarget,
    PodEntry,
    ProbeAssignment,
    packed_targets,
)
from tracekeeper_api.shapes import BINDINGS_PER_PROGRAM, Shape, shape_of
from tracekeeper_operator.settings import OperatorSettings

STATE_ENVELOPE_BYTES = 1024
"""Room kept for the state's own fields ({"node": ..., "revision": ...}) in MAX_STATE_BYTES."""


class NamespaceBudgets:
    """Each namespace's budget: None for privileged namespaces, else the operator's default
    with the namespace's tracekeeper.dev/budget annotation over it. An annotation that does
    not parse is ignored (the defaults apply) and reported in `problems`."""

    def __init__(
        self, settings: OperatorSettings, annotations: Mapping[str, Mapping[str, str]]
    ) -> None:
        self._settings = settings
        self._budgets: dict[str, Budget] = {}
        self.problems: dict[str, str] = {}
        """namespace -> why its annotation was ignored."""
        for ns, notes in annotations.items():
            text = notes.get(BUDGET_ANNOTATION)
            if text is None:
                continue
            try:
                self._budgets[ns] = parse_override(text).over(settings.budget)
            except ValueError as exc:
                self.problems[ns] = f"annotation {BUDGET_ANNOTATION} ignored: {exc}"

    def __call__(self, namespace: str) -> Budget | None:
        if self._settings.is_privileged(namespace):
            return None
        return self._budgets.get(namespace, self._settings.budget)


def effective_spec(spec: TraceProbeSpec, budget: Budget | None) -> TraceProbeSpec:
    """The spec as sent to agents: a tenant's events probe without rateLimit gets its
    namespace's default rate limit (the agent writes it into its binding's token bucket;
    it is in the spec and its hash). Privileged namespaces get no default."""
    out = spec.output
    if budget is None or out.kind != "events" or out.rate_limit is not None:
        return spec
    limited = out.model_copy(update={"rate_limit": budget.default_rate_limit})
    return spec.model_copy(update={"output": limited})


def attach_points(assignment: ProbeAssignment) -> tuple[str, ...]:
    """Where the probe's program attaches; the kernel takes 64 programs per point."""
    spec = assignment.spec
    if spec.tracepoint is not None:
        return (f"tracepoint {spec.tracepoint}",)
    if spec.syscall is not None:
        name = spec.syscall.name
        enter = f"tracepoint syscalls:sys_enter_{name}"
        return (enter, f"tracepoint syscalls:sys_exit_{name}") if spec.syscall.latency else (enter,)
    if spec.raw_tracepoint is not None:
        return (f"raw tracepoint {spec.raw_tracepoint}",)
    if spec.kprobe is not None:
        kind = "kretprobe" if spec.kprobe.return_ else "kprobe"
        return (f"{kind} {spec.kprobe.function}",)
    if spec.uprobe is not None:
        kind = "uretprobe" if spec.uprobe.return_ else "uprobe"
        return (f"{kind} {spec.uprobe.binary}:{spec.uprobe.symbol}",)
    if spec.usdt is not None:  # uprobes at the probe's sites: counted like one uprobe
        return (f"usdt {spec.usdt.binary}:{spec.usdt.provider}:{spec.usdt.name}",)
    return ()  # raw programs (privileged) attach where their source says


def _json_len(model: PodEntry | ContainerTarget | ProbeAssignment) -> int:
    # As the agent client serializes it, plus the separating comma.
    return len(model.model_dump_json(by_alias=True, exclude_none=True)) + 1


@dataclass(frozen=True)
class Cost:
    """What one probe takes of a node."""

    attach_points: tuple[str, ...]
    shape: Shape
    """Probes of one shape share a program on the node (up to 64 per program)."""
    events_per_second: int
    filter_entries: int
    probe_bytes: int
    """The probe in the state, with its pods as references."""
    pods: Mapping[str, PodEntry]
    """The pod table entries it needs, by uid."""
    pod_sizes: Mapping[str, tuple[int, tuple[tuple[str, int], ...]]] = field(default_factory=dict)
    """uid -> (bytes of its pod table entry without containers, bytes per container name):
    measured once with the cost, not each time a node's usage counts it."""


def cost_of(assignment: ProbeAssignment) -> Cost:
    targets, entries = packed_targets(assignment.targets)
    t = assignment.targets
    out = assignment.spec.output
    return Cost(
        attach_points=attach_points(assignment),
        shape=shape_of(assignment),
        events_per_second=(out.rate_limit or 0) if out.kind == "events" else 0,
        # What the agent puts in the filter maps: one entry for a whole pod, one per listed
        # container, one per host pid or cgroup path.
        filter_entries=sum(1 if p.all_containers else len(p.containers) for p in t.pods)
        + len(t.pids)
        + len(t.cgroup_paths),
        probe_bytes=_json_len(assignment.model_copy(update={"targets": targets})),
        pods={e.uid: e for e in entries},
        pod_sizes={
            e.uid: (
                _json_len(e.model_copy(update={"containers": []})),
                tuple((c.name, _json_len(c)) for c in e.containers),
            )
            for e in entries
        },
    )


@dataclass
class Usage:
    """What the probes admitted so far take (of one namespace, or of the whole node)."""

    probes: int = 0
    shapes: Counter[tuple[str, Shape]] = field(default_factory=Counter)
    """(attach point, shape) -> probes admitted of that shape there."""
    programs: Counter[str] = field(default_factory=Counter)
    """attach point -> BPF programs the probes admitted take there (`shapes`, each one
    program per BINDINGS_PER_PROGRAM probes)."""
    events_per_second: int = 0
    filter_entries: int = 0
    state_bytes: int = 0
    containers: dict[str, set[str]] = field(default_factory=dict)
    """pod uid -> container names already in the pod table."""

    def pod_bytes(self, cost: Cost) -> int:
        """Bytes the probe's pods add to the pod table (each pod, each container once)."""
        total = 0
        for uid, (bare, containers) in cost.pod_sizes.items():
            known = self.containers.get(uid)
            if known is None:
                total += bare
                known = set()
            total += sum(size for name, size in containers if name not in known)
        return total

    def programs_with(self, point: str, cost: Cost) -> int:
        """BPF programs on `point` once the probe is admitted too: one per shape per 64
        probes of it (the agent's shared programs), not one per probe."""
        # One more program when the shape's last program is full (or it has none yet).
        return self.programs[point] + (self.shapes[(point, cost.shape)] % BINDINGS_PER_PROGRAM == 0)

    def add(self, cost: Cost) -> None:
        self.state_bytes += cost.probe_bytes + self.pod_bytes(cost)
        self.probes += 1
        for point in cost.attach_points:
            self.programs[point] = self.programs_with(point, cost)
            self.shapes[(point, cost.shape)] += 1
        self.events_per_second += cost.events_per_second
        self.filter_entries += cost.filter_entries
        for uid, entry in cost.pods.items():
            self.containers.setdefault(uid, set()).update(c.name for c in entry.containers)


def over_budget(
    namespace: str, node: str, wanted: int, used: Usage, cost: Cost, budget: Budget
) -> str | None:
    """Why the probe does not fit its namespace's budget on this node, or None."""
    where = f"{namespace} has {wanted} probes on node {node}"
    if used.probes + 1 > budget.probes_per_node:
        return f"{where}, its budget is {budget.probes_per_node} probes per node"
    for point in cost.attach_points:
        programs = used.programs_with(point, cost)
        if programs > budget.programs_per_attach_point:
            return (
                f"{namespace} would have {programs} programs on {point} on node "
                f"{node}, its budget is {budget.programs_per_attach_point} per attach point"
            )
    events = used.events_per_second + cost.events_per_second
    if cost.events_per_second and events > budget.events_per_second:
        return (
            f"{namespace}'s events probes would take {events} events/s on node {node} (this "
            f"one's rate limit: {cost.events_per_second}), its budget is "
            f"{budget.events_per_second} events/s per node"
        )
    if used.filter_entries + cost.filter_entries > budget.filter_entries:
        return (
            f"{namespace}'s probes would take {used.filter_entries + cost.filter_entries} filter "
            f"entries on node {node} (this one: {cost.filter_entries}), its budget is "
            f"{budget.filter_entries} per node"
        )
    size = cost.probe_bytes + used.pod_bytes(cost)
    if used.state_bytes + size > budget.state_bytes:
        return (
            f"{namespace}'s probes would take {used.state_bytes + size} bytes of node {node}'s "
            f"desired state (this one: {size}), its budget is {budget.state_bytes} bytes per node"
        )
    return None


def over_node(node: str, used: Usage, cost: Cost) -> str | None:
    """Why the probe does not fit the node at all (whoever owns it), or None."""
    if used.probes + 1 > MAX_PROBES_PER_NODE:
        return f"node {node} already runs {MAX_PROBES_PER_NODE} probes, the most a node takes"
    for point in cost.attach_points:
        if used.programs_with(point, cost) > PROGRAMS_PER_ATTACH_POINT:
            return (
                f"node {node} already has {PROGRAMS_PER_ATTACH_POINT} programs on {point}, "
                "the kernel's limit per attach point"
            )
    size = cost.probe_bytes + used.pod_bytes(cost)
    if used.state_bytes + size > MAX_STATE_BYTES - STATE_ENVELOPE_BYTES:
        return f"node {node}'s desired state would exceed {MAX_STATE_BYTES} bytes"
    return None


@dataclass(frozen=True)
class Candidate:
    """A probe that selects targets on the node."""

    assignment: ProbeAssignment
    created: str = ""

    @cached_property
    def cost(self) -> Cost:
        """Computed once per candidate (a JSON dump of the probe and its pods): a probe's
        candidate is kept from pass to pass while its assignment does not change."""
        return cost_of(self.assignment)


@dataclass(frozen=True)
class Allocation:
    admitted: tuple[ProbeAssignment, ...]
    """In the order of probe ids (a stable state for equal inputs)."""
    refused: Mapping[str, str]
    """probe id -> why it was left out of the node."""


def allocation_order(candidates: Sequence[Candidate], budgets: NamespaceBudgets) -> list[Candidate]:
    """Privileged namespaces first, then tenant namespaces round-robin, oldest first."""
    by_ns: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_ns.setdefault(c.assignment.namespace, []).append(c)
    queues = {
        ns: sorted(cs, key=lambda c: (c.created, c.assignment.id))
        for ns, cs in sorted(by_ns.items())
    }
    order = [a for ns, q in queues.items() if budgets(ns) is None for a in q]
    tenants = [q for ns, q in queues.items() if budgets(ns) is not None]
    for turn in range(max((len(q) for q in tenants), default=0)):
        order.extend(q[turn] for q in tenants if turn < len(q))
    return order


def allocate(node: str, candidates: Sequence[Candidate], budgets: NamespaceBudgets) -> Allocation:
    wanted = Counter(c.assignment.namespace for c in candidates)
    node_use = Usage()
    ns_use: dict[str, Usage] = {}
    admitted: list[ProbeAssignment] = []
    refused: dict[str, str] = {}
    for candidate in allocation_order(candidates, budgets):
        assignment = candidate.assignment
        ns = assignment.namespace
        cost = candidate.cost
        used = ns_use.setdefault(ns, Usage())
        budget = budgets(ns)
        why = over_node(node, node_use, cost)
        if why is None and budget is not None:
            why = over_budget(ns, node, wanted[ns], used, cost, budget)
            if why is not None and ns in budgets.problems:
                why += f" ({budgets.problems[ns]})"
        if why is not None:
            refused[assignment.id] = why
            continue
        node_use.add(cost)
        used.add(cost)
        admitted.append(assignment)
    return Allocation(tuple(sorted(admitted, key=lambda a: a.id)), refused)
