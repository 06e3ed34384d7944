# ruff: noqa: F811  (the fixtures imported from test_agent_api are arguments here)
"""Pod cgroups recognised by the kernel at mkdir, through the real agent: a pod announced
before kubelet makes its cgroup is counted from the first call of a process born in its
container cgroup (clone3 CLONE_INTO_CGROUP, right after the mkdirs), for every cgroup
driver and QoS class; inotify covers a pod announced after its mkdir; rmdir removes the
entry; a restarted agent rebuilds it from the cgroup tree."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bench.common import run_loop

from tests.kernel.test_agent_api import (  # noqa: F401  (fixtures)
    NODE,
    RunningAgent,
    make_agent,
    wait_for,
)
from tracekeeper_agent.bpf.identity import PinnedIdentities, default_pin
from tracekeeper_agent.host.bpffs import PIN_ROOT
from tracekeeper_agent.targets.cgroups import Runtime, cgroup_id
from tracekeeper_sim import kernel_maps
from tracekeeper_sim.kubelet import (
    CgroupDriver,
    QosClass,
    container_cgroup_name,
    create_cgroup,
    pod_cgroup_relpath,
)

pytestmark = pytest.mark.kernel

Agent = Callable[[], Awaitable[RunningAgent]]
CALLS = 2000
PIN = PIN_ROOT / NODE / "identity"


@dataclass
class Pod:
    uid: str
    name: str
    directory: Path
    container: Path

    def target(self) -> dict[str, Any]:
        return {"uid": self.uid, "namespace": "team-k", "name": self.name}


@pytest.fixture
def kubepods_trees(cgroup_sandbox: Path) -> Path:
    """Both drivers' kubepods trees with their QoS directories, made before the agent
    starts (as kubelet makes them at its own start)."""
    for driver in CgroupDriver:
        for qos in QosClass:
            top = "kubepods.slice" if driver is CgroupDriver.SYSTEMD else "kubepods"
            rel = pod_cgroup_relpath("0", qos=qos, driver=driver, kubepods=top)
            create_cgroup(cgroup_sandbox / rel.parent)
    return cgroup_sandbox


def a_pod(sandbox: Path, driver: CgroupDriver, qos: QosClass, runtime: Runtime) -> Pod:
    uid = str(uuid.uuid4())
    top = "kubepods.slice" if driver is CgroupDriver.SYSTEMD else "kubepods"
    directory = sandbox / pod_cgroup_relpath(uid, qos=qos, driver=driver, kubepods=top)
    name = container_cgroup_name(uuid.uuid4().hex * 2, driver=driver, runtime=runtime)
    return Pod(uid, f"{driver}-{qos}", directory, directory / name)


def getppid_probe(*pods: Pod) -> dict[str, Any]:
    return {
        "id": "team-k/starts",
        "specHash": "c000000000000013",
        "spec": {"tracepoint": "syscalls:sys_enter_getppid", "output": {"by": ["container"]}},
        "targets": {"pods": [p.target() for p in pods]},
    }


async def start_at_once(pod: Pod) -> int:
    """mkdir pod, mkdir container, clone3 a child into it that calls getppid CALLS times
    (tk_loop, as a runtime would: no wait anywhere). Returns the calls made."""
    args: list[str | int | Path] = ["-P", pod.directory, "-M", pod.container]
    run = await asyncio.to_thread(run_loop, *args, "-C", pod.container, "-n", CALLS)
    return run.calls


def counts(agent: RunningAgent) -> dict[int, int]:
    (active,) = agent.agent.reconciler.active_probes()
    found: dict[int, int] = {}
    for sample in active.read_counts():
        cg = sample.key.cgroup_id or 0
        found[cg] = found.get(cg, 0) + sample.value
    return found


def identity_table() -> dict[int, int]:
    """The node's pinned identity table as the kernel holds it (bpftool, not the agent)."""
    return kernel_maps.dump_pinned(PIN)


