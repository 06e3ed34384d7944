"""The reconciler against a fake loader: filter-only updates, no-gap replacement, isolation
of failures, suspend, revisions, cgroup-driven refreshes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.unit.agent_fakes import (
    CID_A,
    UID_A,
    UID_B,
    FakeCgroups,
    FakeLoader,
    FakeProcesses,
    fake_build_plan,
    node_state,
    pod,
    probe,
    unshared_inputs,
)
from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.ports import Attachment, KernelCounters, LoadFailure, ProgramPlan
from tracekeeper_agent.reconcile.reconciler import (
    RETRY_FIRST,
    Reconciler,
    StaleRevision,
    WrongNode,
    check_revision,
    retry_delay,
)
from tracekeeper_agent.reconcile.state_store import StateStore
from tracekeeper_agent.reconcile.tenancy import DEFAULT_PRIVILEGED
from tracekeeper_agent.targets.node import CgroupChanges
from tracekeeper_api.protocol import (
    NodeReport,
    Persistence,
    ProbeAssignment,
    ProbeOutcome,
)


def make(
    loader: FakeLoader | None = None,
    cgroups: FakeCgroups | None = None,
    **kwargs: Any,
) -> tuple[Reconciler, FakeLoader, FakeCgroups]:
    loader = loader or FakeLoader()
    cgroups = cgroups if cgroups is not None else FakeCgroups(pods={UID_A: 500, UID_B: 600})
    kwargs.setdefault("build_plan", fake_build_plan)
    kwargs.setdefault("plan_inputs", unshared_inputs)
    # Most tests use host targets in team-a; the tenancy tests set the privileged namespaces.
    kwargs.setdefault("privileged_namespaces", None)
    reconciler = Reconciler(node="node-1", loader=loader, cgroups=cgroups, **kwargs)
    return reconciler, loader, cgroups


def outcome(report: NodeReport, name: str = "opens") -> ProbeOutcome:
    (found,) = [p for p in report.probes if p.id == f"team-a/{name}"]
    return found


async def test_load_reports_program_ids_and_entries() -> None:
    reconciler, loader, _ = make()
    report = await reconciler.apply(node_state(1, probe()))
    result = outcome(report)
    assert (result.state, result.reason) == ("Loaded", "Loaded")
    program = loader.only("team-a/opens")
    assert result.program_ids == list(program.program_ids)
    assert program.entries.cgroups == {500}
    assert (result.filter_entries, result.pods) == (1, 1)
    assert report.node == "node-1" and report.revision == 1 and report.boot_id


async def test_same_hash_new_targets_updates_the_filter_only() -> None:
    reconciler, loader, _ = make()
    first = outcome(await reconciler.apply(node_state(1, probe())))
    two_pods = {"pods": [pod(), pod(UID_B, "web-1")]}
    second = outcome(await reconciler.apply(node_state(2, probe(targets=two_pods))))
    assert loader.loads == 1 and loader.closes == 0
    assert second.program_ids == first.program_ids
    program = loader.only("team-a/opens")
    assert program.entries.cgroups == {500, 600}
    assert second.filter_entries == 2
    assert len(program.filters) == 2


async def test_unchanged_entries_are_not_rewritten() -> None:
    reconciler, loader, _ = make()
    await reconciler.apply(node_state(1, probe()))
    await reconciler.apply(node_state(2, probe(), probe("other")))
    assert len(loader.only("team-a/opens").filters) == 1


async def test_changed_spec_loads_the_new_program_before_closing_the_old() -> None:
    reconciler, loader, _ = make()
    first = outcome(await reconciler.apply(node_state(1, probe())))
    second = outcome(await reconciler.apply(node_state(2, probe(spec_hash="0000000000000002"))))
    assert second.program_ids != first.program_ids
    old_ids, new_ids = tuple(first.program_ids), tuple(second.program_ids)
    ops = [(op, ids) for op, _, ids in loader.log]
    assert ops.index(("load", new_ids)) < ops.index(("update", new_ids))
    assert ops.index(("update", new_ids)) < ops.index(("close", old_ids))
    assert loader.only("team-a/opens").program_ids == new_ids


async def test_removed_probe_is_closed() -> None:
    reconciler, loader, _ = make()
    await reconciler.apply(node_state(1, probe(), probe("other")))
    report = await reconciler.apply(node_state(2, probe("other")))
    assert [p.id for p in report.probes] == ["team-a/other"]
    assert loader.live("team-a/opens") == []
    assert loader.closes == 1


async def test_a_load_failure_leaves_the_other_probes_loaded() -> None:
    loader = FakeLoader()
    loader.failures["team-a/bad"] = LoadFailure("Failed", "CompileFailed", "error: oops")
    loader.failures["team-a/crash"] = RuntimeError("loader bug")
    reconciler, _, _ = make(loader)
    report = await reconciler.apply(node_state(1, probe(), probe("bad"), probe("crash")))
    assert outcome(report).state == "Loaded"
    bad = outcome(report, "bad")
    assert (bad.state, bad.reason, bad.message) == ("Failed", "CompileFailed", "error: oops")
    assert bad.program_ids == [] and bad.filter_entries == 0
    crash = outcome(report, "crash")
    assert (crash.state, crash.reason) == ("Failed", "Failed")
    assert "loader bug" in crash.message


async def test_builder_failures_are_outcomes() -> None:
    def build(assignment: ProbeAssignment) -> ProgramPlan:
        if assignment.name == "kprobe":
            raise LoadFailure("Unsupported", "Unsupported", "CONFIG_KPROBES is not set")
        if assignment.name == "buggy":
            raise KeyError("oops")
        return fake_build_plan(assignment)

    reconciler, loader, _ = make(build_plan=build)
    report = await reconciler.apply(node_state(1, probe(), probe("kprobe"), probe("buggy")))
    assert outcome(report).state == "Loaded"
    assert outcome(report, "kprobe").state == "Unsupported"
    assert outcome(report, "kprobe").message == "CONFIG_KPROBES is not set"
    assert outcome(report, "buggy").state == "Failed"
    assert loader.loads == 1


async def test_a_deterministic_failure_is_not_recompiled_until_the_spec_changes() -> None:
    loader = FakeLoader()
    loader.failures["team-a/opens"] = LoadFailure("Failed", "CompileFailed", "error: x")
    reconciler, _, _ = make(loader)
    await reconciler.apply(node_state(1, probe()))
    await reconciler.apply(node_state(2, probe(targets={"pods": [pod(UID_B, "web-1")]})))
    assert [op for op, _, _ in loader.log] == ["fail"]
    del loader.failures["team-a/opens"]
    report = await reconciler.apply(node_state(3, probe(spec_hash="0000000000000002")))
    assert outcome(report).state == "Loaded"


async def test_attach_failures_back_off_per_probe() -> None:
    loader = FakeLoader()
    loader.failures["team-a/opens"] = LoadFailure("Failed", "AttachFailed", "no such file")
    reconciler, _, _ = make(loader)
    await reconciler.apply(node_state(1, probe(), probe("other")), now=100.0)
    assert loader.log.count(("fail", "team-a/opens", ())) == 1
    # Pushes within the backoff do not try again (no recompile on every push).
    await reconciler.apply(node_state(2, probe(), probe("other")), now=100.0 + RETRY_FIRST - 1)
    await reconciler.retry(now=100.0 + RETRY_FIRST - 1)
    assert loader.log.count(("fail", "team-a/opens", ())) == 1
    # After it, the next push (or retry tick) tries again; the backoff doubles.
    await reconciler.retry(now=100.0 + RETRY_FIRST)
    assert loader.log.count(("fail", "team-a/opens", ())) == 2
    await reconciler.retry(now=100.0 + RETRY_FIRST + 2 * RETRY_FIRST - 1)
    assert loader.log.count(("fail", "team-a/opens", ())) == 2
    del loader.failures["team-a/opens"]
    await reconciler.apply(node_state(3, probe(), probe("other")), now=100.0 + 3 * RETRY_FIRST)
    assert outcome(reconciler.report()).state == "Loaded"
    assert loader.loads == 2  # "other" once, "opens" once it could


def test_retry_delay_doubles_up_to_a_limit() -> None:
    assert [retry_delay(n, 10, 60) for n in (1, 2, 3, 4, 100)] == [10, 20, 40, 60, 60]


async def test_plans_are_built_only_for_changed_probes() -> None:
    built: list[str] = []

    def build(assignment: ProbeAssignment) -> ProgramPlan:
        built.append(assignment.id)
        return fake_build_plan(assignment)

    reconciler, loader, _ = make(build_plan=build)
    await reconciler.apply(node_state(1, probe(), probe("b")))
    assert sorted(built) == ["team-a/b", "team-a/opens"]
    built.clear()
    two_pods = {"pods": [pod(), pod(UID_B, "web-1")]}
    await reconciler.apply(
        node_state(2, probe(targets=two_pods), probe("b", spec_hash="0000000000000002"))
    )
    assert built == ["team-a/b"]  # new targets of the same spec: map entries only
    assert loader.only("team-a/opens").entries.cgroups == {500, 600}


async def test_plans_are_built_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def build(assignment: ProbeAssignment) -> ProgramPlan:
        threads.append(threading.get_ident())
        return fake_build_plan(assignment)

    reconciler, _, _ = make(build_plan=build)
    await reconciler.apply(node_state(1, probe()))
    assert threads and loop_thread not in threads


async def test_changed_plan_inputs_plan_again() -> None:
    # A uprobe's inputs include the resolved file: a new image means a new plan.
    files = {"team-a/opens": "inode-1"}
    built: list[str] = []

    def build(assignment: ProbeAssignment) -> ProgramPlan:
        built.append(files[assignment.id])
        plan = fake_build_plan(assignment)
        attach = Attachment("uprobe", "f", "sym", "/x", binary_id=(1, hash(files[plan.shape])))
        return ProgramPlan(**{**plan.__dict__, "attachments": (attach,)})

    reconciler, loader, _ = make(build_plan=build, plan_inputs=lambda a: files[a.id])
    await reconciler.apply(node_state(1, probe()))
    await reconciler.retry()
    assert built == ["inode-1"]
    first = loader.only("team-a/opens").program_ids
    files["team-a/opens"] = "inode-2"
    await reconciler.retry()
    assert built == ["inode-1", "inode-2"]
    assert loader.only("team-a/opens").program_ids != first


async def test_an_apply_completes_when_its_caller_is_cancelled() -> None:
    loader = FakeLoader()
    loader.gate = threading.Event()
    reconciler, _, _ = make(loader)
    caller = asyncio.create_task(reconciler.apply(node_state(1, probe(), probe("b"))))
    assert await asyncio.to_thread(loader.loading.wait, 10)
    caller.cancel()  # the client went away mid-compile
    with pytest.raises(asyncio.CancelledError):
        await caller
    loader.gate.set()
    report = await reconciler.apply(node_state(1, probe(), probe("b")))  # waits for it
    assert [p.state for p in report.probes] == ["Loaded", "Loaded"]
    assert report.revision == 1
    # Every program the loader made is one the agent reports, and nothing else lives.
    live = {p.program_ids for p in loader.programs if not p.closed}
    assert live == {tuple(p.program_ids) for p in report.probes}
    assert loader.max_concurrent == 1


async def test_a_cancelled_load_closes_what_it_loaded() -> None:
    loader = FakeLoader()
    loader.gate = threading.Event()
    reconciler, _, _ = make(loader)
    plan = fake_build_plan(ProbeAssignment.model_validate(probe()))
    load = asyncio.create_task(reconciler._load(plan))
    assert await asyncio.to_thread(loader.loading.wait, 10)
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    loader.gate.set()
    for _ in range(200):
        if loader.closes:
            break
        await asyncio.sleep(0.01)
    assert loader.loads == 1 and loader.closes == 1


# --- the agent's own tenancy check ---------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "spec", "field"),
    [
        ({"pids": [1]}, None, "pids"),
        ({"cgroupPaths": ["/system.slice"]}, None, "cgroupPaths"),
        ({"hostWide": True}, None, "hostWide"),
        (None, {"program": {"source": "int x;"}}, "program"),
        (None, {"filter": {"namespaceSelector": {"matchLabels": {"a": "b"}}}}, "namespaceSelector"),
    ],
)
async def test_a_tenant_probe_with_a_privileged_field_is_refused(
    targets: dict[str, Any] | None, spec: dict[str, Any] | None, field: str
) -> None:
    reconciler, loader, _ = make(privileged_namespaces=DEFAULT_PRIVILEGED)
    bad = probe("bad", targets=targets)
    if spec is not None:
        bad["spec"] = {**bad["spec"], **spec}
        if "program" in spec:
            del bad["spec"]["tracepoint"]
    report = await reconciler.apply(node_state(1, probe(), bad))
    refused = outcome(report, "bad")
    assert (refused.state, refused.reason) == ("Failed", "NotPermitted")
    assert field in refused.message
    assert outcome(report).state == "Loaded"
    assert [p.plan.shape for p in loader.programs] == ["team-a/opens"]


async def test_a_tenant_probe_with_another_namespaces_pod_is_refused() -> None:
    reconciler, loader, _ = make(privileged_namespaces=DEFAULT_PRIVILEGED)
    foreign = {"pods": [pod(), {**pod(UID_B, "db-0"), "namespace": "team-b"}]}
    report = await reconciler.apply(node_state(1, probe(), probe("wide", targets=foreign)))
    refused = outcome(report, "wide")
    assert (refused.state, refused.reason) == ("Failed", "NotPermitted")
    assert "team-b" not in refused.message and "db-0" not in refused.message
    assert outcome(report).state == "Loaded" and loader.live("team-a/wide") == []
    # A loaded probe widened by a later push is closed, not widened.
    report = await reconciler.apply(node_state(2, probe(targets=foreign), probe("wide")))
    assert outcome(report).reason == "NotPermitted" and loader.live("team-a/opens") == []
    assert outcome(report, "wide").state == "Loaded"


async def test_privileged_namespaces_may_use_privileged_fields() -> None:
    reconciler, _, _ = make(privileged_namespaces=frozenset({"team-a"}))
    report = await reconciler.apply(node_state(1, probe(targets={"pids": [1]})))
    assert outcome(report).state == "Loaded"
    trusting, _, _ = make(privileged_namespaces=None)  # standalone: the host's own file
    report = await trusting.apply(node_state(1, probe(targets={"hostWide": True})))
    assert outcome(report).state == "Loaded"


async def test_a_failed_replacement_closes_the_old_program() -> None:
    # The user asked for something else: the old program must not keep running.
    reconciler, loader, _ = make()
    await reconciler.apply(node_state(1, probe()))
    loader.failures["team-a/opens"] = LoadFailure("Failed", "CompileFailed", "error: y")
    report = await reconciler.apply(node_state(2, probe(spec_hash="0000000000000002")))
    assert outcome(report).state == "Failed"
    assert loader.live("team-a/opens") == []


async def test_suspend_unloads_and_resume_loads_again() -> None:
    reconciler, loader, _ = make()
    await reconciler.apply(node_state(1, probe()))
    suspended = outcome(await reconciler.apply(node_state(2, probe(suspend=True))))
    assert (suspended.state, suspended.reason) == ("Suspended", "Suspended")
    assert suspended.program_ids == [] and loader.live("team-a/opens") == []
    resumed = outcome(await reconciler.apply(node_state(3, probe())))
    assert resumed.state == "Loaded" and loader.loads == 2


async def test_only_host_wide_bindings_match_every_process() -> None:
    # processNames alone narrows, never widens: without pods or pids nothing matches.
    reconciler, loader, _ = make()
    report = await reconciler.apply(
        node_state(
            1,
            probe(targets={"processNames": ["nginx"]}),
            probe("host", targets={"hostWide": True, "processNames": ["nginx"]}),
        )
    )
    assert outcome(report).state == outcome(report, "host").state == "Loaded"
    assert loader.only("team-a/opens").maps.host_mask == 0
    assert loader.only("team-a/host").maps.host_mask == 1
    assert loader.only("team-a/opens").maps.comms == {"nginx": 1}


async def test_a_probe_whose_pods_have_no_cgroup_waits_for_the_kernel_to_claim_them() -> None:
    reconciler, loader, cgroups = make(cgroups=FakeCgroups())
    report = await reconciler.apply(node_state(1, probe()))
    result = outcome(report)
    assert result.state == "Loaded" and result.filter_entries == 0  # no cgroup yet
    program = loader.only("team-a/opens")
    assert program.entries.size == 0  # no cgroup has the slot yet: nothing matches
    assert result.message == "waiting for the cgroups of pod team-a/web-0"
    # Its paths, every QoS class, wait in the pending table with the slot its mask names.
    pending = loader.identities.pending
    assert sorted(pending) == sorted(cgroups.pod_cgroup_paths(UID_A)) and len(pending) == 3
    (slot,) = set(pending.values())
    assert program.maps.slot_masks == {slot: 1}
    claims = report.cgroup_claims
    assert (claims.pending_pods, claims.pending_paths, claims.left_out_pods) == (1, 3, 0)
    # mkdir: the kernel writes the entry; the agent's later writes keep it, and it counts.
    path = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
    assert loader.identities.mkdir(path + UID_A.replace("-", "_") + ".slice", 900)
    await reconciler.refresh_targets(CgroupChanges(everything=True))
    assert program.entries.cgroups == {900}
    assert reconciler.report().cgroup_claims.claimed == 1
    # inotify then reports it: the same slot, nothing pending any more.
    cgroups.pods[UID_A] = 900
    await reconciler.refresh_targets(CgroupChanges(frozenset({UID_A})))
    assert loader.identities.table == {900: slot} and loader.identities.pending == {}
    assert program.maps.slot_masks == {slot: 1}
    assert outcome(reconciler.report()).message == ""


async def test_a_pod_no_probe_targets_any_more_releases_its_slot_and_claims() -> None:
    reconciler, loader, _ = make(cgroups=FakeCgroups())
    await reconciler.apply(node_state(1, probe(), probe("b", targets={"pods": [pod(UID_B)]})))
    slot = loader.identities.pending[next(iter(FakeCgroups().pod_cgroup_paths(UID_A)))]
    assert loader.identities.mkdir(FakeCgroups().pod_cgroup_paths(UID_A)[1], 900)
    await reconciler.apply(node_state(2, probe("b", targets={"pods": [pod(UID_B)]})))
    # The agent never learned of cgroup 900, yet its claim goes before the slot is free.
    assert loader.identities.released == [{slot}]
    assert 900 not in loader.identities.table
    assert all(s != slot for s in loader.identities.pending.values())


# --- revisions ------------------------------------------------------------------------------


def test_check_revision() -> None:
    applied = node_state(5, probe())
    assert check_revision(None, node_state(0, probe())) is False
    assert check_revision(applied, node_state(5, probe())) is True
    assert check_revision(applied, node_state(6, probe())) is False
    with pytest.raises(StaleRevision, match="older than the applied revision 5") as info:
        check_revision(applied, node_state(4, probe()))
    assert info.value.applied_revision == 5
    with pytest.raises(StaleRevision, match="different content"):
        check_revision(applied, node_state(5, probe("other")))


async def test_stale_revision_changes_nothing() -> None:
    reconciler, loader, _ = make()
    await reconciler.apply(node_state(5, probe()))
    with pytest.raises(StaleRevision):
        await reconciler.apply(node_state(4))
    assert reconciler.report().revision == 5
    assert loader.live("team-a/opens")


async def test_same_revision_same_content_is_idempotent() -> None:
    reconciler, loader, _ = make()
    first = await reconciler.apply(node_state(3, probe()))
    again = await reconciler.apply(node_state(3, probe()))
    assert again == first
    assert loader.loads == 1 and len(loader.only("team-a/opens").filters) == 1


async def test_a_state_for_another_node_is_refused() -> None:
    reconciler, loader, _ = make()
    with pytest.raises(WrongNode, match="node-1"):
        await reconciler.apply(node_state(1, probe(), node="node-2"))
    assert reconciler.state is None and loader.loads == 0


# --- cgroup changes and polling ---------------------------------------------------------------


async def test_a_pending_pod_is_added_when_its_cgroup_appears() -> None:
    reconciler, loader, cgroups = make(cgroups=FakeCgroups())
    first = outcome(await reconciler.apply(node_state(1, probe())))
    cgroups.pods[UID_A] = 777
    updated = await reconciler.refresh_targets(CgroupChanges(pod_uids=frozenset({UID_A})))
    assert updated == 1
    program = loader.only("team-a/opens")
    assert program.entries.cgroups == {777}
    after = outcome(reconciler.report())
    assert after.program_ids == first.program_ids and after.filter_entries == 1
    assert after.message == "" and loader.loads == 1


async def test_changes_of_other_pods_do_not_touch_the_probe() -> None:
    reconciler, loader, cgroups = make()
    await reconciler.apply(node_state(1, probe()))
    cgroups.pods[UID_A] = 501  # would change the entry, but the event names another pod
    assert await reconciler.refresh_targets(CgroupChanges(pod_uids=frozenset({UID_B}))) == 0
    assert len(loader.only("team-a/opens").filters) == 1


async def test_polling_follows_children_and_cgroup_paths() -> None:
    processes = FakeProcesses()
    reconciler, loader, cgroups = make(processes=processes)
    targets = {"pids": [10], "followChildren": True, "cgroupPaths": ["/system.slice/a.service"]}
    await reconciler.apply(node_state(1, probe(targets=targets), probe("pods")))
    processes.children[10] = [11]
    cgroups.paths["/system.slice/a.service"] = 42
    assert await reconciler.refresh_targets() == 1  # the pod probe needs no polling
    entries = loader.only("team-a/opens").entries
    assert entries.pids == {10, 11} and entries.cgroups == {42}
    assert len(loader.only("team-a/pods").filters) == 1


async def test_a_failed_filter_update_closes_the_program() -> None:
    reconciler, loader, cgroups = make()
    await reconciler.apply(node_state(1, probe(), probe("other")))
    loader.only("team-a/opens").fail_update = OSError("map full")
    cgroups.containers[(UID_A, CID_A)] = 501  # the probe's container starts: a new entry
    app = {"name": "app", "containerId": f"containerd://{CID_A}"}
    targets = {"pods": [pod(allContainers=False, containers=[app])]}
    await reconciler.apply(node_state(2, probe(targets=targets), probe("other")))
    result = outcome(reconciler.report())
    assert result.state == "Failed" and "map full" in result.message
    assert loader.live("team-a/opens") == []
    assert outcome(reconciler.report(), "other").state == "Loaded"
    # The next push tries again, with a new program.
    report = await reconciler.apply(node_state(3, probe(), probe("other")))
    assert outcome(report).state == "Loaded"


# --- threads, readers, reports -----------------------------------------------------------------


async def test_compiles_run_off_the_loop_one_at_a_time() -> None:
    loader = FakeLoader()
    loader.gate = threading.Event()
    reconciler, _, _ = make(loader)
    first = asyncio.create_task(reconciler.apply(node_state(1, probe(), probe("b"))))
    second = asyncio.create_task(reconciler.apply(node_state(2, probe(), probe("b"), probe("c"))))
    assert await asyncio.to_thread(loader.loading.wait, 10)
    # The loop still serves while a compile blocks its worker thread, and reports the
    # revision fully applied, not the one in progress.
    assert reconciler.report().probes == [] and reconciler.report().revision == 0
    assert await reconciler.refresh_targets() == 0
    loader.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), timeout=10)
    assert loader.max_concurrent == 1
    assert loader.loads == 3
    assert outcome(reconciler.report(), "c").state == "Loaded"


async def test_compile_times_are_observed() -> None:
    seconds: list[float] = []
    reconciler, _, _ = make(compile_observer=seconds.append)
    await reconciler.apply(node_state(1, probe(), probe("b")))
    assert len(seconds) == 2 and all(s >= 0 for s in seconds)


async def test_an_adopted_program_is_counted_not_timed_as_a_compile() -> None:
    seconds: list[float] = []
    adopted: list[None] = []
    reconciler, loader, _ = make(
        compile_observer=seconds.append, adopt_observer=lambda: adopted.append(None)
    )
    loader.adopting = {"team-a/b"}
    await reconciler.apply(node_state(1, probe(), probe("b")))
    assert (len(seconds), len(adopted)) == (1, 1)


class RecordingReaders:
    """Checks what an EventHub relies on: it is synced before a program closes."""

    def __init__(self) -> None:
        self.synced: list[list[tuple[int, ...]]] = []

    async def sync(self, probes: Sequence[ActiveProbe]) -> None:
        for p in probes:
            assert not getattr(p.program, "closed", False), "a closed program is still read"
        self.synced.append([tuple(p.program.program_ids) for p in probes])


async def test_readers_let_go_of_a_program_before_it_closes() -> None:
    reconciler, loader, _ = make()
    readers = RecordingReaders()
    reconciler.board.add_reader(readers)
    first = outcome(await reconciler.apply(node_state(1, probe())))
    assert readers.synced[-1] == [tuple(first.program_ids)]
    await reconciler.apply(node_state(2, probe(spec_hash="0000000000000002")))
    new_ids = loader.only("team-a/opens").program_ids
    assert [tuple(first.program_ids)] not in readers.synced[1:]
    assert readers.synced[-1] == [new_ids]
    await reconciler.apply(node_state(3))
    assert readers.synced[-1] == []


async def test_report_carries_drops_and_counts() -> None:
    reconciler, loader, _ = make()
    await reconciler.apply(node_state(1, probe(output={"kind": "events"})))
    loader.only("team-a/opens").counters = KernelCounters(rate_limited=3, ring_full=2)
    reconciler.active_probes()[0].counts.backlog = 7
    drops = outcome(reconciler.report()).drops
    assert (drops.rate_limited, drops.ring_full, drops.backlog) == (3, 2, 7)
    active = reconciler.active_probes()
    assert [p.id for p in active] == ["team-a/opens"]
    assert active[0].filter_entries == 1
    assert reconciler.attributor.identify(500) is not None


async def test_report_follows_the_desired_order() -> None:
    reconciler, _, _ = make()
    await reconciler.apply(node_state(1, probe("b"), probe("a")))
    report = await reconciler.apply(node_state(2, probe("a"), probe("c"), probe("b")))
    assert [p.id for p in report.probes] == ["team-a/a", "team-a/c", "team-a/b"]


async def test_close_detaches_everything() -> None:
    reconciler, loader, _ = make()
    await reconciler.apply(node_state(1, probe(), probe("b")))
    await reconciler.close()
    assert loader.closes == 2 and reconciler.active_probes() == []


# --- persistence ---------------------------------------------------------------------------------


async def test_a_restarted_agent_resumes_the_persisted_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    reconciler, _, _ = make(store=store)
    await reconciler.apply(node_state(4, probe(), probe("b", suspend=True)))

    restarted, loader, _ = make(store=StateStore(tmp_path))
    assert restarted.boot_id != reconciler.boot_id
    restored = await restarted.restore()
    assert restored is not None and restored.revision == 4
    report = restarted.report()
    assert report.revision == 4
    assert outcome(report).state == "Loaded" and outcome(report, "b").state == "Suspended"
    assert loader.loads == 1
    with pytest.raises(StaleRevision):  # the restored revision counts
        await restarted.apply(node_state(3))


async def test_restore_does_not_undo_a_newer_push(tmp_path: Path) -> None:
    reconciler, _, _ = make(store=StateStore(tmp_path))
    await reconciler.apply(node_state(4, probe()))
    restarted, loader, _ = make(store=StateStore(tmp_path))
    await restarted.apply(node_state(9, probe("b")))  # the operator was faster
    await restarted.restore()
    assert restarted.report().revision == 9 and loader.live("team-a/opens") == []


async def test_restore_ignores_another_nodes_state(tmp_path: Path) -> None:
    StateStore(tmp_path).save(node_state(4, probe(), node="node-2"))
    restarted, loader, _ = make(store=StateStore(tmp_path))
    assert await restarted.restore() is None
    assert restarted.state is None and loader.loads == 0


async def test_poll_targets_runs_until_cancelled() -> None:
    reconciler, loader, cgroups = make()
    targets = {"cgroupPaths": ["/system.slice/a.service"]}
    await reconciler.apply(node_state(1, probe(targets=targets)))
    program = loader.only("team-a/opens")
    program.updated.clear()
    task = asyncio.create_task(reconciler.poll_targets(interval=0.01))
    try:
        cgroups.paths["/system.slice/a.service"] = 42
        assert await asyncio.to_thread(program.updated.wait, 10)
        assert program.entries.cgroups == {42}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_failed_save_does_not_stop_tracing(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    reconciler, _, _ = make(store=StateStore(tmp_path / "not-a-dir"))
    report = await reconciler.apply(node_state(1, probe()))
    assert outcome(report).state == "Loaded" and report.revision == 1
    # Said in the report (issue 18: a full state dir was only logged), kept at 0 on disk.
    assert report.persisted.revision == 0 and report.persisted.error is not None
    assert "revision 1 not saved" in report.persisted.error


async def test_a_failed_save_is_retried_by_the_poll_and_restore_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    reconciler, _, _ = make(store=store)
    await reconciler.apply(node_state(1, probe()))
    real_replace = os.replace

    def full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    report = await reconciler.apply(node_state(2, probe("b")))
    assert outcome(report, "b").state == "Loaded"  # tracing goes on
    assert report.persisted.revision == 1 and report.persisted.error is not None
    on_disk = StateStore(tmp_path).load()  # the old file, whole
    assert on_disk is not None and on_disk.revision == 1
    await reconciler.retry()
    assert reconciler.report().persisted.error is not None  # still full

    monkeypatch.setattr(os, "replace", real_replace)
    await reconciler.retry()  # the 2 s poll's call
    assert reconciler.report().persisted == Persistence(revision=2)
    on_disk = StateStore(tmp_path).load()
    assert on_disk is not None and on_disk.revision == 2

    monkeypatch.setattr(os, "replace", full)  # full again: a restart needs no write
    restarted, _, _ = make(store=StateStore(tmp_path))
    await restarted.restore()
    assert restarted.report().persisted == Persistence(revision=2)


async def test_a_cgroup_learned_through_inotify_invalidates_cached_verdicts() -> None:
    """A pending pod's slot already has its bit; when inotify (not the kernel's claim)
    brings its cgroup, only the identity table changes, yet a process that ran in the pod
    before this write has a cached miss: every program's verdicts must be recomputed."""
    reconciler, loader, cgroups = make(cgroups=FakeCgroups())
    await reconciler.apply(node_state(1, probe(), probe("b", targets={"pods": [pod(UID_B)]})))
    program, other = loader.only("team-a/opens"), loader.only("team-a/b")
    maps, before, other_before = program.maps, program.invalidations, other.invalidations
    cgroups.pods[UID_A] = 900
    await reconciler.refresh_targets(CgroupChanges(frozenset({UID_A})))
    assert program.maps == maps  # the same masks: the slot had its bit while pending
    assert 900 in loader.identities.table and program.invalidations == before + 1
    # A program whose masks do not name the pod's slot has a miss for it either way.
    assert other.invalidations == other_before
    # Nothing moved: no invalidation.
    await reconciler.refresh_targets(CgroupChanges(frozenset({UID_A})))
    assert program.invalidations == before + 1
