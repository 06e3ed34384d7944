from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from tracekeeper_agent.targets.cgroups import (
    CgroupError,
    CgroupIndex,
    CgroupOwner,
    Runtime,
    cgroup_id,
    cgroup_level,
    detect_root,
    find_kubepods_dirs,
    is_cgroup2,
    is_kubepods_name,
    parse_cgroup_path,
    split_container_id,
)
from tracekeeper_sim.kubelet import (
    CgroupDriver,
    QosClass,
    container_cgroup_candidates,
    container_cgroup_relpath,
    find_container_cgroup,
    find_pod_cgroup,
    pid_cgroup,
    pod_cgroup_candidates,
    pod_cgroup_relpath,
)

UID = "1f2e3d4c-5b6a-4789-8abc-def012345678"
CID = "a" * 12 + "0123456789abcdef" * 3 + "b" * 4
STATIC_UID = "6f1e4c0d2a9b8c7d6e5f4a3b2c1d0e9f"  # static pods: config hash, no dashes


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"containerd://{CID}", (Runtime.CONTAINERD, CID)),
        (f"cri-o://{CID}", (Runtime.CRIO, CID)),
        (f"docker://{CID}", (Runtime.DOCKER, CID)),
        (CID, (None, CID)),
    ],
)
def test_split_container_id(raw: str, expected: tuple[Runtime | None, str]) -> None:
    assert split_container_id(raw) == expected


@pytest.mark.parametrize("raw", ["", "containerd://", "rkt://abc", "containerd://../x", "a/b"])
def test_split_container_id_rejects(raw: str) -> None:
    with pytest.raises(CgroupError):
        split_container_id(raw)


@pytest.mark.parametrize(
    ("driver", "qos", "runtime", "expected"),
    [
        (
            CgroupDriver.SYSTEMD,
            QosClass.BURSTABLE,
            Runtime.CONTAINERD,
            "kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
        ),
        (
            CgroupDriver.SYSTEMD,
            QosClass.BESTEFFORT,
            Runtime.CRIO,
            "kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope",
        ),
        (
            CgroupDriver.SYSTEMD,
            QosClass.GUARANTEED,
            Runtime.DOCKER,
            f"kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/docker-{CID}.scope",
        ),
        (
            CgroupDriver.CGROUPFS,
            QosClass.BURSTABLE,
            Runtime.CONTAINERD,
            f"kubepods/burstable/pod{UID}/{CID}",
        ),
        (
            CgroupDriver.CGROUPFS,
            QosClass.BESTEFFORT,
            Runtime.DOCKER,
            f"kubepods/besteffort/pod{UID}/{CID}",
        ),
        (CgroupDriver.CGROUPFS, QosClass.GUARANTEED, Runtime.CRIO, f"kubepods/pod{UID}/crio-{CID}"),
    ],
)
def test_kubelet_layout(
    driver: CgroupDriver, qos: QosClass, runtime: Runtime, expected: str
) -> None:
    path = container_cgroup_relpath(
        UID, f"{runtime}://{CID}", qos=qos, driver=driver, runtime=runtime
    )
    assert path == PurePosixPath(expected)


@pytest.mark.parametrize("driver", list(CgroupDriver))
@pytest.mark.parametrize("qos", list(QosClass))
@pytest.mark.parametrize("runtime", list(Runtime))
@pytest.mark.parametrize("uid", [UID, STATIC_UID])
def test_parse_round_trips_every_layout(
    driver: CgroupDriver, qos: QosClass, runtime: Runtime, uid: str
) -> None:
    pod = pod_cgroup_relpath(uid, qos=qos, driver=driver)
    container = container_cgroup_relpath(uid, CID, qos=qos, driver=driver, runtime=runtime)
    assert parse_cgroup_path(pod) == CgroupOwner(uid, None)
    assert parse_cgroup_path(container) == CgroupOwner(uid, CID)
    # Below a container (systemd inside it, a cgroupns child): still that container.
    assert parse_cgroup_path(container / "init.scope") == CgroupOwner(uid, CID)
    # Absolute paths under a root parse the same.
    assert parse_cgroup_path("/sys/fs/cgroup" / container) == CgroupOwner(uid, CID)