async def test_a_pod_announced_first_counts_from_its_first_call_in_every_naming(
    make_agent: Agent, kubepods_trees: Path
) -> None:
    namings = [
        (CgroupDriver.SYSTEMD, QosClass.GUARANTEED, Runtime.CONTAINERD),
        (CgroupDriver.SYSTEMD, QosClass.BURSTABLE, Runtime.CRIO),
        (CgroupDriver.SYSTEMD, QosClass.BESTEFFORT, Runtime.DOCKER),
        (CgroupDriver.CGROUPFS, QosClass.GUARANTEED, Runtime.CONTAINERD),
        (CgroupDriver.CGROUPFS, QosClass.BURSTABLE, Runtime.CRIO),
        (CgroupDriver.CGROUPFS, QosClass.BESTEFFORT, Runtime.CONTAINERD),
    ]
    pods = [a_pod(kubepods_trees, *naming) for naming in namings]
    agent = await make_agent()
    report = await agent.put(1, getppid_probe(*pods))
    assert report["probes"][0]["state"] == "Loaded", report
    claims = report["cgroupClaims"]
    assert claims["pendingPods"] == len(pods) and claims["leftOutPods"] == 0, claims

    made = {pod.name: await start_at_once(pod) for pod in pods}
    got = counts(agent)
    assert {p.name: got.get(cgroup_id(p.container), 0) for p in pods} == made
    # The kernel claimed each pod directory at mkdir, with the slot the pending table held.
    assert (await agent.state())["cgroupClaims"]["claimed"] >= len(pods)
    table = identity_table()
    assert all(cgroup_id(p.directory) in table for p in pods)


async def test_one_claims_program_per_node_however_many_probes(
    make_agent: Agent, kubepods_trees: Path
) -> None:
    pod = a_pod(kubepods_trees, CgroupDriver.SYSTEMD, QosClass.BURSTABLE, Runtime.CONTAINERD)
    agent = await make_agent()
    probes = [getppid_probe(pod)]
    for i, tracepoint in enumerate(["sys_enter_openat", "sys_enter_read", "sys_enter_close"]):
        probe = getppid_probe(pod)
        probe["id"] = f"team-k/p{i}"
        probe["spec"]["tracepoint"] = f"syscalls:{tracepoint}"
        probes.append(probe)
    report = await agent.put(1, *probes)
    probe_programs = {i for p in report["probes"] for i in p["programIds"]}
    assert len({tuple(p["programIds"]) for p in report["probes"]}) == 4  # four shapes
    readers = programs_using(kernel_maps.pinned_map_id(PIN))
    # Everything else that uses the identity table is the claims program: mkdir + rmdir.
    claims = set(report["cgroupClaims"]["programIds"])
    assert readers - probe_programs == claims and len(claims) == 2


def programs_using(map_id: int) -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    )
    return {int(p["id"]) for p in json.loads(out.stdout) if map_id in p.get("map_ids", [])}


