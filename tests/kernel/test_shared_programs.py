# ruff: noqa: F811  (the fixtures imported from test_agent_api are arguments here)
"""Shared programs on the real kernel, through the real agent: probes of one shape are
bindings of one BPF program, each counting only its own targets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.conftest import run_in_cgroup
from tests.kernel.test_agent_api import (  # noqa: F401  (fixtures)
    AUTH,
    RunningAgent,
    fake_pod,
    kubepods,
    make_agent,
    run_cat,
    wait_for,
)
from tests.kernel.test_probe_kinds import PY, getppid_loop
from tracekeeper_sim.kubelet import create_cgroup
from tracekeeper_sim.served_agent import FakePod

pytestmark = pytest.mark.kernel

Agent = Callable[[], Awaitable[RunningAgent]]


def opens(ns: str, name: str, *pods: FakePod, **spec: Any) -> dict[str, Any]:
    return {
        "id": f"{ns}/{name}",
        "specHash": f"{abs(hash((name, json.dumps(spec, sort_keys=True)))):016x}"[:16],
        "spec": {
            "tracepoint": "syscalls:sys_enter_openat",
            "output": {"by": ["pod"]},
            **spec,
        },
        "targets": {"pods": [p.target() for p in pods]},
    }


def getppid_events(ns: str, name: str, *pods: FakePod, **spec: Any) -> dict[str, Any]:
    probe = opens(ns, name, *pods, **spec)
    probe["spec"]["tracepoint"] = "syscalls:sys_enter_getppid"
    probe["spec"].setdefault("output", {})
    probe["spec"]["output"] = {"kind": "events", **spec.get("output", {})}
    return probe


def sample(metrics_text: str, family: str, probe: str, **labels: str) -> float:
    """The value of one series of `family` for probe ns/name (0 when absent)."""
    ns, name = probe.split("/")
    want = {"namespace": ns, "probe": name, **labels}
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(family + "{"):
            continue
        body = line[len(family) + 1 : line.index("}")]
        have = dict(part.split("=", 1) for part in body.split(",") if part)
        if all(have.get(k, "").strip('"') == v for k, v in want.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def compiles(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("tracekeeper_agent_compile_seconds_count"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_two_namespaces_share_one_program_and_count_only_their_own_pods(
    make_agent: Agent, kubepods: Path
) -> None:
    a = FakePod.new(kubepods, "web-a", namespace="team-a")
    b = FakePod.new(kubepods, "web-b", namespace="team-b")
    for pod in (a, b):
        create_cgroup(pod.container_dir)
    agent = await make_agent()
    report = await agent.put(1, opens("team-a", "opens", a), opens("team-b", "opens", b))
    pa, pb = report["probes"]
    assert pa["state"] == pb["state"] == "Loaded", report
    assert pa["programIds"] == pb["programIds"] and pa["programIds"]
    assert pa["sharedBy"] == pb["sharedBy"] == 2 and pa["shape"] == pb["shape"]
    assert compiles(await agent.metrics()) == 1
    await run_cat(a.container_dir, times=3)
    await run_cat(b.container_dir, times=5)

    async def both_counted() -> bool:
        text = await agent.metrics()
        return (
            sample(text, "tracekeeper_probe_hits_total", "team-a/opens", pod="web-a") >= 3
            and sample(text, "tracekeeper_probe_hits_total", "team-b/opens", pod="web-b") >= 5
        )

    await wait_for("both pods counted", both_counted)
    text = await agent.metrics()
    # Each binding's bit is set only on its own pods: no hit of the other's pod, anywhere.
    assert sample(text, "tracekeeper_probe_hits_total", "team-a/opens", pod="web-b") == 0
    assert sample(text, "tracekeeper_probe_hits_total", "team-b/opens", pod="web-a") == 0
    assert sample(text, "tracekeeper_probe_hits_total", "team-a/opens", pod="team-b/web-b") == 0
    assert sample(text, "tracekeeper_agent_programs_loaded", "team-a/opens") == 0  # no labels


async def test_adding_removing_and_editing_bindings_keeps_the_program(
    make_agent: Agent, kubepods: Path
) -> None:
    a = FakePod.new(kubepods, "web-a", namespace="team-a")
    create_cgroup(a.container_dir)
    agent = await make_agent()
    first = (await agent.put(1, opens("team-a", "one", a)))["probes"][0]
    ids = first["programIds"]
    revisions = [
        [opens("team-a", "one", a), opens("team-a", "two", a)],
        [opens("team-a", "two", a)],  # the first binding goes, the program stays
        [opens("team-a", "two", a, sampling=4)],  # sampling: a map write
        # the first processNames and pids of a binding: map writes
        [
            {
                **opens("team-a", "two", a, sampling=4),
                "targets": {"pods": [a.target()], "processNames": ["cat"]},
            }
        ],
        [opens("team-a", "two", a, output={"by": ["pod"]}), opens("team-a", "three", a)],
    ]
    for revision, probes in enumerate(revisions, start=2):
        report = await agent.put(revision, *probes)
        for outcome in report["probes"]:
            assert outcome["state"] == "Loaded", outcome
            assert outcome["programIds"] == ids, (revision, outcome)
    assert compiles(await agent.metrics()) == 1  # one compile for all of it


async def test_per_binding_sampling_and_rate_limit_account_exactly(
    make_agent: Agent, kubepods: Path
) -> None:
    a = FakePod.new(kubepods, "job-a", namespace="team-a")
    create_cgroup(a.container_dir)
    agent = await make_agent()
    probes = [
        getppid_events("team-a", "all", a),
        getppid_events("team-a", "sampled", a, sampling=4),
        getppid_events("team-a", "limited", a, output={"rateLimit": 100}),
    ]
    report = await agent.put(1, *probes)
    assert {p["sharedBy"] for p in report["probes"]} == {3}
    await asyncio.to_thread(run_in_cgroup, a.container_dir, *getppid_loop(2000))
    ids = [p["id"] for p in probes]

    def identity(text: str, probe: str) -> tuple[float, float]:
        matched = sample(text, "tracekeeper_probe_matched_total", probe)
        sampled_out = sample(text, "tracekeeper_probe_sampled_out_total", probe)
        received = sample(text, "tracekeeper_probe_events_total", probe)
        dropped = sample(text, "tracekeeper_probe_events_dropped_total", probe)
        return matched - sampled_out, received + dropped - 0  # backlog is in dropped

    async def settled() -> bool:
        text = await agent.metrics()
        return all(identity(text, p)[0] == identity(text, p)[1] for p in ids)

    await wait_for("every event read or counted dropped", settled)
    text = await agent.metrics()
    for probe in ids:  # the python interpreter calls getppid too: at least 2000
        assert sample(text, "tracekeeper_probe_matched_total", probe) >= 2000
    assert sample(text, "tracekeeper_probe_sampled_out_total", "team-a/all") == 0
    assert sample(text, "tracekeeper_probe_sampled_out_total", "team-a/limited") == 0
    sampled_out = sample(text, "tracekeeper_probe_sampled_out_total", "team-a/sampled")
    assert 0.6 * 2000 < sampled_out < 0.9 * 2000  # 3 in 4, in kernel
    limited = sample(
        text, "tracekeeper_probe_events_dropped_total", "team-a/limited", reason="rate_limit"
    )
    assert limited >= 2000 - 2 * 100  # at most 100 per second window (two windows at most)
    for probe in ("team-a/all", "team-a/sampled"):
        assert (
            sample(text, "tracekeeper_probe_events_dropped_total", probe, reason="rate_limit") == 0
        )


async def test_a_hundred_probes_on_one_tracepoint_are_all_loaded(
    make_agent: Agent, kubepods: Path
) -> None:
    a = FakePod.new(kubepods, "web-a", namespace="team-a")
    create_cgroup(a.container_dir)
    agent = await make_agent()
    report = await agent.put(1, *[opens("team-a", f"p{i:03d}", a) for i in range(100)])
    assert {p["state"] for p in report["probes"]} == {"Loaded"}
    programs = {tuple(p["programIds"]) for p in report["probes"]}
    assert len(programs) == 2  # 64 bindings, then a second program of the shape
    assert sorted({p["sharedBy"] for p in report["probes"]}) == [36, 64]
    assert compiles(await agent.metrics()) == 2
    await run_cat(a.container_dir, times=2)

    async def all_counted() -> bool:
        text = await agent.metrics()
        return all(
            sample(text, "tracekeeper_probe_hits_total", f"team-a/p{i:03d}", pod="web-a") >= 2
            for i in range(100)
        )

    await wait_for("every one of the 100 probes counting", all_counted)


async def test_a_shape_changing_edit_keeps_counting(make_agent: Agent, kubepods: Path) -> None:
    a = FakePod.new(kubepods, "web-a", namespace="team-a")
    create_cgroup(a.container_dir)
    agent = await make_agent()
    first = (await agent.put(1, opens("team-a", "opens", a), opens("team-a", "other", a)))[
        "probes"
    ][0]
    moved = opens("team-a", "opens", a, output={"by": ["pod", "comm"]})
    report = await agent.put(2, moved, opens("team-a", "other", a))
    opened, other = report["probes"]
    assert opened["state"] == "Loaded" and opened["programIds"] != first["programIds"]
    assert other["programIds"] == first["programIds"]  # the other binding stays put
    assert opened["sharedBy"] == other["sharedBy"] == 1
    await run_cat(a.container_dir, times=3)

    async def counted() -> bool:
        text = await agent.metrics()
        return sample(text, "tracekeeper_probe_hits_total", "team-a/opens", comm="cat") >= 3

    await wait_for("the moved probe counting in its new program", counted)


async def test_restart_resumes_shapes_and_bindings(make_agent: Agent, kubepods: Path) -> None:
    a = FakePod.new(kubepods, "web-a", namespace="team-a")
    b = FakePod.new(kubepods, "web-b", namespace="team-b")
    for pod in (a, b):
        create_cgroup(pod.container_dir)
    first = await make_agent()
    before = (await first.put(4, opens("team-a", "opens", a), opens("team-b", "opens", b)))[
        "probes"
    ]
    await first.stop()
    restarted = await make_agent()
    after = (await restarted.state())["probes"]
    assert [(p["id"], p["shape"], p["sharedBy"], p["state"]) for p in after] == [
        (p["id"], p["shape"], p["sharedBy"], p["state"]) for p in before
    ]
    assert after[0]["programIds"] == after[1]["programIds"]
    await run_cat(b.container_dir, times=2)

    async def counted() -> bool:
        text = await restarted.metrics()
        return sample(text, "tracekeeper_probe_hits_total", "team-b/opens", pod="web-b") >= 2

    await wait_for("the resumed binding counting", counted)
    text = await restarted.metrics()
    assert sample(text, "tracekeeper_probe_hits_total", "team-a/opens", pod="web-b") == 0


async def test_events_reach_only_their_own_probes_subscribers(
    make_agent: Agent, kubepods: Path
) -> None:
    a = FakePod.new(kubepods, "job-a", namespace="team-a")
    b = FakePod.new(kubepods, "job-b", namespace="team-b")
    for pod in (a, b):
        create_cgroup(pod.container_dir)
    agent = await make_agent()
    report = await agent.put(
        1, getppid_events("team-a", "calls", a), getppid_events("team-b", "calls", b)
    )
    assert report["probes"][0]["programIds"] == report["probes"][1]["programIds"]
    seen: dict[str, list[dict[str, Any]]] = {"team-a/calls": [], "team-b/calls": []}

    async def follow(probe: str, want: int) -> None:
        async with agent.client.get(f"/v1/events?probe={probe}", headers=AUTH) as resp:
            assert resp.status == 200
            ready.set()
            while len(seen[probe]) < want:
                line = await resp.content.readline()
                assert line, "the event stream ended"
                seen[probe].append(json.loads(line))

    ready = asyncio.Event()
    code = "import os\nfor _ in range(50): os.getppid()"
    reader_a = asyncio.create_task(follow("team-a/calls", 50))
    await ready.wait()
    ready.clear()
    reader_b = asyncio.create_task(follow("team-b/calls", 70))
    await ready.wait()
    await asyncio.to_thread(run_in_cgroup, a.container_dir, PY, "-S", "-c", code)
    code_b = "import os\nfor _ in range(70): os.getppid()"
    await asyncio.to_thread(run_in_cgroup, b.container_dir, PY, "-S", "-c", code_b)
    async with asyncio.timeout(30):
        await asyncio.gather(reader_a, reader_b)
    assert {(e["namespace"], e["pod"], e["probe"]) for e in seen["team-a/calls"]} == {
        ("team-a", "job-a", "team-a/calls")
    }
    assert {(e["namespace"], e["pod"], e["probe"]) for e in seen["team-b/calls"]} == {
        ("team-b", "job-b", "team-b/calls")
    }
