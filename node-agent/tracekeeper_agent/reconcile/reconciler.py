"""Desired NodeState -> programs in the kernel, through the ProgramLoader seam.

Per probe: suspended -> unloaded; same program (plan key) -> filter map update only, the
program stays attached and keeps its BPF ids; changed program -> the new one is loaded and
its filter filled before the old one is closed (no gap); gone -> closed. One probe's failure
never touches the others. Compiles run one at a time in a worker thread, so the event loop
keeps serving the API and cgroup events meanwhile.

Plans are built (off the loop) only for probes whose plan inputs changed (see
program_builder.plan_inputs; a uprobe's include the identity of the resolved files). A
probe that failed for a reason that may pass (AttachFailed) is retried after a per-probe
backoff, not on every push. An apply runs to completion whatever its caller does: a client
that disconnects mid-push cancels its wait, never the kernel work.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.ports import LoadedProgram, LoadFailure, ProgramLoader, ProgramPlan
from tracekeeper_agent.programs.builder import plan_inputs
from tracekeeper_agent.programs.kinds.uprobe import NothingToAttach
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
    EventDrops,
    KernelInfo,
    NodeReport,
    NodeState,
    ProbeAssignment,
    ProbeOutcome,
    ProbeState,
)
from tracekeeper_api.text import truncate_message

log = logging.getLogger(__name__)

PlanBuilder = Callable[[ProbeAssignment], ProgramPlan]
PlanInputs = Callable[[ProbeAssignment], Hashable]
"""What a probe's plan depends on; build_plan runs again only when it changes."""

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


class ProgramReaders(Protocol):
    """Readers of loaded programs in other threads (the EventHub's ring buffer pollers)."""

    async def sync(self, probes: Sequence[ActiveProbe]) -> None:
        """Read exactly `probes` from now on; return once programs not in it are no longer
        read (they are closed right after)."""


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


def plan_key(plan: ProgramPlan) -> str:
    """What identifies a program: everything in the plan but the probe id. Attachments are
    included because a uprobe's resolved binary can change while the C text does not."""
    parts = (
        plan.source_hash or plan.source,
        repr(plan.attachments),
        repr(sorted(plan.filter_kinds)),
        plan.output_kind,
        repr(plan.by),
        repr(plan.event_fields),
    )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def check_confined(assignment: ProbeAssignment, plan: ProgramPlan) -> None:
    """Refuse a plan that would trace every process although the probe is not host-wide:
    without a cgroup or pid filter compiled in, empty maps would not mean 'nothing'."""
    if assignment.targets.host_wide:
        return
    if not plan.filter_kinds & {"cgroup", "pid"}:
        raise LoadFailure(
            "Failed",
            "Failed",
            "refused: the program has no cgroup or pid filter but the probe is not host-wide "
            f"(filter kinds: {sorted(plan.filter_kinds) or 'none'})",
        )


@dataclass
class _Probe:
    """What the agent has for one probe of the desired state."""

    assignment: ProbeAssignment
    state: ProbeState
    reason: str
    message: str = ""
    active: ActiveProbe | None = None
    key: str = ""
    inputs: Hashable | None = None
    """The plan inputs this outcome was reached with (None: plan again)."""
    failures: int = 0
    """Failed loads in a row with these inputs."""
    retry_at: float | None = None
    """Monotonic time after which a failed probe is tried again (None: not with the same
    inputs, or not failed)."""
    resolution: Resolution = field(default_factory=Resolution)