async def test_fallback_rmdir_and_restart(make_agent: Agent, kubepods_trees: Path) -> None:
    late = a_pod(kubepods_trees, CgroupDriver.CGROUPFS, QosClass.BURSTABLE, Runtime.CONTAINERD)
    early = a_pod(kubepods_trees, CgroupDriver.SYSTEMD, QosClass.BURSTABLE, Runtime.CONTAINERD)
    # `late` was made before the agent heard of it: no mkdir to claim, inotify's index has it.
    create_cgroup(late.container)
    agent = await make_agent()
    await agent.put(1, getppid_probe(early))
    await start_at_once(early)
    await agent.put(2, getppid_probe(early, late))

    async def late_known() -> bool:
        return bool((await agent.outcome("team-k/starts"))["filterEntries"] == 2)

    await wait_for("the pod announced after its mkdir", late_known)
    calls = (await asyncio.to_thread(run_loop, "-C", late.container, "-n", CALLS)).calls
    assert counts(agent).get(cgroup_id(late.container), 0) == calls

    # rmdir: the kernel removes the entry in the same call (the agent follows via inotify).
    early_id = cgroup_id(early.directory)
    assert early_id in identity_table()
    early.container.rmdir()
    early.directory.rmdir()
    assert early_id not in identity_table()

    # Restart: a new table, rebuilt from the cgroup tree (late's pod directory exists).
    await agent.stop()
    restarted = await make_agent()

    async def rebuilt() -> bool:
        return cgroup_id(late.directory) in identity_table()

    await wait_for("the restarted agent's entry for the existing pod", rebuilt)
    calls = (await asyncio.to_thread(run_loop, "-C", late.container, "-n", CALLS)).calls
    assert counts(restarted).get(cgroup_id(late.container), 0) == calls
    # And the pending pod is pending again, claimed at its next mkdir.
    assert (await restarted.state())["cgroupClaims"]["pendingPods"] == 1
    made = await start_at_once(early)
    assert counts(restarted).get(cgroup_id(early.container), 0) == made


def test_release_deletes_the_claims_of_a_freed_slot_only(cgroup_sandbox: Path) -> None:
    identities = PinnedIdentities(default_pin())
    try:
        root = cgroup_sandbox.parent
        paths = {f"/{cgroup_sandbox.name}/pod-{n}": n for n in (1, 2)}
        identities.sync_pending(paths)
        ids: dict[int, int] = {}
        for path, slot in paths.items():
            create_cgroup(root / path.lstrip("/"))
            ids[slot] = cgroup_id(root / path.lstrip("/"))
        identities.sync({ids[1]: 1, 99: 1})  # the agent also knows pod-1's cgroup
        assert identities.kernel_entries() == {ids[1]: 1, ids[2]: 2, 99: 1}
        identities.sync_pending({})
        identities.release([1, 2])
        # pod-2's claim (unknown to the agent) is gone; what the agent wrote is its to sync.
        assert identities.kernel_entries() == {ids[1]: 1, 99: 1}
        (root / f"{cgroup_sandbox.name}/pod-1").rmdir()  # rmdir deletes it in the kernel
        identities.sync({})  # and the agent's delete of it is no error
        assert identities.kernel_entries() == {}
    finally:
        identities.close()


async def test_a_pod_heard_of_after_its_mkdir_is_covered_before_or_after_its_first_process(
    make_agent: Agent, kubepods_trees: Path
) -> None:
    """The real kubelet's order (kubelet makes the pod cgroup as it sees the binding, the
    operator's push comes after): the agent covers the pod itself, and says whether a
    process had run in it by then."""
    anchor = a_pod(kubepods_trees, CgroupDriver.CGROUPFS, QosClass.BESTEFFORT, Runtime.CONTAINERD)
    quiet = a_pod(kubepods_trees, CgroupDriver.CGROUPFS, QosClass.BESTEFFORT, Runtime.CONTAINERD)
    busy = a_pod(kubepods_trees, CgroupDriver.CGROUPFS, QosClass.BURSTABLE, Runtime.CONTAINERD)
    agent = await make_agent()
    await agent.put(1, getppid_probe(anchor))  # the probe exists before both pods
    create_cgroup(quiet.container)
    create_cgroup(busy.container)
    sleeper = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        (busy.container / "cgroup.procs").write_text(f"{sleeper.pid}\n")

        async def both_seen() -> bool:
            return all(agent.agent.cgroups.pod_born_at(p.uid) is not None for p in (quiet, busy))

        await wait_for("inotify seeing both pods' mkdirs", both_seen)
        await agent.put(2, getppid_probe(anchor, quiet, busy))
        claims = (await agent.state())["cgroupClaims"]
        assert (claims["coveredBeforeProcesses"], claims["coveredAfterProcesses"]) == (1, 1)
        assert claims["claimed"] == 0  # neither was pending at its mkdir
    finally:
        sleeper.kill()
        await sleeper.wait()
