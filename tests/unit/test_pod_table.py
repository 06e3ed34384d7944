"""The node state's pod table: each pod once per node, probes referring to it; packed by the
operator, checked and resolved by the agent (through its real HTTP API and reconciler)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.unit.agent_fakes import FakeCgroups, FakeLoader, fake_build_plan
from tests.unit.test_http_api import AUTH, TOKEN
from tracekeeper_agent.reconcile.reconciler import Reconciler
from tracekeeper_agent.service.http_api import MAX_BODY, create_app
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import (
    ContainerTarget,
    NodeState,
    PodTarget,
    ProbeAssignment,
    ProbeTargets,
    pack_node_state,
)

UID = "00000000-0000-4000-8000-0000000000{:02d}"


def container(i: int) -> ContainerTarget:
    return ContainerTarget(name=f"worker-container-{i:02d}", container_id=f"containerd://{i:064x}")


def whole(n: int, containers: int = 2) -> PodTarget:
    return PodTarget(
        uid=UID.format(n),
        namespace="team-a",
        name=f"web-{n}",
        containers=[container(i) for i in range(containers)],
    )


def some(n: int, *which: int) -> PodTarget:
    return whole(n, 0).model_copy(
        update={"all_containers": False, "containers": [container(i) for i in which]}
    )


def assignment(name: str, *pods: PodTarget, **extra: Any) -> ProbeAssignment:
    return ProbeAssignment(
        id=f"team-a/{name}",
        spec_hash="0" * 16,
        spec=TraceProbeSpec(tracepoint="syscalls:sys_enter_openat"),
        targets=ProbeTargets(pods=list(pods), **extra),
    )


def test_each_pod_travels_once_and_resolves_to_what_each_probe_selected() -> None:
    probes = [
        assignment("a", whole(1), some(2, 1)),
        assignment("b", some(2, 0), whole(3), process_names=["nginx"]),
        assignment("c", whole(1)),
    ]
    state = pack_node_state("n1", 3, probes)
    assert [p.uid for p in state.pods] == [UID.format(n) for n in (1, 2, 3)]
    # Pod 2 is in the table with the union of the containers its probes list.
    assert [c.name for c in state.pods[1].containers] == [container(1).name, container(0).name]
    assert all(not p.targets.pods for p in state.probes)
    wire = json.loads(state.model_dump_json(by_alias=True, exclude_none=True))
    assert wire["probes"][0]["targets"]["podRefs"] == [
        {"uid": UID.format(1)},
        {"uid": UID.format(2), "containers": [container(1).name]},
    ]
    back = NodeState.model_validate(wire).resolved()
    assert back.pods == []
    assert [p.targets for p in back.probes] == [p.targets for p in probes]
    assert NodeState.model_validate(back.to_wire()).resolved() == back  # idempotent


def refs_state(refs: list[dict[str, Any]], pods: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "node": "node-1",
        "revision": 1,
        "pods": pods,
        "probes": [
            {
                "id": "team-a/opens",
                "specHash": "0" * 16,
                "spec": {"tracepoint": "syscalls:sys_enter_openat"},
                "targets": {"podRefs": refs},
            }
        ],
    }


TABLE = [{"uid": UID.format(1), "namespace": "team-a", "name": "web-1",
          "containers": [{"name": "app"}]}]  # fmt: skip


@pytest.mark.parametrize(
    ("refs", "pods", "loc", "msg"),
    [
        ([{"uid": UID.format(9)}], TABLE, "probes.0.targets.podRefs.0.uid",
         f"pod {UID.format(9)} is not in the pod table"),
        ([{"uid": UID.format(1), "containers": ["app", "db"]}], TABLE,
         "probes.0.targets.podRefs.0.containers",
         "db: not a container of pod team-a/web-1 in the pod table"),
        ([], TABLE * 2, "pods.1.uid", f"pod {UID.format(1)} is in the pod table twice"),
    ],
    ids=["missing-pod", "missing-container", "twice"],
)  # fmt: skip
async def test_a_reference_outside_the_table_is_a_400_with_its_field(
    agent: TestClient[Any, Any], refs: list[dict[str, Any]], pods: list[Any], loc: str, msg: str
) -> None:
    body = json.dumps(refs_state(refs, pods))
    async with agent.put("/v1/state", data=body, headers=AUTH) as resp:
        assert resp.status == 400
        assert (await resp.json())["fields"] == [{"loc": loc, "msg": msg}]


@pytest.fixture
async def reconciler() -> AsyncIterator[Reconciler]:
    rec = Reconciler(
        node="node-1", loader=FakeLoader(), build_plan=fake_build_plan, cgroups=FakeCgroups()
    )
    yield rec
    await rec.close()


@pytest.fixture
async def agent(reconciler: Reconciler) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(reconciler, token=TOKEN, max_body=MAX_BODY)  # the agent's real limit
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_the_agent_applies_256_probes_over_two_pods_of_64_containers(
    agent: TestClient[Any, Any], reconciler: Reconciler
) -> None:
    probes = [assignment(f"p{i:03d}", whole(1, 64), whole(2, 64)) for i in range(256)]
    body = pack_node_state("node-1", 1, probes).model_dump_json(by_alias=True, exclude_none=True)
    assert len(body) < MAX_BODY // 16
    async with agent.put("/v1/state", data=body, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        report = await resp.json()
    assert len(report["probes"]) == 256
    assert reconciler.state is not None
    assert [p.targets for p in reconciler.state.probes] == [p.targets for p in probes]
