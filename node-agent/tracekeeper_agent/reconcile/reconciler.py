"""Desired NodeState -> shared programs in the kernel, through the ProgramLoader seam.

Probes are grouped by shape (programs/sharing.py: what changes the C text); the probes of
one shape share one program, each a binding (a bit of the program's mask, up to 64; a 65th
opens another program of the shape). Per probe: suspended or gone -> its binding is
removed (map writes; the program is closed with its last binding); same shape -> its
targets, sampling and rate limit are map writes only, the program keeps its BPF ids; a new
shape -> the probe is bound in a program of that shape (loaded first if there is none, or
every one is full) and filled before its old binding goes (no gap). One probe's failure
never touches the others. Compiles run one at a time in a worker thread, so the event loop
keeps serving the API and cgroup events meanwhile.

A probe that failed for a reason that may pass (AttachFailed) is retried after a per-probe
backoff, not on every push. An apply runs to completion whatever its caller does: a client
that disconnects mid-push cancels its wait, never the kernel work. What is loaded is
published to the ProgramBoard, which the outputs read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tracekeeper_agent.active import ActiveProbe, ProgramBoard
from tracekeeper_agent.ports import (
    ClaimCounters,
    FilterEntries,
    LoadedProgram,
    LoadFailure,
    ProgramLoader,
    ProgramMaps,
    ProgramPlan,
)
from tracekeeper_agent.programs.builder import plan_inputs
from tracekeeper_agent.programs.constants import (
    MAX_BINDINGS,
    MAX_PENDING_PATHS,
    MAX_PROGRAMS_PER_SHAPE,
)
from tracekeeper_agent.programs.kinds.uprobe import NothingToAttach
from tracekeeper_agent.programs.sharing import (
    BitTable,
    IdentitySlots,
    NodeTables,
    binding_of,
    node_tables,
    program_maps,
    slot_keys,
)
from tracekeeper_agent.reconcile.coverage import PodCoverage
from tracekeeper_agent.reconcile.state_store import StateStore
from tracekeeper_agent.reconcile.tenancy import DEFAULT_PRIVILEGED, refusal
from tracekeeper_agent.targets.attribution import TargetAttributor
from tracekeeper_agent.targets.node import CgroupChanges
from tracekeeper_agent.targets.resolution import (
    CgroupLookup,
    ProcessTable,
    Resolution,
    needs_polling,
    resolve_targets,
)
from tracekeeper_api.protocol import (
    CgroupClaims,
    EventDrops,
    KernelInfo,
    NodeReport,
    NodeState,
    Persistence,
    ProbeAssignment,
    ProbeOutcome,
    ProbeState,
)
from tracekeeper_api.text import truncate_message

log = logging.getLogger(__name__)

PlanBuilder = Callable[[ProbeAssignment], ProgramPlan]
PlanInputs = Callable[[ProbeAssignment], Hashable]
"""A probe's shape key: what its program is built from. Probes with equal keys share."""

# Failures that recur for the same inputs: not retried (recompiled) until the inputs change.
# Other failures (attach) may pass and are retried after a per-probe backoff.
DETERMINISTIC_REASONS = frozenset(
    {"CompileFailed", "Unsupported", "KernelHeadersMissing", "InvalidSpec", "NotPermitted"}
)
RETRY_FIRST = 10.0
RETRY_MAX = 300.0
"""Seconds before the first retry of a failed probe, doubling per failure up to this."""


def retry_delay(failures: int, first: float = RETRY_FIRST, most: float = RETRY_MAX) -> float:
    """Backoff before retrying a probe that failed `failures` (>= 1) times in a row."""
    return float(min(most, first * 2 ** min(failures - 1, 32)))


SUSPENDED_MESSAGE = "spec.suspend is true: the program is unloaded"
POLL_INTERVAL = 2.0
"""Seconds between re-resolutions of targets that no cgroup event announces."""
FULL_MESSAGE = (
    f"every program of this shape serves {MAX_BINDINGS} probes and this node runs "
    f"{MAX_PROGRAMS_PER_SHAPE} of them (the kernel's limit per attach point): "
    f"{MAX_PROGRAMS_PER_SHAPE} x {MAX_BINDINGS} probes of one shape per node"
)


