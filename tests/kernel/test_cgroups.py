"""cgroup facts against the real v2 hierarchy, and ids/levels checked by BPF itself."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from tests.kernel.conftest import run_in_cgroup
from tracekeeper_agent.targets.cgroups import (
    DEFAULT_ROOT_CANDIDATES,
    CgroupIndex,
    CgroupOwner,
    Runtime,
    cgroup_id,
    cgroup_level,
    detect_root,
    find_kubepods_dirs,
    is_cgroup2,
)
from tracekeeper_sim.kubelet import (
    CgroupDriver,
    QosClass,
    container_cgroup_relpath,
    create_cgroup,
    find_container_cgroup,
    find_pod_cgroup,
    move_pid,
    pid_cgroup,
    remove_cgroup_tree,
)

pytestmark = pytest.mark.kernel

UID = "7d4c2a10-3b5e-4f60-9a8b-0c1d2e3f4a5b"
CID = "c0ffee" + "0" * 58


def test_detect_root_finds_the_v2_hierarchy() -> None:
    root = detect_root()
    assert root in DEFAULT_ROOT_CANDIDATES
    assert is_cgroup2(root)
    assert (root / "cgroup.procs").is_file()
    # On a hybrid host (this one) /sys/fs/cgroup is a tmpfs of v1 mounts and v2 is below.
    if root != Path("/sys/fs/cgroup"):
        assert not is_cgroup2("/sys/fs/cgroup")


@pytest.fixture
def pods(cgroup_sandbox: Path) -> dict[str, Path]:
    """Both drivers' layouts, as kubelet and the runtimes would make them."""
    made = {}
    for name, driver, qos, runtime in [
        ("systemd", CgroupDriver.SYSTEMD, QosClass.BURSTABLE, Runtime.CONTAINERD),
        ("cgroupfs", CgroupDriver.CGROUPFS, QosClass.BESTEFFORT, Runtime.CRIO),
    ]:
        rel = container_cgroup_relpath(UID, CID, qos=qos, driver=driver, runtime=runtime)
        made[name] = cgroup_sandbox / rel
        create_cgroup(made[name])
    return made


def test_index_on_real_cgroups(
    cgroup_root: Path, cgroup_sandbox: Path, pods: dict[str, Path]
) -> None:
    for name, container in pods.items():
        top = cgroup_sandbox / ("kubepods.slice" if name == "systemd" else "kubepods")
        index = CgroupIndex(cgroup_root, kubepods_dirs=[top])
        index.rescan()
        assert len(index) == 2
        pod = index.pod_cgroup(UID)
        assert pod is not None
        assert pod.path == container.parent
        assert pod.cgroup_id == cgroup_id(container.parent)
        assert pod.level == len(container.parent.relative_to(cgroup_root).parts)
        entry = index.container_cgroup(
            UID, f"{'containerd' if name == 'systemd' else 'cri-o'}://{CID}"
        )
        assert entry is not None
        assert entry.cgroup_id == cgroup_id(container)
        assert index.owner(entry.cgroup_id) == CgroupOwner(UID, CID)


def test_find_on_real_cgroups(cgroup_sandbox: Path, pods: dict[str, Path]) -> None:
    kubepods = find_kubepods_dirs(cgroup_sandbox, max_depth=1)
    assert kubepods == [cgroup_sandbox / "kubepods", cgroup_sandbox / "kubepods.slice"]
    assert find_pod_cgroup(kubepods, UID) in (pods["cgroupfs"].parent, pods["systemd"].parent)
    systemd = find_container_cgroup([cgroup_sandbox / "kubepods.slice"], UID, f"containerd://{CID}")
    assert systemd == pods["systemd"]
    cgroupfs = find_container_cgroup([cgroup_sandbox / "kubepods"], UID, f"cri-o://{CID}")
    assert cgroupfs == pods["cgroupfs"]


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_move_pid_and_remove_tree_evacuates(
    cgroup_root: Path,
    cgroup_sandbox: Path,
    pods: dict[str, Path],
    sleeper: subprocess.Popen[bytes],
) -> None:
    container = pods["systemd"]
    move_pid(container, sleeper.pid)
    assert pid_cgroup(sleeper.pid) == PurePosixPath(container.relative_to(cgroup_root))
    assert str(sleeper.pid) in (container / "cgroup.procs").read_text().split()
    evacuate = cgroup_sandbox / "evacuated"
    create_cgroup(evacuate)
    remove_cgroup_tree(cgroup_sandbox / "kubepods.slice", evacuate_to=evacuate)
    assert not (cgroup_sandbox / "kubepods.slice").exists()
    assert sleeper.poll() is None  # moved out, not killed
    assert pid_cgroup(sleeper.pid) == PurePosixPath(evacuate.relative_to(cgroup_root))


def test_remove_tree_waits_out_an_exiting_process(
    cgroup_root: Path, cgroup_sandbox: Path, pods: dict[str, Path]
) -> None:
    # A process that has just exited can keep the cgroup busy (EBUSY) for a moment.
    run_in_cgroup(pods["cgroupfs"], "true")
    remove_cgroup_tree(cgroup_sandbox / "kubepods", evacuate_to=cgroup_root)
    assert not (cgroup_sandbox / "kubepods").exists()


PROGRAM = r"""
BPF_HASH(seen, u64, u64);
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u64 id = bpf_get_current_cgroup_id();
    u64 ancestor = bpf_get_current_ancestor_cgroup_id(POD_LEVEL);
    seen.update(&id, &ancestor);
    return 0;
}
"""


def test_bpf_sees_the_same_ids_and_levels(cgroup_root: Path, pods: dict[str, Path]) -> None:
    """The point of it all: what BPF reports for a process in a container cgroup is the
    container's inode, and its ancestor at the pod's level is the pod's inode."""
    from bcc import BPF

    container = pods["systemd"]
    pod_level = cgroup_level(cgroup_root, container.parent)
    bpf = BPF(text=PROGRAM.encode(), cflags=[f"-DPOD_LEVEL={pod_level}"])
    try:
        run_in_cgroup(container, "true")
        deadline = time.monotonic() + 2
        seen: dict[int, int] = {}
        while cgroup_id(container) not in seen and time.monotonic() < deadline:
            seen = {k.value: v.value for k, v in bpf[b"seen"].items()}
            time.sleep(0.01)
        assert seen.get(cgroup_id(container)) == cgroup_id(container.parent)
        index = CgroupIndex(cgroup_root, kubepods_dirs=[container.parents[2]])
        index.rescan()
        assert index.owner(cgroup_id(container)) == CgroupOwner(UID, CID)
    finally:
        bpf.cleanup()
