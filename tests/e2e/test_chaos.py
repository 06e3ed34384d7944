"""Issue 18's chaos on the control plane: each scenario of reliability.control_chaos (the
operator SIGKILLed mid-reconcile, mid-delete and with a push in flight, a full state
directory on the probes' statuses, the apiserver and etcd SIGKILLed and started again) in
one world on the session's cluster, whose apiserver and etcd come back on the same ports
and data. Resume times are printed, never asserted."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from reliability import control_chaos
from reliability.agent_chaos import Figures

from tracekeeper_sim.local_cluster import LocalCluster
from tracekeeper_sim.world import World

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def world(
    cluster: LocalCluster, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("the chaos e2e tier runs a real agent: needs root to load BPF programs")
    with control_chaos.control_world(cluster, tmp_path_factory.mktemp("chaos-e2e")) as w:
        yield w


@pytest.mark.parametrize("scenario", control_chaos.ALL, ids=lambda s: s.__name__)
def test_the_control_plane_survives(scenario: Callable[[World], Figures], world: World) -> None:
    figures = scenario(world)
    print(f"\n{figures}")
    assert figures.leaked == 0
    assert world.cluster.running