def test_parse_custom_cgroup_root_prefix() -> None:
    u = UID.replace("-", "_")
    path = (
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
    )
    assert parse_cgroup_path(path) == CgroupOwner(UID, CID)
    assert parse_cgroup_path(f"kubelet/kubepods/burstable/pod{UID}/{CID}") == CgroupOwner(UID, CID)


def test_parse_crio_conmon_is_pod_level() -> None:
    u = UID.replace("-", "_")
    path = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/"
    assert parse_cgroup_path(path + f"crio-conmon-{CID}.scope") == CgroupOwner(UID, None)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "system.slice/containerd.service",
        "kubepods.slice",
        "kubepods.slice/kubepods-burstable.slice",
        "kubepods/burstable",
        f"user.slice/pod{UID}",  # pod<uid> outside kubepods (cgroupfs) is not kubelet's
        f"kubepods/guaranteed/pod{UID}",
        f"system.slice/docker-{CID}.scope",
    ],
)
def test_parse_non_pod_paths(path: str) -> None:
    assert parse_cgroup_path(path) is None


def test_kubepods_names() -> None:
    assert is_kubepods_name("kubepods")
    assert is_kubepods_name("kubepods.slice")
    assert is_kubepods_name("kubelet-kubepods.slice")
    assert not is_kubepods_name("kubepods-burstable.slice")
    assert not is_kubepods_name("kubepods2")


def test_level(tmp_path: Path) -> None:
    assert cgroup_level(tmp_path, tmp_path) == 0
    assert cgroup_level(tmp_path, tmp_path / "a" / "b") == 2
    with pytest.raises(CgroupError):
        cgroup_level(tmp_path / "a", tmp_path / "b")


def test_detect_root_refuses_non_cgroup2(tmp_path: Path) -> None:
    assert not is_cgroup2(tmp_path)
    assert not is_cgroup2(tmp_path / "missing")
    with pytest.raises(CgroupError, match="not a cgroup2 mount"):
        detect_root(tmp_path)
    with pytest.raises(CgroupError, match=str(tmp_path)):
        detect_root(candidates=(tmp_path, tmp_path / "unified"))