class Reconciler:
    def __init__(
        self,
        *,
        node: str,
        loader: ProgramLoader,
        build_plan: PlanBuilder,
        cgroups: CgroupLookup,
        processes: ProcessTable | None = None,
        store: StateStore | None = None,
        kernel: KernelInfo | None = None,
        backlog_drops: Callable[[str], int] | None = None,
        compile_observer: Callable[[float], None] | None = None,
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
        self.readers: list[ProgramReaders] = []
        self.programs_lock = threading.Lock()
        """Held while a program is closed; readers of kernel maps in other threads (the
        metrics scrape) hold it too, so that they never read a program being freed."""
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
        self._backlog_drops = backlog_drops
        self._compile_observer = compile_observer
        self._state: NodeState | None = None
        """The last accepted state (revision checks); possibly still being applied."""
        self._applied_revision = 0
        self._probes: dict[str, _Probe] = {}
        self._apply_lock = asyncio.Lock()
        self._filter_lock = asyncio.Lock()

    # --- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> NodeState | None:
        return self._state

    def active_probes(self) -> list[ActiveProbe]:
        """The loaded programs now (a snapshot: exporters iterate it from other threads)."""
        return [p.active for p in list(self._probes.values()) if p.active is not None]

    def filter_entries(self, probe: ActiveProbe) -> int:
        """Entries in the probe's filter maps (for the metrics collector)."""
        record = self._probes.get(probe.id)
        if record is None or record.active is not probe:
            return 0
        return record.resolution.entries.size

    def report(self) -> NodeReport:
        revision = self._applied_revision  # not the one being applied: its probes are not all in
        return NodeReport(
            node=self.node,
            revision=revision,
            boot_id=self.boot_id,
            kernel=self.kernel,
            probes=[self._outcome(p) for p in list(self._probes.values())],
        )

    def _outcome(self, probe: _Probe) -> ProbeOutcome:
        message = probe.message
        if probe.state == "Loaded" and not message:
            message = probe.resolution.pending_message()
        program_ids: list[int] = []
        drops = EventDrops()
        if probe.active is not None:
            program_ids = list(probe.active.program.program_ids)
            drops = self._drops(probe.active)
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
        )

    def _drops(self, active: ActiveProbe) -> EventDrops:
        backlog = self._backlog_drops(active.id) if self._backlog_drops else 0
        try:
            counters = active.program.read_counters()
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
            # Until the old programs are gone, their events still name their pods.
            self.attributor.set_targets([*(previous.probes if previous else []), *state.probes])
            desired = {a.id for a in state.probes}
            for gone in [pid for pid in self._probes if pid not in desired]:
                await self._close(self._probes.pop(gone))
            await self._converge(state.probes, self._clock() if now is None else now)
            # Report in the order of the desired state.
            self._probes = {a.id: self._probes[a.id] for a in state.probes}
            await self._sync_readers()  # new programs get their readers
            self.attributor.set_targets(state.probes)
            self._applied_revision = state.revision
            return self.report()

    async def _retry(self, now: float | None) -> None:
        async with self._apply_lock:
            if self._state is None or self._applied_revision != self._state.revision:
                return
            await self._converge(self._state.probes, self._clock() if now is None else now)
            await self._sync_readers()
        return None

    async def _converge(self, assignments: Sequence[ProbeAssignment], now: float) -> None:
        refused = {a.id: r for a in assignments if (r := refusal(a, self._privileged))}
        planned = [a for a in assignments if not a.spec.suspend and a.id not in refused]
        inputs = await asyncio.to_thread(self._inputs, planned)
        for assignment in assignments:
            if assignment.id in refused:
                current = self._probes.get(assignment.id)
                await self._replace(
                    assignment.id, current, _failed(assignment, refused[assignment.id])
                )
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
        on, the operator pushes again to a restarted agent anyway."""
        if self._store is None:
            return
        try:
            await asyncio.to_thread(self._store.save, state)
        except OSError as exc:
            log.error("could not persist revision %d: %s", state.revision, exc)

    async def _apply_probe(
        self, assignment: ProbeAssignment, inputs: Hashable | None, now: float
    ) -> None:
        current = self._probes.get(assignment.id)
        if assignment.spec.suspend:
            suspended = _Probe(assignment, "Suspended", "Suspended", SUSPENDED_MESSAGE)
            await self._replace(assignment.id, current, suspended)
            return
        if current is not None and inputs is not None and current.inputs == inputs:
            if current.active is not None:
                await self._update_targets(current, assignment)
                return
            if current.retry_at is None or now < current.retry_at:
                current.assignment = assignment  # the same plan failed: not yet again
                return
        built = await asyncio.to_thread(self._plan, assignment)
        try:
            await self._apply_plan(assignment, current, built, inputs, now)
        finally:
            if isinstance(built, ProgramPlan):
                built.held.release()  # a plan that was not loaded still holds its files

    async def _apply_plan(
        self,
        assignment: ProbeAssignment,
        current: _Probe | None,
        built: ProgramPlan | LoadFailure,
        inputs: Hashable | None,
        now: float,
    ) -> None:
        if isinstance(built, LoadFailure):
            failed = _failed(assignment, built, inputs, now, current)
            await self._replace(assignment.id, current, failed)
            return
        key = plan_key(built)
        if current is not None and current.active is not None and current.key == key:
            current.inputs = inputs
            await self._update_targets(current, assignment)
            return
        loaded = await self._load(built)
        if isinstance(loaded, LoadFailure):
            failed = _failed(assignment, loaded, inputs, now, current)
            await self._replace(assignment.id, current, failed)
            return
        fresh = _Probe(assignment, "Loaded", "Loaded", key=key, inputs=inputs)
        fresh.active = ActiveProbe(assignment=assignment, plan=built, program=loaded)
        async with self._filter_lock:
            try:
                await self._fill(fresh, force=True)
            except Exception as exc:
                log.exception("filling the filter of %s", assignment.id)
                await self._close_program(loaded)
                broken = LoadFailure("Failed", "Failed", f"filter update failed: {exc}")
                failed = _failed(assignment, broken, inputs, now, current)
                await self._replace(assignment.id, current, failed)
                return
        # Only now that the new program is attached and filtered does the old one go.
        await self._replace(assignment.id, current, fresh)

    def _plan(self, assignment: ProbeAssignment) -> ProgramPlan | LoadFailure:
        """Build the plan (in a worker thread: uprobes open and scan ELF files)."""
        try:
            plan = self._build_plan(assignment)
        except LoadFailure as failure:
            return failure
        except Exception as exc:  # a builder bug must not take down the other probes
            log.exception("building the program of %s", assignment.id)
            return LoadFailure("Failed", "Failed", f"building the program failed: {exc}")
        try:
            check_confined(assignment, plan)
        except LoadFailure as failure:
            plan.held.release()
            return failure
        return plan

    async def _load(self, plan: ProgramPlan) -> LoadedProgram | LoadFailure:
        def load() -> LoadedProgram:
            with self._one_compile:
                started = time.perf_counter()
                try:
                    return self._loader.load(plan)
                finally:
                    if self._compile_observer is not None:
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
            log.exception("loading the program of %s", plan.probe_id)
            return LoadFailure("Failed", "Failed", f"loading the program failed: {exc}")

    def _close_orphan(self, done: asyncio.Future[LoadedProgram]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        program = done.result()
        log.warning("closing a program whose load was cancelled")

        def close() -> None:
            with self.programs_lock:
                program.close()

        asyncio.get_running_loop().run_in_executor(None, close)

    async def _update_targets(self, probe: _Probe, assignment: ProbeAssignment) -> None:
        async with self._filter_lock:
            probe.assignment = assignment
            assert probe.active is not None
            probe.active.assignment = assignment
            try:
                await self._fill(probe)
            except Exception as exc:
                await self._fail_closed(probe, exc)

    async def _fill(self, probe: _Probe, *, force: bool = False) -> None:
        """Resolve the probe's targets and put them in its filter maps if they changed.
        Caller holds the filter lock, so the recorded resolution is what the kernel has."""
        assert probe.active is not None
        resolution = resolve_targets(probe.assignment.targets, self._cgroups, self._processes)
        if force or resolution.entries != probe.resolution.entries:
            await asyncio.to_thread(probe.active.program.update_filter, resolution.entries)
        probe.resolution = resolution

    async def _fail_closed(self, probe: _Probe, exc: Exception) -> None:
        """A program whose filter could not be updated may trace whom it no longer should:
        close it rather than keep it with stale entries."""
        log.error("filter update of %s failed, closing it: %s", probe.assignment.id, exc)
        active, probe.active = probe.active, None
        probe.state, probe.reason = "Failed", "Failed"
        probe.message = f"filter update failed: {exc}"
        probe.key = ""
        probe.inputs = None  # the next push or retry plans it again
        probe.resolution = Resolution()
        if active is not None:
            await self._stop(active)

    async def _replace(self, probe_id: str, old: _Probe | None, new: _Probe) -> None:
        self._probes[probe_id] = new
        if old is not None and old.active is not None and old.active is not new.active:
            await self._stop(old.active)

    async def _close(self, probe: _Probe) -> None:
        if probe.active is not None:
            active, probe.active = probe.active, None
            await self._stop(active)

    async def _stop(self, active: ActiveProbe) -> None:
        """Close a program that is no longer in the probe table, once nothing reads it."""
        await self._sync_readers()
        await self._close_program(active.program)

    async def _sync_readers(self) -> None:
        probes = self.active_probes()
        for readers in self.readers:
            try:
                await readers.sync(probes)
            except Exception:
                log.exception("syncing the readers of loaded programs failed")

    async def _close_program(self, program: LoadedProgram) -> None:
        def close() -> None:
            with self.programs_lock:
                program.close()

        try:
            await asyncio.to_thread(close)
        except Exception:
            log.exception("closing a program failed")

    # --- cgroup and process changes -----------------------------------------------------------

    async def refresh_targets(self, changes: CgroupChanges | None = None) -> int:
        """Re-resolve targets after cgroup changes (None: the periodic poll of probes whose
        targets can change unseen). Filter updates only. Returns the probes updated."""
        updated = 0
        async with self._filter_lock:
            for probe in list(self._probes.values()):
                if probe.active is None:
                    continue
                targets = probe.assignment.targets
                if changes is None:
                    if not needs_polling(targets, probe.resolution):
                        continue
                elif not changes.concerns(targets):
                    continue
                before = probe.resolution.entries
                try:
                    await self._fill(probe)
                except Exception as exc:
                    await self._fail_closed(probe, exc)
                    continue
                updated += probe.resolution.entries != before
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
            for probe in list(self._probes.values()):
                await self._close(probe)


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
    streak = previous.failures if previous is not None and previous.active is None else 0
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
