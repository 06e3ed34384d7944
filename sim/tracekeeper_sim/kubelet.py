"""Playing kubelet on this machine: the candidate search over its cgroup layout (the forward
naming is the agent's, tracekeeper_agent.targets.pod_paths: it predicts pending pods' paths),
and making, filling and removing the cgroups of fake pods. Dev-only: the tests, the demo and
the benchmarks use it.

Kubelet lays pods out by cgroup driver:

- systemd:  kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/
            cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope
            (guaranteed pods: kubepods.slice/kubepods-pod<uid_>.slice; `_` replaces `-`)
- cgroupfs: kubepods/burstable/pod<uid>/<id>   (CRI-O: crio-<id>)
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tracekeeper_agent.targets.cgroups import (
    CgroupError,
    Runtime,
    cgroup_id,
    split_container_id,
    walk_cgroups,
)
from tracekeeper_agent.targets.pod_paths import CgroupDriver as CgroupDriver
from tracekeeper_agent.targets.pod_paths import QosClass as QosClass
from tracekeeper_agent.targets.pod_paths import container_cgroup_name as container_cgroup_name
from tracekeeper_agent.targets.pod_paths import pod_cgroup_relpath as pod_cgroup_relpath


def container_cgroup_relpath(
    pod_uid: str,
    container_id: str,
    *,
    qos: QosClass,
    driver: CgroupDriver,
    runtime: Runtime,
    kubepods: str | None = None,
) -> PurePosixPath:
    pod = pod_cgroup_relpath(pod_uid, qos=qos, driver=driver, kubepods=kubepods)
    return pod / container_cgroup_name(container_id, driver=driver, runtime=runtime)


def pod_cgroup_candidates(kubepods_dir: Path, pod_uid: str) -> list[Path]:
    """Every place kubelet could have put this pod under one kubepods directory."""
    if kubepods_dir.name == "kubepods":
        driver, top = CgroupDriver.CGROUPFS, "kubepods"
    else:
        driver, top = CgroupDriver.SYSTEMD, kubepods_dir.name
    return [
        kubepods_dir.parent / pod_cgroup_relpath(pod_uid, qos=qos, driver=driver, kubepods=top)
        for qos in QosClass
    ]


def container_cgroup_candidates(pod_dir: Path, container_id: str) -> list[Path]:
    driver = CgroupDriver.SYSTEMD if pod_dir.name.endswith(".slice") else CgroupDriver.CGROUPFS
    runtime, cid = split_container_id(container_id)
    runtimes = [runtime] if runtime else list(Runtime)
    names = dict.fromkeys(container_cgroup_name(cid, driver=driver, runtime=r) for r in runtimes)
    return [pod_dir / name for name in names]


def find_pod_cgroup(kubepods_dirs: Iterable[Path], pod_uid: str) -> Path | None:
    for kubepods_dir in kubepods_dirs:
        for candidate in pod_cgroup_candidates(kubepods_dir, pod_uid):
            if candidate.is_dir():
                return candidate
    return None


def find_container_cgroup(
    kubepods_dirs: Iterable[Path], pod_uid: str, container_id: str
) -> Path | None:
    pod_dir = find_pod_cgroup(kubepods_dirs, pod_uid)
    if pod_dir is None:
        return None
    for candidate in container_cgroup_candidates(pod_dir, container_id):
        if candidate.is_dir():
            return candidate
    return None


# --- playing kubelet (tests, the demo) -------------------------------------------------------


def create_cgroup(path: Path) -> int:
    """mkdir -p a cgroup directory; returns its cgroup id."""
    path.mkdir(parents=True, exist_ok=True)
    return cgroup_id(path)


def move_pid(cgroup_dir: Path, pid: int) -> None:
    """Move a whole process (all its threads) into a cgroup."""
    (cgroup_dir / "cgroup.procs").write_text(f"{pid}\n")


def pid_cgroup(pid: int | str = "self", *, proc: Path = Path("/proc")) -> PurePosixPath:
    """A process's cgroup v2 path, relative to the root (the `0::` line)."""
    for line in (proc / str(pid) / "cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return PurePosixPath(line[3:].lstrip("/"))
    raise CgroupError(f"process {pid} has no cgroup v2 membership line")


def remove_cgroup_tree(top: Path, *, evacuate_to: Path, timeout: float = 5.0) -> None:
    """Remove a cgroup subtree, deepest first, moving any process still inside to
    `evacuate_to` (rmdir of a populated cgroup fails with EBUSY)."""
    if not top.is_dir():
        return
    for directory in sorted(walk_cgroups(top, max_depth=64), key=lambda p: -len(p.parts)):
        deadline = time.monotonic() + timeout
        while True:
            _evacuate(directory, evacuate_to)
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # Exiting tasks keep a cgroup busy for a moment after they leave cgroup.procs.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def _evacuate(directory: Path, target: Path) -> None:
    try:
        pids = (directory / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            move_pid(target, int(pid))


# --- fake pods' directories (systemd driver, containerd: what the tests and benches play) ---


def qos_dir(top: Path, qos: QosClass = QosClass.BURSTABLE) -> Path:
    """top/kubepods.slice/kubepods-<qos>.slice: the directory a QoS class's pods live in."""
    return (top / pod_cgroup_relpath("0", qos=qos, driver=CgroupDriver.SYSTEMD)).parent


def pod_dir(qos_directory: Path, pod_uid: str, qos: QosClass = QosClass.BURSTABLE) -> Path:
    """A pod's directory inside `qos_dir(...)`."""
    return qos_directory / pod_cgroup_relpath(pod_uid, qos=qos, driver=CgroupDriver.SYSTEMD).name


def container_dir(pod_directory: Path, container_id: str) -> Path:
    """A containerd container's directory inside its pod's."""
    name = container_cgroup_name(
        container_id, driver=CgroupDriver.SYSTEMD, runtime=Runtime.CONTAINERD
    )
    return pod_directory / name
