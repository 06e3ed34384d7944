"""Kernel tier for the outputs: metrics equal the real maps, and events go through a real ring
buffer with every loss accounted for (rate limit, full ring, slow subscriber)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.kernel.conftest import bind, load_alone, run_in_cgroup
from tests.unit.output_fakes import ListBoard, until
from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.bpf.loader import BccProgram
from tracekeeper_agent.outputs.events import EventHub
from tracekeeper_agent.outputs.metrics import AgentMetrics, cumulative_buckets
from tracekeeper_agent.ports import FilterEntries, PodIdentity
from tracekeeper_agent.targets.cgroups import cgroup_id
from tracekeeper_api.protocol import ProbeAssignment
from tracekeeper_sim.kubelet import create_cgroup

pytestmark = pytest.mark.kernel

PY = "/usr/bin/python3"
PODS = {
    "pods": [
        {"uid": "00000000-0000-0000-0000-00000000000a", "namespace": "t", "name": "pod-a"},
        {"uid": "00000000-0000-0000-0000-00000000000b", "namespace": "t", "name": "pod-b"},
    ]
}


def getppid_loop(n: int) -> list[str]:
    return [PY, "-S", "-c", f"import os\nfor _ in range({n}): os.getppid()"]


class CgroupPods:
    """Attributor over the test's cgroups: container cgroup id -> pod/container."""

    def __init__(self, layout: dict[str, Path]) -> None:
        self.ids = {
            cgroup_id(path): PodIdentity("t", *name.split("/"))
            for name, path in layout.items()
            if "/" in name
        }

    def identify(self, cgroup: int) -> PodIdentity | None:
        return self.ids.get(cgroup)


@pytest.fixture
def pods(cgroup_sandbox: Path) -> dict[str, Path]:
    """pod-a with containers c1 and c2, pod-b with c1: kubelet-style nesting."""
    layout = {"pod-a": cgroup_sandbox / "pod-a", "pod-b": cgroup_sandbox / "pod-b"}
    for name in ("pod-a/c1", "pod-a/c2", "pod-b/c1"):
        layout[name] = cgroup_sandbox / name
        create_cgroup(layout[name])  # and its pod-level parent
    return layout


def load(programs: list[BccProgram], spec: dict[str, Any], pods: dict[str, Path]) -> ActiveProbe:
    assignment = ProbeAssignment.model_validate(
        {"id": "t/probe", "specHash": "0" * 16, "spec": spec, "targets": PODS}
    )
    program = load_alone(programs, assignment)
    plan = program.plan
    bind(
        program,
        FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"]), cgroup_id(pods["pod-b"])})),
    )
    return ActiveProbe(assignment=assignment, plan=plan, program=program)


