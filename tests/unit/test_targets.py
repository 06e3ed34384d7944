"""ProbeTargets -> filter entries on this node, pending targets, attribution."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from tests.unit.agent_fakes import CID_A, UID_A, UID_B, FakeCgroups, FakeProcesses
from tracekeeper_agent.ports import PodEntry, PodIdentity
from tracekeeper_agent.targets.attribution import TargetAttributor
from tracekeeper_agent.targets.cgroup_watch import CgroupEvent, CgroupEventKind, CgroupWatcher
from tracekeeper_agent.targets.cgroups import CgroupIndex
from tracekeeper_agent.targets.node import CgroupChanges, NodeCgroups, follow_cgroups
from tracekeeper_agent.targets.processes import ProcTable, parse_ppid
from tracekeeper_agent.targets.resolution import resolve_targets
from tracekeeper_api.protocol import ProbeAssignment, ProbeTargets


def targets(**fields: object) -> ProbeTargets:
    return ProbeTargets.model_validate(fields)


def pod(uid: str = UID_A, name: str = "web-0", **extra: object) -> dict[str, object]:
    return {"uid": uid, "namespace": "team-a", "name": name, **extra}


# --- resolution with a fake lookup ----------------------------------------------------------


def test_all_containers_pod_is_its_pod_level_cgroup() -> None:
    cgroups = FakeCgroups(pods={UID_A: 500}, containers={(UID_A, "c1"): 501, (UID_A, "c2"): 502})
    res = resolve_targets(targets(pods=[pod()]), cgroups)
    assert res.entries.pods == {PodEntry(UID_A, 500)}  # one entry covers every container
    assert not res.entries.cgroups
    assert (res.pods, res.containers, res.pending) == (1, 2, ())


def test_listed_containers_are_their_own_cgroups() -> None:
    cgroups = FakeCgroups(pods={UID_A: 500}, containers={(UID_A, CID_A): 501})
    t = targets(
        pods=[
            pod(
                allContainers=False,
                containers=[
                    {"name": "app", "containerId": f"containerd://{CID_A}"},
                    {"name": "sidecar"},
                ],
            )
        ]
    )
    res = resolve_targets(t, cgroups)
    assert res.entries.cgroups == {501}
    assert (res.pods, res.containers) == (1, 1)
    assert res.pending == ("container team-a/web-0/sidecar (not started)",)


def test_pod_without_cgroup_yet_is_pending_with_the_paths_it_will_get() -> None:
    cgroups = FakeCgroups()
    res = resolve_targets(targets(pods=[pod(), pod(UID_B.upper(), "web-1")]), cgroups)
    assert not res.entries.cgroups  # no cgroup matches yet; the kernel claims them at mkdir
    assert res.entries.pods == {
        PodEntry(UID_A, None, cgroups.pod_cgroup_paths(UID_A)),
        PodEntry(UID_B, None, cgroups.pod_cgroup_paths(UID_B)),  # kubelet's lower case
    }
    assert res.pending == ("pod team-a/web-0", "pod team-a/web-1")
    assert res.pending_message() == "waiting for the cgroups of pod team-a/web-0, pod team-a/web-1"


def test_pending_message_is_bounded() -> None:
    pods = [pod(f"{i:08x}-0000-4000-8000-000000000000", f"p{i}") for i in range(12)]
    message = resolve_targets(targets(pods=pods), FakeCgroups()).pending_message()
    assert message.endswith("and 7 more")


def test_pids_comms_and_cgroup_paths() -> None:
    cgroups = FakeCgroups(paths={"/system.slice/nginx.service": 900})
    t = targets(
        pids=[10, 20],
        processNames=["nginx"],
        cgroupPaths=["/system.slice/nginx.service", "/system.slice/gone.service"],
    )
    res = resolve_targets(t, cgroups)
    assert res.entries.cgroups == {900}
    assert res.entries.pids == {10, 20}
    assert res.entries.comms == {"nginx"}
    assert res.pending == ("cgroup /system.slice/gone.service",)


def test_follow_children_adds_live_descendants() -> None:
    processes = FakeProcesses(children={10: [11, 12], 12: [13], 99: [100]})
    t = targets(pids=[10], followChildren=True)
    assert resolve_targets(t, FakeCgroups(), processes).entries.pids == {10, 11, 12, 13}
    plain = targets(pids=[10])
    assert resolve_targets(plain, FakeCgroups(), processes).entries.pids == {10}


def test_process_names_alone_select_no_process() -> None:
    # Names narrow the other targets; without pods, pids or cgroups they select nothing.
    res = resolve_targets(targets(processNames=["nginx"]), FakeCgroups())
    assert not res.entries.cgroups and not res.entries.pids


# --- cgroup changes -------------------------------------------------------------------------


def test_changes_concern_targeted_pods_and_paths() -> None:
    t = targets(pods=[pod()], cgroupPaths=["/system.slice/a.service"])
    assert CgroupChanges(pod_uids=frozenset({UID_A})).concerns(t)
    assert not CgroupChanges(pod_uids=frozenset({UID_B})).concerns(t)
    assert CgroupChanges(paths=frozenset({"/system.slice/a.service"})).concerns(t)
    assert CgroupChanges(paths=frozenset({"/system.slice"})).concerns(t)  # parent recreated
    assert not CgroupChanges(paths=frozenset({"/system.slice/a.serviceX"})).concerns(t)
    assert CgroupChanges(everything=True).concerns(targets())
    assert not CgroupChanges()


# --- the real index on a directory tree -------------------------------------------------------

SYSTEMD_QOS = "kubepods.slice/kubepods-burstable.slice"


def systemd_pod_dir(root: Path, uid: str = UID_A) -> Path:
    return root / SYSTEMD_QOS / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / SYSTEMD_QOS).mkdir(parents=True)
    (tmp_path / "system.slice").mkdir()
    return tmp_path


def node_cgroups(root: Path) -> NodeCgroups:
    index = CgroupIndex(root)
    index.rescan()
    return NodeCgroups(index)


def test_node_cgroups_resolves_systemd_layout(root: Path) -> None:
    pod_dir = systemd_pod_dir(root)
    container_dir = pod_dir / f"cri-containerd-{CID_A}.scope"
    container_dir.mkdir(parents=True)
    (root / "system.slice" / "nginx.service").mkdir()
    cgroups = node_cgroups(root)
    assert cgroups.pod_cgroup_id(UID_A) == os.stat(pod_dir).st_ino
    assert (
        cgroups.container_cgroup_id(UID_A, f"containerd://{CID_A}") == os.stat(container_dir).st_ino
    )
    assert cgroups.container_cgroup_id(UID_A, "containerd://not-hex!") is None
    assert cgroups.pod_container_ids(UID_A) == {CID_A}
    assert (
        cgroups.path_cgroup_id("/system.slice/nginx.service")
        == os.stat(root / "system.slice" / "nginx.service").st_ino
    )
    assert cgroups.path_cgroup_id("/system.slice/absent.service") is None


def test_node_cgroups_resolves_cgroupfs_layout(tmp_path: Path) -> None:
    pod_dir = tmp_path / "kubepods" / "besteffort" / f"pod{UID_B}"
    (pod_dir / CID_A).mkdir(parents=True)
    cgroups = node_cgroups(tmp_path)
    assert cgroups.pod_cgroup_id(UID_B) == os.stat(pod_dir).st_ino
    assert (
        cgroups.container_cgroup_id(UID_B, f"docker://{CID_A}") == os.stat(pod_dir / CID_A).st_ino
    )


def test_watcher_events_resolve_a_pending_pod_before_its_containers(root: Path) -> None:
    cgroups = node_cgroups(root)
    t = targets(pods=[pod()])
    assert resolve_targets(t, cgroups).pending == ("pod team-a/web-0",)
    with CgroupWatcher(root) as watcher:
        pod_dir = systemd_pod_dir(root)
        pod_dir.mkdir()  # kubelet creates the pod cgroup before any container
        changes = cgroups.apply_events(watcher.read())
        assert changes.pod_uids == {UID_A}
        assert changes.concerns(t)
        res = resolve_targets(t, cgroups)
        assert res.entries.pods == {PodEntry(UID_A, os.stat(pod_dir).st_ino)}
        assert res.containers == 0

        container_dir = pod_dir / f"cri-containerd-{CID_A}.scope"
        container_dir.mkdir()
        cgroups.apply_events(watcher.read())
        assert resolve_targets(t, cgroups).containers == 1

        container_dir.rmdir()
        pod_dir.rmdir()
        changes = cgroups.apply_events(watcher.read())
        assert changes.pod_uids == {UID_A}
        (gone,) = resolve_targets(t, cgroups).entries.pods
        assert gone.cgroup_id is None and gone.paths  # pending again


def test_apply_events_overflow_concerns_everything(root: Path) -> None:
    cgroups = node_cgroups(root)
    changes = cgroups.apply_events([CgroupEvent(CgroupEventKind.OVERFLOW, root, 0)])
    assert changes.everything


def test_apply_events_reports_paths_outside_pods(root: Path) -> None:
    cgroups = node_cgroups(root)
    path = root / "system.slice" / "x.service"
    path.mkdir()
    changes = cgroups.apply_events([CgroupEvent(CgroupEventKind.CREATED, path, 7)])
    assert changes.paths == {"/system.slice/x.service"}
    assert changes.pod_uids == frozenset()


# --- processes ---------------------------------------------------------------------------------


def test_parse_ppid_survives_odd_comms() -> None:
    assert parse_ppid("42 (a) b) c) S 7 42 42 0") == 7
    assert parse_ppid("42 (sh) S 1 42") == 1
    assert parse_ppid("") is None
    assert parse_ppid("42 (x) S notanumber") is None


def test_proc_table_walks_a_proc_tree(tmp_path: Path) -> None:
    for pid, ppid in [(1, 0), (10, 1), (11, 10), (12, 11), (20, 1)]:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (p {pid}) S {ppid} 0 0")
    (tmp_path / "self").mkdir()
    assert ProcTable(tmp_path).descendants([10]) == {11, 12}
    assert ProcTable(tmp_path).descendants([20]) == frozenset()


def test_proc_table_on_this_process() -> None:
    assert os.getpid() in ProcTable().descendants([os.getppid()])


# --- attribution --------------------------------------------------------------------------------


def assignment(*pods: dict[str, object]) -> ProbeAssignment:
    return ProbeAssignment.model_validate(
        {
            "id": "team-a/opens",
            "specHash": "0000000000000001",
            "spec": {"tracepoint": "syscalls:sys_enter_openat"},
            "targets": {"pods": list(pods)},
        }
    )


def test_attributor_names_pods_and_containers() -> None:
    cgroups = FakeCgroups(
        pods={UID_A: 500, UID_B: 600},
        containers={(UID_A, CID_A): 501, (UID_A, "b" * 64): 502},
    )
    attributor = TargetAttributor(cgroups)
    attributor.set_targets(
        [assignment(pod(containers=[{"name": "app", "containerId": f"containerd://{CID_A}"}]))]
    )
    assert attributor.identify(501) == PodIdentity("team-a", "web-0", "app")
    assert attributor.identify(500) == PodIdentity("team-a", "web-0", "")
    assert attributor.identify(502) == PodIdentity("team-a", "web-0", "")  # restarted, unnamed
    assert attributor.identify(600) is None  # a pod no probe targets
    assert attributor.identify(12345) is None  # not a pod's cgroup


def test_attributor_on_the_real_index(root: Path) -> None:
    container_dir = systemd_pod_dir(root) / f"cri-containerd-{CID_A}.scope"
    nested = container_dir / "init.scope"  # a task in a cgroup below the container's
    nested.mkdir(parents=True)
    attributor = TargetAttributor(node_cgroups(root))
    attributor.set_targets(
        [assignment(pod(containers=[{"name": "app", "containerId": f"containerd://{CID_A}"}]))]
    )
    expected = PodIdentity("team-a", "web-0", "app")
    assert attributor.identify(os.stat(container_dir).st_ino) == expected
    assert attributor.identify(os.stat(nested).st_ino) == expected


async def test_follow_cgroups_hands_batches_to_the_reconciler(root: Path) -> None:
    cgroups = node_cgroups(root)
    seen: list[CgroupChanges] = []
    arrived = asyncio.Event()

    async def on_changes(changes: CgroupChanges) -> None:
        seen.append(changes)
        arrived.set()

    with CgroupWatcher(root) as watcher:
        task = asyncio.create_task(follow_cgroups(watcher, cgroups, on_changes))
        try:
            pod_dir = systemd_pod_dir(root)
            (pod_dir / f"cri-containerd-{CID_A}.scope").mkdir(parents=True)
            async with asyncio.timeout(10):
                while not seen or cgroups.pod_cgroup_id(UID_A) is None:
                    arrived.clear()
                    await arrived.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert all(c.pod_uids == {UID_A} for c in seen)
    assert cgroups.pod_cgroup_id(UID_A) == os.stat(pod_dir).st_ino
