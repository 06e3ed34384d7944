"""Where kubelet will put a pod's cgroup: the forward naming, for pods the operator announced
before their cgroup exists (the kernel claims the directory at mkdir, see programs/claims.py).

Kubelet lays pods out by cgroup driver and QoS class:

- systemd:  kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/
            cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope
            (guaranteed pods: kubepods.slice/kubepods-pod<uid_>.slice; `_` replaces `-`)
- cgroupfs: kubepods/burstable/pod<uid>/<id>   (CRI-O: crio-<id>)

The QoS class is not in what the operator sends, so a pending pod gets every class's path
under each kubepods directory of the node (3 paths per directory); which driver a directory
belongs to is in its name. Parsing these paths back is targets/cgroups.py's.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from pathlib import PurePosixPath

from tracekeeper_agent.targets.cgroups import Runtime, split_container_id

DEFAULT_KUBEPODS: tuple[PurePosixPath, ...] = (
    PurePosixPath("kubepods.slice"),
    PurePosixPath("kubepods"),
)
"""Where kubelet makes its tree when the node has none yet: below the v2 root, either driver."""


class CgroupDriver(StrEnum):
    SYSTEMD = "systemd"
    CGROUPFS = "cgroupfs"


class QosClass(StrEnum):
    GUARANTEED = "guaranteed"
    BURSTABLE = "burstable"
    BESTEFFORT = "besteffort"


def driver_of(kubepods: PurePosixPath | str) -> CgroupDriver:
    """`kubepods` is cgroupfs's top directory; systemd's are slices (`[...-]kubepods.slice`)."""
    if PurePosixPath(kubepods).name == "kubepods":
        return CgroupDriver.CGROUPFS
    return CgroupDriver.SYSTEMD


def pod_cgroup_relpath(
    pod_uid: str,
    *,
    qos: QosClass,
    driver: CgroupDriver,
    kubepods: str | None = None,
) -> PurePosixPath:
    """Where kubelet puts a pod, relative to the cgroup root (`kubepods` overrides the
    top-level name, e.g. 'kubelet-kubepods.slice' under a custom --cgroup-root)."""
    if driver is CgroupDriver.SYSTEMD:
        top = kubepods or "kubepods.slice"
        prefix = top.removesuffix(".slice").rsplit("/", 1)[-1]
        uid = pod_uid.replace("-", "_")
        if qos is QosClass.GUARANTEED:
            return PurePosixPath(top, f"{prefix}-pod{uid}.slice")
        return PurePosixPath(top, f"{prefix}-{qos}.slice", f"{prefix}-{qos}-pod{uid}.slice")
    top = kubepods or "kubepods"
    if qos is QosClass.GUARANTEED:
        return PurePosixPath(top, f"pod{pod_uid}")
    return PurePosixPath(top, str(qos), f"pod{pod_uid}")


def container_cgroup_name(container_id: str, *, driver: CgroupDriver, runtime: Runtime) -> str:
    """The container's directory name inside its pod directory."""
    _, cid = split_container_id(container_id)
    if driver is CgroupDriver.SYSTEMD:
        prefix = {Runtime.CONTAINERD: "cri-containerd", Runtime.CRIO: "crio"}.get(runtime, "docker")
        return f"{prefix}-{cid}.scope"
    return f"crio-{cid}" if runtime is Runtime.CRIO else cid


def pod_cgroup_paths(pod_uid: str, kubepods_dirs: Iterable[PurePosixPath]) -> tuple[str, ...]:
    """Every path the pod's own cgroup can get, as the kernel's cgroup tracepoints spell it:
    from the v2 root, with a leading slash. `kubepods_dirs`: the node's kubepods directories
    relative to the root (none: kubelet's defaults for both drivers). The uid as the
    operator sends it (lower case, as kubelet writes it)."""
    tops = list(kubepods_dirs) or list(DEFAULT_KUBEPODS)
    paths: list[str] = []
    for top in tops:
        driver = driver_of(top)
        for qos in QosClass:
            rel = pod_cgroup_relpath(pod_uid, qos=qos, driver=driver, kubepods=top.name)
            paths.append(f"/{top.parent / rel}")
    return tuple(dict.fromkeys(paths))