def test_pid_cgroup_reads_the_v2_line(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text("4:memory:/x\n0::/kubepods.slice/a.scope\n")
    assert pid_cgroup(42, proc=tmp_path) == PurePosixPath("kubepods.slice/a.scope")
    (tmp_path / "42" / "cgroup").write_text("4:memory:/x\n")
    with pytest.raises(CgroupError):
        pid_cgroup(42, proc=tmp_path)


# --- fake trees -----------------------------------------------------------------------------


def make_tree(root: Path) -> dict[str, Path]:
    """A node with both drivers' pods (one per QoS class) and unrelated cgroups."""
    dirs: dict[str, Path] = {}
    for name, qos, driver, runtime in [
        ("sd-burst", QosClass.BURSTABLE, CgroupDriver.SYSTEMD, Runtime.CONTAINERD),
        ("sd-guar", QosClass.GUARANTEED, CgroupDriver.SYSTEMD, Runtime.CRIO),
        ("fs-best", QosClass.BESTEFFORT, CgroupDriver.CGROUPFS, Runtime.DOCKER),
    ]:
        uid = f"{len(dirs):08d}-0000-4000-8000-000000000000"
        cid = f"{len(dirs)}" * 64
        path = root / container_cgroup_relpath(uid, cid, qos=qos, driver=driver, runtime=runtime)
        path.mkdir(parents=True)
        dirs[name] = path
    (root / "system.slice" / "containerd.service").mkdir(parents=True)
    return dirs


def test_find_kubepods_dirs(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "nested" / "kubelet-kubepods.slice").mkdir(parents=True)
    assert find_kubepods_dirs(tmp_path) == [
        tmp_path / "kubepods",
        tmp_path / "kubepods.slice",
        tmp_path / "nested" / "kubelet-kubepods.slice",
    ]
    assert find_kubepods_dirs(tmp_path, max_depth=1) == [
        tmp_path / "kubepods",
        tmp_path / "kubepods.slice",
    ]


def test_candidates_and_find(tmp_path: Path) -> None:
    dirs = make_tree(tmp_path)
    kubepods = find_kubepods_dirs(tmp_path)
    uid = "00000000-0000-4000-8000-000000000000"
    assert dirs["sd-burst"].parent in pod_cgroup_candidates(tmp_path / "kubepods.slice", uid)
    assert find_pod_cgroup(kubepods, uid) == dirs["sd-burst"].parent
    assert find_container_cgroup(kubepods, uid, "containerd://" + "0" * 64) == dirs["sd-burst"]
    # An id without scheme tries every runtime's naming.
    assert len(container_cgroup_candidates(dirs["sd-burst"].parent, "0" * 64)) == 3
    assert find_container_cgroup(kubepods, uid, "0" * 64) == dirs["sd-burst"]
    assert find_container_cgroup(kubepods, uid, "cri-o://" + "0" * 64) is None
    uid2 = "00000002-0000-4000-8000-000000000000"
    assert find_container_cgroup(kubepods, uid2, "docker://" + "2" * 64) == dirs["fs-best"]
    assert find_pod_cgroup(kubepods, "ffffffff-0000-4000-8000-000000000000") is None


def test_index_maps_ids_to_owners(tmp_path: Path) -> None:
    dirs = make_tree(tmp_path)
    index = CgroupIndex(tmp_path)
    index.rescan()
    # 3 pods + 3 containers; QoS and kubepods directories belong to no pod.
    assert len(index) == 6
    burst = dirs["sd-burst"]
    entry = index.by_id(os.stat(burst).st_ino)
    assert entry is not None
    assert entry.path == burst
    assert entry.level == 4
    assert entry.owner == CgroupOwner("00000000-0000-4000-8000-000000000000", "0" * 64)
    pod = index.pod_cgroup("00000000-0000-4000-8000-000000000000")
    assert pod is not None
    assert pod.path == burst.parent
    assert pod.level == 3
    assert index.owner(cgroup_id(burst.parent)) == CgroupOwner(pod.owner.pod_uid, None)
    guaranteed = index.pod_cgroup("00000001-0000-4000-8000-000000000000")
    assert guaranteed is not None
    assert guaranteed.level == 2
    container = index.container_cgroup(
        "00000001-0000-4000-8000-000000000000", "cri-o://" + "1" * 64
    )
    assert container is not None
    assert container.path == dirs["sd-guar"]
    assert index.owner(cgroup_id(tmp_path / "system.slice")) is None


def test_index_add_remove_idempotent(tmp_path: Path) -> None:
    dirs = make_tree(tmp_path)
    index = CgroupIndex(tmp_path, kubepods_dirs=[tmp_path / "kubepods"])
    index.rescan()
    assert len(index) == 2  # only the cgroupfs pod
    new = dirs["fs-best"].parent / ("9" * 64)
    new.mkdir()
    first = index.add(new)
    assert first is not None
    assert index.add(new) == first
    assert len(index) == 3
    assert index.add(tmp_path / "system.slice") is None
    assert index.remove(new) == first
    assert index.remove(new) is None
    assert index.by_id(first.cgroup_id) is None
    # A directory that vanished before it was indexed is skipped.
    new.rmdir()
    assert index.add(new) is None
    with pytest.raises(CgroupError):
        index.add(Path("/elsewhere/kubepods"))


def test_index_restarted_container_replaces_path(tmp_path: Path) -> None:
    dirs = make_tree(tmp_path)
    index = CgroupIndex(tmp_path)
    index.rescan()
    old = index.by_id(cgroup_id(dirs["sd-burst"]))
    assert old is not None
    # Same path, new inode (a recreated directory): the old id no longer resolves.
    index.add(dirs["sd-burst"], known_id=old.cgroup_id + 1_000_000)
    assert index.by_id(old.cgroup_id) is None
    assert index.by_id(old.cgroup_id + 1_000_000) is not None
    assert len(index.pod_entries(old.owner.pod_uid)) == 2
