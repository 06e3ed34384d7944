"""Whether new pods were covered before their first process (reconcile/coverage.py), through
the reconciler over the fakes: the container-start race as a node saw it."""

from __future__ import annotations

import time

from tests.unit.agent_fakes import UID_A, UID_B, FakeCgroups, node_state, pod, probe
from tests.unit.test_reconciler import make
from tracekeeper_agent.reconcile.reconciler import Reconciler
from tracekeeper_agent.targets.node import CgroupChanges


def covered(reconciler: Reconciler) -> tuple[int, int]:
    claims = reconciler.report().cgroup_claims
    return claims.covered_before_processes, claims.covered_after_processes


async def made_after_the_probe(*, running: bool) -> tuple[int, int]:
    reconciler, _, cgroups = make(cgroups=FakeCgroups())
    await reconciler.apply(node_state(1, probe()))
    cgroups.pods[UID_A], cgroups.born[UID_A] = 900, time.monotonic()
    if running:
        cgroups.running.add(UID_A)
    await reconciler.refresh_targets(CgroupChanges(frozenset({UID_A})))
    result = covered(reconciler)
    await reconciler.refresh_targets(CgroupChanges(frozenset({UID_A})))  # counted once
    assert covered(reconciler) == result
    await reconciler.close()
    return result


async def test_a_pod_made_after_its_probe_and_covered_before_any_process() -> None:
    assert await made_after_the_probe(running=False) == (1, 0)


async def test_a_pod_covered_only_once_a_process_ran_in_it() -> None:
    assert await made_after_the_probe(running=True) == (0, 1)


async def test_a_pod_older_than_every_probe_targeting_it_raced_nothing() -> None:
    cgroups = FakeCgroups(pods={UID_A: 900}, born={UID_A: time.monotonic()}, running={UID_A})
    reconciler, _, _ = make(cgroups=cgroups)
    await reconciler.apply(node_state(1, probe()))
    assert covered(reconciler) == (0, 0)
    await reconciler.close()


async def test_a_pod_the_kernel_claimed_at_mkdir_is_the_claims_count() -> None:
    reconciler, loader, cgroups = make(cgroups=FakeCgroups())
    await reconciler.apply(node_state(1, probe()))
    assert loader.identities.mkdir(cgroups.pod_cgroup_paths(UID_A)[0], 900)
    cgroups.pods[UID_A], cgroups.born[UID_A] = 900, time.monotonic()
    cgroups.running.add(UID_A)  # its processes ran: the kernel had it from the mkdir on
    await reconciler.refresh_targets(CgroupChanges(frozenset({UID_A})))
    assert covered(reconciler) == (0, 0)
    assert reconciler.report().cgroup_claims.claimed == 1
    await reconciler.close()


async def test_a_pod_existing_when_the_agent_started_is_not_counted() -> None:
    reconciler, _, cgroups = make(cgroups=FakeCgroups())
    await reconciler.apply(node_state(1, probe(targets={"pods": [pod(), pod(UID_B, "web-1")]})))
    cgroups.pods.update({UID_A: 900, UID_B: 901})  # found by a rescan: no birth seen
    cgroups.born[UID_B] = time.monotonic()
    await reconciler.refresh_targets(CgroupChanges(everything=True))
    assert covered(reconciler) == (1, 0)
    await reconciler.close()