class StateRefused(Exception):
    """A desired state the agent does not apply at all (nothing of it is applied)."""

    status = 400


class WrongNode(StateRefused):
    pass


class StaleRevision(StateRefused):
    status = 409

    def __init__(self, message: str, applied_revision: int) -> None:
        super().__init__(message)
        self.applied_revision = applied_revision


def check_revision(applied: NodeState | None, offered: NodeState) -> bool:
    """True when `offered` is what is applied already (an idempotent retry); raises
    StaleRevision for an older revision, or the same revision with other content."""
    if applied is None:
        return False  # no state yet (first start, or nothing persisted): take any revision
    if offered.revision < applied.revision:
        raise StaleRevision(
            f"revision {offered.revision} is older than the applied revision "
            f"{applied.revision}; send the full state with a higher revision",
            applied.revision,
        )
    if offered.revision == applied.revision:
        if offered == applied:
            return True
        raise StaleRevision(
            f"revision {offered.revision} was already applied with different content; "
            "send it with a higher revision",
            applied.revision,
        )
    return False


_unshared = itertools.count()


@dataclass(eq=False)
class _Program:
    """One loaded program of a shape and its bindings."""

    key: Hashable
    plan: ProgramPlan
    loaded: LoadedProgram
    bits: BitTable = field(default_factory=BitTable)
    bound: dict[int, _Probe] = field(default_factory=dict)
    """bit -> the probe holding it (a bit freed waits in `bits` until its keys are gone)."""
    maps: ProgramMaps | None = None
    """What its maps were last written with."""


@dataclass
class _Probe:
    """What the agent has for one probe of the desired state."""

    assignment: ProbeAssignment
    state: ProbeState
    reason: str
    message: str = ""
    inputs: Hashable | None = None
    """The shape key this outcome was reached with (None: plan again)."""
    failures: int = 0
    """Failed loads in a row with these inputs."""
    retry_at: float | None = None
    """Monotonic time after which a failed probe is tried again (None: not with the same
    inputs, or not failed)."""
    resolution: Resolution = field(default_factory=Resolution)
    program: _Program | None = None
    bit: int = -1
    bound_at: float = 0.0
    """Monotonic time its binding was made (a pod made later raced it: coverage.py)."""
    active: ActiveProbe | None = None