def scrape(probe: ActiveProbe, attributor: CgroupPods, **kwargs: Any) -> dict[str, list[Sample]]:
    metrics = AgentMetrics(ListBoard(lambda: [probe]), attributor, **kwargs)
    text = generate_latest(metrics.registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_count_metrics_equal_the_map(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    spec = {"tracepoint": "syscalls:sys_enter_getppid", "output": {"by": ["pod", "comm"]}}
    probe = load(loaded, spec, pods)
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(500))
    run_in_cgroup(pods["pod-a/c2"], *getppid_loop(200))  # same pod, other container
    run_in_cgroup(pods["pod-b/c1"], *getppid_loop(300))
    attributor = CgroupPods(pods)

    in_map: dict[tuple[str, str], int] = {}
    for s in probe.program.read_counts(0):
        ident = attributor.identify(s.key.cgroup_id or 0)
        assert ident is not None, f"a key of a cgroup the test did not make: {s.key}"
        key = (ident.pod, s.key.comm or "")
        in_map[key] = in_map.get(key, 0) + s.value
    assert in_map == {("pod-a", "python3"): 700, ("pod-b", "python3"): 300}

    fams = scrape(probe, attributor)
    hits = {
        (s.labels["pod"], s.labels["comm"]): int(s.value)
        for s in fams["tracekeeper_probe_hits"]
        if s.name == "tracekeeper_probe_hits_total"
    }
    assert hits == in_map
    matched = fams["tracekeeper_probe_matched"][0]
    assert matched.value == probe.program.read_counters(0).matched == 1000
    assert fams["tracekeeper_probe_map_evictions"][0].value == 0


def test_histogram_metrics_equal_the_map(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    spec = {"syscall": {"name": "getppid", "latency": True}, "output": {"kind": "histogram"}}
    probe = load(loaded, spec, pods)
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(400))
    (h,) = probe.program.read_histograms(0)
    assert sum(h.buckets.values()) == 400

    samples = scrape(probe, CgroupPods(pods))["tracekeeper_probe_value"]
    assert {s.labels["pod"] for s in samples} == {"pod-a"}
    buckets = [
        (s.labels["le"], s.value) for s in samples if s.name == "tracekeeper_probe_value_bucket"
    ]
    assert buckets == cumulative_buckets(h.buckets)
    count = next(s.value for s in samples if s.name == "tracekeeper_probe_value_count")
    assert count == 400


async def test_events_rate_limited_and_backlog_accounted_exactly(
    loaded: list[BccProgram], pods: dict[str, Path]
) -> None:
    spec = {
        "tracepoint": "syscalls:sys_enter_getppid",
        "output": {"kind": "events", "rateLimit": 300},
    }
    probe = load(loaded, spec, pods)
    attributor = CgroupPods(pods)
    hub = EventHub(attributor, queue_bytes=1)  # a chunk queued fills it
    await hub.sync([probe])
    try:
        slow = hub.subscribe(probe.id)  # read only at the end: later chunks are backlog
        counts = hub.counts(probe.id)
        for second in range(2):
            if second:
                await asyncio.sleep(1.1)  # the next rate limit window: more events get in
            await asyncio.to_thread(run_in_cgroup, pods["pod-a/c1"], *getppid_loop(1000))
            kernel = probe.program.read_counters(0)
            produced = kernel.matched - kernel.sampled_out
            in_ring = produced - kernel.rate_limited - kernel.ring_full
            await until(lambda: counts.received == in_ring)  # noqa: B023 (awaited here)
        delivered = [json.loads(line) for line in slow.drain().splitlines()]

        assert kernel.matched == 2000
        assert kernel.rate_limited >= 2000 - 2 * 300  # two one-second windows
        assert len(delivered) == slow.events == counts.delivered > 0
        assert counts.backlog == slow.dropped > 0
        assert kernel.rate_limited + kernel.ring_full + counts.backlog == produced - len(delivered)
        assert {(e["pod"], e["container"], e["comm"]) for e in delivered} == {
            ("pod-a", "c1", "python3")
        }

        fams = scrape(probe, attributor)
        dropped = {
            s.labels["reason"]: s.value
            for s in fams["tracekeeper_probe_events_dropped"]
            if s.name.endswith("_total")
        }
        assert dropped == {
            "rate_limit": kernel.rate_limited,
            "ring_full": kernel.ring_full,
            "backlog": counts.backlog,
        }
        assert fams["tracekeeper_probe_events"][0].value == counts.received
    finally:
        await hub.close()


async def test_a_full_ring_is_counted_exactly(
    loaded: list[BccProgram], pods: dict[str, Path]
) -> None:
    spec = {"tracepoint": "syscalls:sys_enter_getppid", "output": {"kind": "events"}}
    probe = load(loaded, spec, pods)
    # No poller yet: 100 000 records overflow the 2 MiB ring (about 48 bytes each).
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(100_000))
    hub = EventHub(CgroupPods(pods), queue_bytes=1 << 30)
    sub = hub.subscribe(probe.id)
    await hub.sync([probe])
    try:
        kernel = probe.program.read_counters(0)
        counts = hub.counts(probe.id)
        await until(lambda: counts.received == kernel.matched - kernel.ring_full)
        assert kernel.matched == 100_000
        assert kernel.ring_full > 0
        assert counts.backlog == 0
        assert sub.drain().count(b"\n") == counts.delivered == counts.received
    finally:
        await hub.close()
