"""The watcher on real cgroup2 directories: kernfs must deliver the same inotify events."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tracekeeper_agent.targets.cgroup_watch import CgroupEvent, CgroupEventKind, CgroupWatcher
from tracekeeper_agent.targets.cgroups import CgroupIndex, CgroupOwner, Runtime, cgroup_id
from tracekeeper_sim.kubelet import (
    CgroupDriver,
    QosClass,
    container_cgroup_relpath,
    create_cgroup,
    pod_cgroup_relpath,
)

pytestmark = pytest.mark.kernel

UID = "0b7e6f5a-4d3c-4b2a-9180-7f6e5d4c3b2a"
CID = "feed" + "1" * 60
CREATED, REMOVED = CgroupEventKind.CREATED, CgroupEventKind.REMOVED


def test_pod_appears_before_its_container(cgroup_root: Path, cgroup_sandbox: Path) -> None:
    """The agent's order of business: the pod cgroup is reported (and can be put in the
    filter map) before any container cgroup exists below it."""
    pod = cgroup_sandbox / pod_cgroup_relpath(
        UID, qos=QosClass.BURSTABLE, driver=CgroupDriver.SYSTEMD
    )
    container = cgroup_sandbox / container_cgroup_relpath(
        UID, CID, qos=QosClass.BURSTABLE, driver=CgroupDriver.SYSTEMD, runtime=Runtime.CONTAINERD
    )
    # The sandbox plays the node: a kubepods.slice appearing at its top becomes a subtree.
    with CgroupWatcher(cgroup_sandbox) as watcher:
        index = CgroupIndex(cgroup_root, kubepods_dirs=[cgroup_sandbox / "kubepods.slice"])
        create_cgroup(pod)
        events = watcher.read()
        assert [e.path for e in events] == [pod.parents[1], pod.parent, pod]
        assert all(e.kind is CREATED and e.cgroup_id == cgroup_id(e.path) for e in events)
        for e in events:
            index.add(e.path, e.cgroup_id)
        pod_entry = index.pod_cgroup(UID)
        assert pod_entry is not None
        assert pod_entry.cgroup_id == cgroup_id(pod)

        create_cgroup(container)
        assert watcher.read() == [CgroupEvent(CREATED, container, cgroup_id(container))]

        # A restarted container: a new cgroup with a new id under the same pod.
        old_id = cgroup_id(container)
        container.rmdir()
        restarted = container.with_name(f"cri-containerd-{'2' * 64}.scope")
        create_cgroup(restarted)
        events = watcher.read()
        assert events == [
            CgroupEvent(REMOVED, container, old_id),
            CgroupEvent(CREATED, restarted, cgroup_id(restarted)),
        ]
        for e in events:
            (index.add if e.kind is CREATED else index.remove)(e.path)
        assert index.owner(cgroup_id(restarted)) == CgroupOwner(UID, "2" * 64)
        assert index.owner(old_id) is None


def test_removal_of_a_real_pod(cgroup_sandbox: Path) -> None:
    pod = cgroup_sandbox / pod_cgroup_relpath(
        UID, qos=QosClass.BESTEFFORT, driver=CgroupDriver.CGROUPFS
    )
    create_cgroup(pod / CID)
    with CgroupWatcher(cgroup_sandbox) as watcher:
        ids = watcher.snapshot()
        assert ids[pod / CID] == cgroup_id(pod / CID)
        (pod / CID).rmdir()
        pod.rmdir()
        assert watcher.read() == [
            CgroupEvent(REMOVED, pod / CID, ids[pod / CID]),
            CgroupEvent(REMOVED, pod, ids[pod]),
        ]


def test_a_cgroup_made_again_is_watched_again(cgroup_sandbox: Path) -> None:
    """Issue 18's chaos: cgroupfs sends no IN_IGNORED after an rmdir, so the removed
    directory's watch stayed in the tables (one per pod ever seen, until the cap) and a
    directory made again at its path was taken as watched: pods made in it went unseen."""
    qos = cgroup_sandbox / "kubepods.slice" / "kubepods-burstable.slice"
    create_cgroup(qos)
    with CgroupWatcher(cgroup_sandbox) as watcher:
        watches = watcher.watch_count
        qos.rmdir()
        qos.parent.rmdir()
        assert [e.kind for e in watcher.read()] == [REMOVED, REMOVED]
        assert watcher.watch_count == watches - 2
        create_cgroup(qos)
        assert [e.path for e in watcher.read()] == [qos.parent, qos]
        pod = qos / "kubepods-burstable-podabc.slice"
        create_cgroup(pod)
        assert watcher.read() == [CgroupEvent(CREATED, pod, cgroup_id(pod))]
        assert watcher.watch_count == watches + 1


async def test_async_events_on_real_cgroups(cgroup_sandbox: Path) -> None:
    top = cgroup_sandbox / "kubepods"
    create_cgroup(top)
    with CgroupWatcher(cgroup_sandbox, subtrees=[top], watch_root=False) as watcher:
        pod = top / f"pod{UID}"

        async def first() -> CgroupEvent:
            async for event in watcher.events():
                return event
            raise AssertionError("iterator ended")

        task = asyncio.create_task(first())
        await asyncio.sleep(0.01)
        os.mkdir(pod)
        event = await asyncio.wait_for(task, 2)
        assert event == CgroupEvent(CREATED, pod, cgroup_id(pod))