class Reconciler:
    def __init__(
        self,
        *,
        node: str,
        loader: ProgramLoader,
        build_plan: PlanBuilder,
        cgroups: CgroupLookup,
        board: ProgramBoard | None = None,
        processes: ProcessTable | None = None,
        store: StateStore | None = None,
        kernel: KernelInfo | None = None,
        compile_observer: Callable[[float], None] | None = None,
        adopt_observer: Callable[[], None] | None = None,
        attributor: TargetAttributor | None = None,
        boot_id: str | None = None,
        plan_inputs: PlanInputs = plan_inputs,
        privileged_namespaces: frozenset[str] | None = DEFAULT_PRIVILEGED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.boot_id = boot_id or str(uuid.uuid4())
        self.kernel = kernel or KernelInfo()
        self.attributor = attributor or TargetAttributor(cgroups)
        """Kept current with the desired state's pods (the exporters name pods with it)."""
        self.board = board or ProgramBoard()
        """Where the loaded bindings are published (the outputs read them there)."""
        self._loader = loader
        self._build_plan = build_plan
        self._plan_inputs = plan_inputs
        self._privileged = privileged_namespaces
        """Namespaces whose probes may use privileged fields (None: all, standalone)."""
        self._clock = clock
        self._running: set[asyncio.Task[NodeReport | None]] = set()
        """Applies whose callers may be gone: kept referenced until they complete."""
        self._one_compile = threading.Lock()
        """Held by the worker thread for the whole compile: even a cancelled waiter cannot
        let a second compile start."""
        self._cgroups = cgroups
        self._processes = processes
        self._store = store
        self._compile_observer = compile_observer
        self._adopt_observer = adopt_observer
        self._state: NodeState | None = None
        """The last accepted state (revision checks); possibly still being applied."""
        self._applied_revision = 0
        self._probes: dict[str, _Probe] = {}
        self._programs: list[_Program] = []
        self._slots = IdentitySlots()
        self._identity: dict[int, int] = {}
        """The identity entries the last write left (kept until masks no longer name them)."""
        self._tables = NodeTables({}, {})
        self._coverage = PodCoverage()
        self._apply_lock = asyncio.Lock()
        self._filter_lock = asyncio.Lock()
        """Held while bindings and the maps that hold them change (map writes are diffs of
        what the last write left)."""

    # --- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> NodeState | None:
        return self._state

    def active_probes(self) -> list[ActiveProbe]:
        """The loaded bindings now (a snapshot: exporters iterate it from other threads)."""
        return self.board.probes()

    def programs(self) -> int:
        """Programs loaded now (one per shape, or more for shapes of over 64 probes)."""
        return len(self._programs)

    def report(self) -> NodeReport:
        revision = self._applied_revision  # not the one being applied: its probes are not all in
        return NodeReport(
            node=self.node,
            revision=revision,
            boot_id=self.boot_id,
            kernel=self.kernel,
            probes=[self._outcome(p) for p in list(self._probes.values())],
            cgroup_claims=self.claims(),
            persisted=self.persisted(),
        )

    def persisted(self) -> Persistence:
        """What the state directory holds (nothing without a store: standalone runs)."""
        return self._store.persisted() if self._store else Persistence()

    def _outcome(self, probe: _Probe) -> ProbeOutcome:
        message = probe.message
        if probe.state == "Loaded" and not message:
            message = probe.resolution.pending_message()
        program_ids: list[int] = []
        drops = EventDrops()
        shape, shared_by = "", 0
        if probe.active is not None and probe.program is not None:
            program_ids = list(probe.program.loaded.program_ids)
            drops = self._drops(probe.active)
            shape, shared_by = probe.program.plan.shape, len(probe.program.bound)
        res = probe.resolution
        return ProbeOutcome(
            id=probe.assignment.id,
            spec_hash=probe.assignment.spec_hash,
            state=probe.state,
            reason=probe.reason,
            message=truncate_message(message),
            program_ids=program_ids,
            filter_entries=res.entries.size,
            pods=res.pods,
            containers=res.containers,
            drops=drops,
            shape=shape,
            shared_by=shared_by,
        )

    def _drops(self, active: ActiveProbe) -> EventDrops:
        backlog = active.counts.backlog
        if active.plan.output_kind != "events":
            return EventDrops(backlog=backlog)
        try:
            counters = active.read_counters()
        except Exception:  # a report must not fail because one map read did
            log.exception("reading the counters of %s", active.id)
            return EventDrops(backlog=backlog)
        return EventDrops(
            rate_limited=counters.rate_limited, ring_full=counters.ring_full, backlog=backlog
        )

    # --- applying --------------------------------------------------------------------------

    async def apply(self, state: NodeState, *, now: float | None = None) -> NodeReport:
        """Make the kernel hold `state`. Raises StateRefused (nothing applied) for a state
        meant for another node or an outdated revision; per-probe failures are outcomes.
        Runs to completion (in its own task) even when the caller is cancelled. `now`:
        monotonic seconds (the clock's by default) for retry backoffs."""
        state = state.resolved()  # pod table -> each probe's inline targets
        report = await self._completing(self._apply(state, now))
        assert report is not None
        return report

    async def retry(self, now: float | None = None) -> None:
        """Plan again the probes of the applied state whose inputs changed (a uprobe whose
        containers started or changed image) or whose retry backoff is over."""
        await self._completing(self._retry(now))

    async def _completing(self, work: Any) -> NodeReport | None:
        task: asyncio.Task[NodeReport | None] = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(_settled(self._running))
        return await asyncio.shield(task)

    async def _apply(self, state: NodeState, now: float | None) -> NodeReport:
        async with self._apply_lock:
            if state.node != self.node:
                raise WrongNode(f"this agent serves node {self.node!r}, not {state.node!r}")
            if check_revision(self._state, state):
                return self.report()
            await self._persist(state)
            previous, self._state = self._state, state
            # Until the old bindings are gone, their events still name their pods.
            self.attributor.set_targets([*(previous.probes if previous else []), *state.probes])
            desired = {a.id for a in state.probes}
            for gone in [pid for pid in self._probes if pid not in desired]:
                await self._unbind(self._probes.pop(gone))
            await self._converge(state.probes, self._clock() if now is None else now)
            # Report in the order of the desired state.
            self._probes = {a.id: self._probes[a.id] for a in state.probes}
            await self._publish()
            self.attributor.set_targets(state.probes)
            self._applied_revision = state.revision
            return self.report()

    async def _retry(self, now: float | None) -> None:
        async with self._apply_lock:
            if self._state is not None:
                await self._persist(self._state)  # a failed save again, once room is back
            if self._state is None or self._applied_revision != self._state.revision:
                return
            await self._converge(self._state.probes, self._clock() if now is None else now)
            await self._publish()
        return None

    async def _converge(self, assignments: Sequence[ProbeAssignment], now: float) -> None:
        refused = {a.id: r for a in assignments if (r := refusal(a, self._privileged))}
        planned = [a for a in assignments if not a.spec.suspend and a.id not in refused]
        inputs = await asyncio.to_thread(self._inputs, planned)
        for assignment in assignments:
            if assignment.id in refused:
                current = self._probes.get(assignment.id)
                await self._replace(current, _failed(assignment, refused[assignment.id]))
                continue
            await self._apply_probe(assignment, inputs.get(assignment.id), now)

    def _inputs(self, assignments: Sequence[ProbeAssignment]) -> dict[str, Hashable | None]:
        found: dict[str, Hashable | None] = {}
        for a in assignments:
            try:
                found[a.id] = self._plan_inputs(a)
            except Exception:  # plan it every time rather than never
                log.exception("computing the plan inputs of %s", a.id)
                found[a.id] = None
        return found

    async def _persist(self, state: NodeState) -> None:
        """Saved before the kernel work, so that a crash midway resumes this state. A failed
        save (disk full, read-only dir) costs only the resume after a restart: tracing goes
        on, the report says so (`persisted`), the poll saves it again, and the operator
        pushes again to a restarted agent anyway."""
        if self._store is None or self._store.holds(state):
            return  # the state just restored from the file is not written back
        failing = self._store.error is not None
        try:
            await asyncio.to_thread(self._store.save, state)
        except OSError as exc:
            if not failing:  # once, not at every poll's attempt
                log.error("could not persist revision %d: %s", state.revision, exc)
            return
        if failing:
            log.info("persisted revision %d", state.revision)

    async def _apply_probe(
        self, assignment: ProbeAssignment, inputs: Hashable | None, now: float
    ) -> None:
        current = self._probes.get(assignment.id)
        if assignment.spec.suspend:
            suspended = _Probe(assignment, "Suspended", "Suspended", SUSPENDED_MESSAGE)
            await self._replace(current, suspended)
            return
        if current is not None and inputs is not None and current.inputs == inputs:
            if current.program is not None:
                await self._update_binding(current, assignment)
                return
            if current.retry_at is None or now < current.retry_at:
                current.assignment = assignment  # the same plan failed: not yet again
                return
        key: Hashable = inputs if inputs is not None else ("unshared", next(_unshared))
        program = self._room(key)
        if program is None:
            if sum(1 for p in self._programs if p.key == key) >= MAX_PROGRAMS_PER_SHAPE:
                failure = LoadFailure("Failed", "AttachFailed", FULL_MESSAGE)
                await self._replace(current, _failed(assignment, failure, inputs, now, current))
                return
            loaded = await self._open(assignment, key)
            if isinstance(loaded, LoadFailure):
                await self._replace(current, _failed(assignment, loaded, inputs, now, current))
                return
            program = loaded
        fresh = _Probe(assignment, "Loaded", "Loaded", inputs=inputs)
        try:
            await self._bind(fresh, program)
        except LoadFailure as broken:  # the program's maps could not be written: closed
            await self._replace(current, _failed(assignment, broken, inputs, now, current))
            return
        # Only now that the new binding counts does the old one go.
        await self._replace(current, fresh)

    def _room(self, key: Hashable) -> _Program | None:
        """A loaded program of the shape with a free bit."""
        return next((p for p in self._programs if p.key == key and not p.bits.full), None)

    async def _open(self, assignment: ProbeAssignment, key: Hashable) -> _Program | LoadFailure:
        """Build and load a program of the assignment's shape (its first binding follows)."""
        built = await asyncio.to_thread(self._plan, assignment)
        if isinstance(built, LoadFailure):
            return built
        try:
            loaded = await self._load(built)
        finally:
            built.held.release()  # a plan that was not loaded still holds its files
        if isinstance(loaded, LoadFailure):
            return loaded
        program = _Program(key=key, plan=built, loaded=loaded)
        self._programs.append(program)
        return program

    def _plan(self, assignment: ProbeAssignment) -> ProgramPlan | LoadFailure:
        """Build the plan (in a worker thread: uprobes open and scan ELF files)."""
        try:
            return self._build_plan(assignment)
        except LoadFailure as failure:
            return failure
        except Exception as exc:  # a builder bug must not take down the other probes
            log.exception("building the program of %s", assignment.id)
            return LoadFailure("Failed", "Failed", f"building the program failed: {exc}")

    async def _load(self, plan: ProgramPlan) -> LoadedProgram | LoadFailure:
        def load() -> LoadedProgram:
            with self._one_compile:
                started = time.perf_counter()
                adopted = False
                try:
                    program = self._loader.load(plan)
                    adopted = program.adopted
                    return program
                finally:
                    if adopted:
                        if self._adopt_observer is not None:
                            self._adopt_observer()
                    elif self._compile_observer is not None:
                        self._compile_observer(time.perf_counter() - started)

        pending = asyncio.ensure_future(asyncio.to_thread(load))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The thread goes on: whatever it attaches is closed, never left untracked.
            pending.add_done_callback(self._close_orphan)
            raise
        except LoadFailure as failure:
            return failure
        except Exception as exc:  # a loader bug fails this probe, not the others
            log.exception("loading the program of %s", plan.shape)
            return LoadFailure("Failed", "Failed", f"loading the program failed: {exc}")

    def _close_orphan(self, done: asyncio.Future[LoadedProgram]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        program = done.result()
        log.warning("closing a program whose load was cancelled")

        def close() -> None:
            with self.board.lock:
                program.close()

        asyncio.get_running_loop().run_in_executor(None, close)

    # --- bindings and their maps --------------------------------------------------------------

    async def _bind(self, probe: _Probe, program: _Program) -> None:
        """Give the probe a bit of `program` and write it into the maps."""
        bit = program.bits.take(probe.assignment.id)
        assert bit is not None, "bound in a full program"
        probe.program, probe.bit, probe.bound_at = program, bit, time.monotonic()
        program.bound[bit] = probe
        probe.active = ActiveProbe(probe.assignment, program.plan, program.loaded, bit)
        async with self._filter_lock:
            probe.resolution = self._resolve(probe)
            await self._write_maps()
        if probe.program is None:  # its program's maps could not be written
            raise LoadFailure("Failed", "Failed", probe.message)

    async def _update_binding(self, probe: _Probe, assignment: ProbeAssignment) -> None:
        """Same shape: the new targets, sampling and rate limit are map writes."""
        probe.assignment = assignment
        if probe.active is not None:
            probe.active.assignment = assignment
        async with self._filter_lock:
            probe.resolution = self._resolve(probe)
            await self._write_maps()

    def _resolve(self, probe: _Probe) -> Resolution:
        resolution = resolve_targets(probe.assignment.targets, self._cgroups, self._processes)
        if probe.active is not None:
            probe.active.filter_entries = resolution.entries.size
        return resolution

    async def _write_maps(self) -> None:
        """Bring the node-wide tables and every program's maps to the bindings (diffs only).
        Caller holds the filter lock. Slots no binding needs keep their slot (and identity
        entries) until every program's masks are rewritten, so that a slot is reused only
        once no mask names it. Pending pods' paths go in after the masks that give their
        slot its bindings: a cgroup the kernel claims from them counts at once. A program
        whose maps cannot be written is closed, its probes Failed (it might trace whom it
        no longer should); the others go on."""
        identities = self._loader.identities
        entries = self._entries()
        slots = self._slots.assign(slot_keys(entries) | self._slots.table().keys())
        tables = node_tables(entries, slots)
        bound = [
            (p.resolution.entries, p.bound_at) for g in self._programs for p in g.bound.values()
        ]
        await asyncio.to_thread(
            self._coverage.note, bound, self._identity, self._cgroups, identities
        )
        await asyncio.to_thread(identities.sync, {**self._identity, **tables.identity})
        # A cgroup given its slot here may already hold a process whose verdict, a miss, is
        # cached (a pod learned through inotify whose first process ran before this write):
        # a program whose masks name such a slot recomputes its verdicts, also when its own
        # maps stay as they are. The others' verdicts for it are misses either way.
        moved = {slot for cg, slot in tables.identity.items() if self._identity.get(cg) != slot}
        broken: list[tuple[_Program, Exception]] = []
        for program in list(self._programs):
            bindings = [
                binding_of(bit, p.assignment, p.resolution.entries)
                for bit, p in program.bound.items()
            ]
            maps = program_maps(bindings, slots)
            if maps == program.maps:
                if not moved.isdisjoint(maps.slot_masks):
                    try:
                        await asyncio.to_thread(program.loaded.invalidate)
                    except Exception as exc:
                        broken.append((program, exc))
                continue
            try:
                await asyncio.to_thread(program.loaded.update_maps, maps)
            except Exception as exc:
                broken.append((program, exc))
            else:
                program.maps = maps
        for program, error in broken:
            await self._fail_closed(program, error)
        entries = self._entries()  # without the probes of a closed program
        final = self._slots.assign(slot_keys(entries))
        tables = node_tables(entries, final)
        await asyncio.to_thread(identities.sync_pending, tables.pending)
        await asyncio.to_thread(identities.sync, tables.identity)
        self._identity, self._tables = tables.identity, tables
        # Pods' slots only: cgroups the kernel claimed for them may be unknown here.
        freed = [s for k, s in slots.items() if isinstance(k, str) and k not in final]
        if freed:
            await asyncio.to_thread(identities.release, freed)

    def _entries(self) -> list[FilterEntries]:
        return [
            probe.resolution.entries
            for program in self._programs
            for probe in program.bound.values()
        ]

    def claims(self) -> CgroupClaims:
        """The pending table and the kernel's claims, for the report and the metrics."""
        tables = self._tables
        identities = self._loader.identities
        try:
            counters = identities.claim_counters()
        except Exception:  # a report must not fail because one map read did
            log.exception("reading the cgroup claim counters")
            counters = ClaimCounters()
        return CgroupClaims(
            pending_pods=tables.pending_pods,
            pending_paths=len(tables.pending),
            capacity=MAX_PENDING_PATHS,
            left_out_pods=tables.left_out_pods,
            claimed=counters.claimed,
            identity_full=counters.identity_full,
            covered_before_processes=self._coverage.before_first_process,
            covered_after_processes=self._coverage.after_first_process,
            program_ids=list(identities.program_ids),
        )

    async def _replace(self, old: _Probe | None, new: _Probe) -> None:
        self._probes[new.assignment.id] = new
        if old is not None and old is not new:
            await self._unbind(old)

    async def _unbind(self, probe: _Probe) -> None:
        """Remove the probe's binding: readers let go of it, its bit leaves the masks, its
        keys and counters are deleted, then the bit is free; a program left without
        bindings is closed."""
        program = probe.program
        if program is None:
            return
        probe.active = None
        await self._publish()  # readers let go of the binding first
        async with self._filter_lock:
            try:
                await self._drop_bit(probe)
            except Exception:
                log.exception("removing the binding of %s", probe.assignment.id)
        await self._close_if_empty(program)

    async def _drop_bit(self, probe: _Probe) -> None:
        program, bit = probe.program, probe.bit
        assert program is not None
        program.bound.pop(bit, None)
        probe.program, probe.bit, probe.active = None, -1, None
        try:
            await self._write_maps()
            if program in self._programs:  # not closed by a failed write
                await asyncio.to_thread(program.loaded.clear_binding, bit)
        finally:
            program.bits.release(bit)

    async def _close_if_empty(self, program: _Program) -> None:
        if program.bound or program not in self._programs:
            return
        self._programs.remove(program)
        await self._publish()
        await self._close_program(program.loaded)

    async def _fail_closed(self, program: _Program, exc: Exception) -> None:
        log.error("the maps of %s could not be written, closing it: %s", program.plan.shape, exc)
        for probe in list(program.bound.values()):
            probe.state, probe.reason = "Failed", "Failed"
            probe.message = f"filter update failed: {exc}"
            probe.inputs = None  # the next push or retry plans it again
            probe.program, probe.bit, probe.active = None, -1, None
            probe.resolution = Resolution()
        program.bound.clear()
        self._programs.remove(program)
        await self._publish()
        await self._close_program(program.loaded)

    async def _publish(self) -> None:
        probes = []
        for p in list(self._probes.values()):
            if p.active is None or p.program is None:
                continue
            p.active.shared_by = len(p.program.bound)
            probes.append(p.active)
        await self.board.publish(probes)

    async def _close_program(self, program: LoadedProgram) -> None:
        def close() -> None:
            with self.board.lock:
                program.close()

        try:
            await asyncio.to_thread(close)
        except Exception:
            log.exception("closing a program failed")

    # --- cgroup and process changes -----------------------------------------------------------

    async def refresh_targets(self, changes: CgroupChanges | None = None) -> int:
        """Re-resolve targets after cgroup changes (None: the periodic poll of probes whose
        targets can change unseen). Map writes only. Returns the probes updated."""
        updated = 0
        async with self._filter_lock:
            for probe in list(self._probes.values()):
                if probe.program is None:
                    continue
                targets = probe.assignment.targets
                if changes is None:
                    if not needs_polling(targets, probe.resolution):
                        continue
                elif not changes.concerns(targets):
                    continue
                before = probe.resolution
                probe.resolution = self._resolve(probe)
                if probe.resolution.entries != before.entries:
                    updated += 1
            if updated:
                await self._write_maps()
        return updated

    async def poll_targets(self, interval: float = POLL_INTERVAL) -> None:
        """Run forever: re-resolve, every `interval` seconds, the targets no cgroup event
        announces (see targets.needs_polling)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh_targets()
                await self.retry()
            except Exception:
                log.exception("polling targets failed")

    async def restore(self) -> NodeState | None:
        """Re-apply the persisted state at start, before the operator pushes again. A state
        that does not fit (another node's) is left for the operator's push to replace."""
        if self._store is None:
            return None
        state = await asyncio.to_thread(self._store.load)
        if state is None:
            return None
        try:
            # Revision-checked: a push that came first (and was persisted) is not undone.
            await self.apply(state)
        except StateRefused as exc:
            log.warning("not resuming the persisted state: %s", exc)
            return None
        return state

    async def close(self) -> None:
        """Detach every program (agent shutdown)."""
        async with self._apply_lock:
            for probe in self._probes.values():
                probe.active = None
            await self.board.publish([])
            for program in list(self._programs):
                self._programs.remove(program)
                await self._close_program(program.loaded)


def _failed(
    assignment: ProbeAssignment,
    failure: LoadFailure,
    inputs: Hashable | None = None,
    now: float = 0.0,
    previous: _Probe | None = None,
) -> _Probe:
    """The record of a failed probe: deterministic failures wait for new inputs, others
    are retried after a backoff that grows with each failure in a row."""
    probe = _Probe(assignment, failure.state, failure.reason, failure.message, inputs=inputs)
    if failure.reason in DETERMINISTIC_REASONS or isinstance(failure, NothingToAttach):
        return probe
    streak = previous.failures if previous is not None and previous.program is None else 0
    probe.failures = streak + 1
    probe.retry_at = now + retry_delay(probe.failures)
    return probe


def _settled(running: set[asyncio.Task[NodeReport | None]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Raised to the caller too, if it still waits; logged for one that left.
            log.debug("an apply ended with %r", task.exception())

    return done
