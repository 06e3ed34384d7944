"""The churn soak at a bounded, seeded size (reliability tier; `make reliability` runs it at
10,000 pod events): every node's kernel maps equal the desired state, no program id changed,
and nothing the agents loaded outlives them."""

from __future__ import annotations

import os

import pytest

from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.churn import CI_SIZE, Churn, describe, soak
from tracekeeper_sim.local_cluster import LocalCluster
from tracekeeper_sim.world import World

pytestmark = pytest.mark.e2e

SEED = 20261202


def test_churn_leaves_every_map_as_desired_and_nothing_leaked(
    cluster: LocalCluster, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the churn soak runs real agents: needs root")
    world = World(cluster, tmp_path_factory.mktemp("churn-e2e"), detect_root())
    churn = Churn(world, CI_SIZE, SEED)
    try:
        world.start_operator()
        report = soak(churn)
        print(f"\n[churn] {describe(report)}")
        assert report.pod_events == CI_SIZE.events
        assert report.converged_after is not None, report.mismatches
        assert report.mismatches == [] and report.programs_changed == []
    finally:
        world.close()
    assert not churn.leftovers()
