"""Where a pending pod's cgroup will be (the kernel claims it there at mkdir), and the
pending table's key."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from tests.unit.agent_fakes import UID_A
from tracekeeper_agent.programs.claims import claimable, claims_source, path_key
from tracekeeper_agent.programs.constants import MAX_CGROUP_PATH
from tracekeeper_agent.targets.cgroup_watch import CgroupEvent, CgroupEventKind
from tracekeeper_agent.targets.cgroups import CgroupIndex, CgroupOwner, parse_cgroup_path
from tracekeeper_agent.targets.node import NodeCgroups
from tracekeeper_agent.targets.pod_paths import pod_cgroup_paths

U_ = UID_A.replace("-", "_")


def test_a_systemd_node_gets_every_qos_class_path() -> None:
    assert pod_cgroup_paths(UID_A, [PurePosixPath("kubepods.slice")]) == (
        f"/kubepods.slice/kubepods-pod{U_}.slice",
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice",
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice",
    )


def test_a_cgroupfs_node_gets_every_qos_class_path() -> None:
    assert pod_cgroup_paths(UID_A, [PurePosixPath("kubepods")]) == (
        f"/kubepods/pod{UID_A}",
        f"/kubepods/burstable/pod{UID_A}",
        f"/kubepods/besteffort/pod{UID_A}",
    )


def test_a_custom_cgroup_root_and_a_node_without_kubepods_yet() -> None:
    custom = pod_cgroup_paths(UID_A, [PurePosixPath("kubelet.slice/kubelet-kubepods.slice")])
    assert custom[1] == (
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
        f"kubelet-kubepods-burstable-pod{U_}.slice"
    )
    # No kubepods directory yet: kubelet's defaults, both drivers.
    assert pod_cgroup_paths(UID_A, []) == (
        *pod_cgroup_paths(UID_A, [PurePosixPath("kubepods.slice")]),
        *pod_cgroup_paths(UID_A, [PurePosixPath("kubepods")]),
    )


@pytest.mark.parametrize("top", ["kubepods.slice", "kubepods", "x/kubelet-kubepods.slice"])
def test_every_derived_path_parses_back_to_the_pod(top: str) -> None:
    for path in pod_cgroup_paths(UID_A, [PurePosixPath(top)]):
        assert parse_cgroup_path(path.lstrip("/")) == CgroupOwner(UID_A, None)
        assert claimable(path)


def test_node_cgroups_derive_paths_under_its_kubepods_and_again_when_one_appears(
    tmp_path: Path,
) -> None:
    (tmp_path / "sandbox" / "kubepods.slice").mkdir(parents=True)
    cgroups = NodeCgroups(CgroupIndex(tmp_path))
    first = cgroups.pod_cgroup_paths(UID_A.upper())  # as kubelet writes it: lower case
    assert first == pod_cgroup_paths(UID_A, [PurePosixPath("sandbox/kubepods.slice")])
    (tmp_path / "kubepods").mkdir()
    changes = cgroups.apply_events([CgroupEvent(CgroupEventKind.CREATED, tmp_path / "kubepods", 7)])
    assert changes.everything  # every pending pod's paths changed
    assert cgroups.pod_cgroup_paths(UID_A) == (
        *pod_cgroup_paths(UID_A, [PurePosixPath("kubepods")]),
        *first,
    )


def test_path_key_is_fnv1a_64() -> None:
    # The published FNV-1a 64 test vectors; cgroup_claims.c computes the same loop.
    assert path_key("") == 0xCBF29CE484222325
    assert path_key("a") == 0xAF63DC4C8601EC8C
    assert path_key("foobar") == 0x85944171F73967E8


def test_claimable_is_what_the_program_reads() -> None:
    assert claimable("/" + "x" * (MAX_CGROUP_PATH - 1))
    assert not claimable("/" + "x" * MAX_CGROUP_PATH)
    assert not claimable("")


def test_the_claims_program_gets_its_constants_from_python() -> None:
    source = claims_source()
    assert f"#define TK_MAX_CGROUP_PATH {MAX_CGROUP_PATH}\n" in source
    assert "#define TK_FNV_PRIME 0x100000001b3ULL\n" in source
    assert "TRACEPOINT_PROBE(cgroup, cgroup_mkdir)" in source
