"""The watcher on plain directories: inotify behaves the same on tmpfs/ext4 as on cgroup2
for mkdir and rmdir (the kernel tier repeats the essentials on real cgroups)."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from tracekeeper_agent.targets.cgroup_watch import (
    IN_Q_OVERFLOW,
    CgroupEvent,
    CgroupEventKind,
    CgroupWatcher,
)

CREATED, REMOVED = CgroupEventKind.CREATED, CgroupEventKind.REMOVED


def created(*paths: Path) -> list[CgroupEvent]:
    return [CgroupEvent(CREATED, p, os.stat(p).st_ino) for p in paths]


def kinds_paths(events: list[CgroupEvent]) -> list[tuple[CgroupEventKind, Path]]:
    return [(e.kind, e.path) for e in events]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "kubepods.slice" / "kubepods-burstable.slice").mkdir(parents=True)
    (tmp_path / "system.slice").mkdir()
    return tmp_path


def test_start_is_silent_and_snapshots(tree: Path) -> None:
    with CgroupWatcher(tree) as watcher:
        assert watcher.read() == []
        assert watcher.subtrees == [tree / "kubepods.slice"]
        snapshot = watcher.snapshot()
        assert set(snapshot) == {
            tree / "kubepods.slice",
            tree / "kubepods.slice" / "kubepods-burstable.slice",
        }
        assert snapshot[tree / "kubepods.slice"] == os.stat(tree / "kubepods.slice").st_ino
        assert watcher.watch_count == 3  # root (shallow) + two directories


def test_reports_creation_and_removal_with_ids(tree: Path) -> None:
    qos = tree / "kubepods.slice" / "kubepods-burstable.slice"
    with CgroupWatcher(tree) as watcher:
        pod = qos / "kubepods-burstable-podabc.slice"
        pod.mkdir()
        container = pod / "cri-containerd-1234.scope"
        container.mkdir()
        expected = created(pod, container)
        assert watcher.read() == expected
        container.rmdir()
        pod.rmdir()
        removed = watcher.read()
        # Removal reports the id recorded at creation (the directory can no longer be stat'ed).
        assert removed == [CgroupEvent(REMOVED, e.path, e.cgroup_id) for e in reversed(expected)]
        assert watcher.read() == []


def test_outside_subtrees_is_ignored(tree: Path) -> None:
    with CgroupWatcher(tree) as watcher:
        (tree / "system.slice" / "foo.service").mkdir()
        (tree / "user.slice").mkdir()
        assert watcher.read() == []


def test_children_created_before_the_watch_are_found(tree: Path) -> None:
    qos = tree / "kubepods.slice" / "kubepods-burstable.slice"
    with CgroupWatcher(tree) as watcher:
        # mkdir -p creates the children before the watcher can watch the parent.
        deep = qos / "kubepods-burstable-podabc.slice" / "cri-containerd-1.scope" / "init.scope"
        deep.mkdir(parents=True)
        events = watcher.read()
        assert kinds_paths(events) == [
            (CREATED, deep.parent.parent),
            (CREATED, deep.parent),
            (CREATED, deep),
        ]
        assert watcher.read() == []


def test_new_kubepods_directory_at_root_becomes_a_subtree(tmp_path: Path) -> None:
    with CgroupWatcher(tmp_path) as watcher:
        assert watcher.subtrees == []
        pod = tmp_path / "kubepods" / "besteffort" / "podabc"
        pod.mkdir(parents=True)
        assert kinds_paths(watcher.read()) == [
            (CREATED, tmp_path / "kubepods"),
            (CREATED, pod.parent),
            (CREATED, pod),
        ]
        assert watcher.subtrees == [tmp_path / "kubepods"]


def test_a_kubepods_tree_below_the_root_made_again_is_watched_again(tmp_path: Path) -> None:
    """Issue 18's chaos: a kubepods tree found two levels down at start (kubelet with a
    --cgroup-root, a nested node) removed and made again was never seen again, nor its
    pods: only the root was watched for new trees."""
    top = tmp_path / "node-1" / "kubepods.slice"
    (top / "kubepods-burstable.slice").mkdir(parents=True)
    with CgroupWatcher(tmp_path) as watcher:
        assert watcher.subtrees == [top]
        (top / "kubepods-burstable.slice").rmdir()
        top.rmdir()
        assert {e.kind for e in watcher.read()} == {REMOVED}
        pod = top / "kubepods-burstable.slice" / "kubepods-burstable-podabc.slice"
        pod.mkdir(parents=True)
        assert kinds_paths(watcher.read()) == [
            (CREATED, top),
            (CREATED, pod.parent),
            (CREATED, pod),
        ]
        assert watcher.snapshot()[pod] == os.stat(pod).st_ino


def test_explicit_subtrees_and_no_root_watch(tmp_path: Path) -> None:
    mine = tmp_path / "test-1" / "kubepods.slice"
    mine.mkdir(parents=True)
    with CgroupWatcher(tmp_path, subtrees=[tmp_path / "test-1"], watch_root=False) as watcher:
        (tmp_path / "kubepods").mkdir()
        (mine / "kubepods-podx.slice").mkdir()
        assert kinds_paths(watcher.read()) == [(CREATED, mine / "kubepods-podx.slice")]


def test_recreated_directory_reports_the_new_id(tree: Path) -> None:
    qos = tree / "kubepods.slice" / "kubepods-burstable.slice"
    pod = qos / "kubepods-burstable-podabc.slice"
    with CgroupWatcher(tree) as watcher:
        pod.mkdir()
        first = watcher.read()
        pod.rmdir()
        pod.mkdir()
        events = watcher.read()
        assert kinds_paths(events) == [(REMOVED, pod), (CREATED, pod)]
        assert events[0].cgroup_id == first[0].cgroup_id
        assert events[1].cgroup_id == os.stat(pod).st_ino


def test_watch_cap_counts_drops_but_still_reports(tree: Path) -> None:
    qos = tree / "kubepods.slice" / "kubepods-burstable.slice"
    with CgroupWatcher(tree, max_watches=3) as watcher:
        pod = qos / "pod-a"
        pod.mkdir()
        assert kinds_paths(watcher.read()) == [(CREATED, pod)]
        assert watcher.watch_count == 3
        assert watcher.dropped_watches == 1
        (pod / "c1").mkdir()  # below an unwatched directory: not seen
        assert watcher.read() == []


def test_overflow_resyncs_and_reports_differences(tree: Path) -> None:
    qos = tree / "kubepods.slice" / "kubepods-burstable.slice"
    gone = qos / "pod-gone"
    gone.mkdir()
    with CgroupWatcher(tree) as watcher:
        gone_id = watcher.snapshot()[gone]
        new = qos / "pod-new"
        new.mkdir()
        gone.rmdir()
        # Stand-in for a real overflow: the record the kernel queues after dropping events.
        watcher._handle(struct.pack("iIII", -1, IN_Q_OVERFLOW, 0, 0))
        # The real events still queued repeat what the resync found and add nothing.
        events = watcher.read()
        assert events == [
            CgroupEvent(CgroupEventKind.OVERFLOW, tree, 0),
            CgroupEvent(REMOVED, gone, gone_id),
            *created(new),
        ]
        assert watcher.overflows == 1


def test_resync_finds_nothing_when_in_step(tree: Path) -> None:
    with CgroupWatcher(tree) as watcher:
        (tree / "kubepods.slice" / "pod-a").mkdir()
        assert len(watcher.read()) == 1
        watcher.resync()
        assert watcher.read() == []


async def test_async_iterator(tree: Path) -> None:
    qos = tree / "kubepods.slice" / "kubepods-burstable.slice"
    with CgroupWatcher(tree) as watcher:
        seen: list[CgroupEvent] = []

        async def consume() -> None:
            async for event in watcher.events():
                seen.append(event)
                if len(seen) == 2:
                    return

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        (qos / "pod-a").mkdir()
        await asyncio.sleep(0.01)
        (qos / "pod-a").rmdir()
        await asyncio.wait_for(task, 2)
        assert kinds_paths(seen) == [(CREATED, qos / "pod-a"), (REMOVED, qos / "pod-a")]


def test_fileno_before_start() -> None:
    with pytest.raises(ValueError, match="not started"):
        CgroupWatcher(Path("/nonexistent")).fileno()
