"""Prometheus exposition of probe outputs: values equal the maps, fixed label sets, buckets,
the series cap and its overflow series, the agent's own metrics, promtool's lint."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.unit.output_fakes import (
    FakeAttributor,
    FakeProgram,
    ListBoard,
    make_probe,
    raw_event,
    until,
)
from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.outputs.events import EventHub
from tracekeeper_agent.outputs.metrics import (
    OVERFLOW,
    SAMPLE_LABELS,
    AgentMetrics,
    cap_series,
    cumulative_buckets,
    estimated_sum,
)
from tracekeeper_agent.ports import (
    CountSample,
    HistogramSample,
    KernelCounters,
    PodIdentity,
    SampleKey,
)
from tracekeeper_api.protocol import CgroupClaims, Persistence

PODS = FakeAttributor(
    {
        11: PodIdentity("team-a", "web-0", "app"),
        12: PodIdentity("team-a", "web-0", "sidecar"),
        13: PodIdentity("team-a", "web-1", "app"),
        21: PodIdentity("team-b", "db-0", "pg"),
    }
)


def scrape(
    probes: Sequence[ActiveProbe], **kwargs: object
) -> tuple[dict[str, list[Sample]], AgentMetrics]:
    metrics = AgentMetrics(ListBoard(lambda: probes), PODS, **kwargs)  # type: ignore[arg-type]
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    return families, metrics


def by_labels(samples: list[Sample], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in samples if s.name == name}


def lbl(**labels: str) -> tuple[tuple[str, str], ...]:
    full = dict.fromkeys(SAMPLE_LABELS, "") | labels
    return tuple(sorted(full.items()))


def test_counts_equal_the_map_summed_per_label_set() -> None:
    program = FakeProgram(
        counts=[
            CountSample(SampleKey(cgroup_id=11, comm="nginx"), 5),
            CountSample(SampleKey(cgroup_id=12, comm="nginx"), 3),  # same pod, other container
            CountSample(SampleKey(cgroup_id=13, comm="nginx"), 7),
            CountSample(SampleKey(cgroup_id=11, comm="sh"), 1),
            CountSample(SampleKey(cgroup_id=999, comm="cron"), 2),  # no target owns it
        ],
        counters=KernelCounters(matched=20, sampled_out=2, lru_new_keys=9),
        live=5,
    )
    fams, _ = scrape([make_probe("team-a/opens", program, by=("pod", "comm"))])
    hits = by_labels(fams["tracekeeper_probe_hits"], "tracekeeper_probe_hits_total")
    ns = {"namespace": "team-a", "probe": "opens"}
    assert hits == {
        lbl(**ns, pod="web-0", comm="nginx"): 8.0,
        lbl(**ns, pod="web-1", comm="nginx"): 7.0,
        lbl(**ns, pod="web-0", comm="sh"): 1.0,
        lbl(**ns, pod="", comm="cron"): 2.0,
    }
    probe_lbl = (("namespace", "team-a"), ("probe", "opens"))
    assert by_labels(fams["tracekeeper_probe_matched"], "tracekeeper_probe_matched_total") == {
        probe_lbl: 20.0
    }
    assert by_labels(
        fams["tracekeeper_probe_sampled_out"], "tracekeeper_probe_sampled_out_total"
    ) == {probe_lbl: 2.0}
    assert by_labels(
        fams["tracekeeper_probe_map_evictions"], "tracekeeper_probe_map_evictions_total"
    ) == {probe_lbl: 4.0}


def test_every_sample_of_a_family_has_the_same_label_set() -> None:
    probes = [
        make_probe(
            "team-a/by-pid",
            FakeProgram(counts=[CountSample(SampleKey(pid=7), 1)]),
            by=("pid",),
        ),
        make_probe(
            "team-a/by-container",
            FakeProgram(counts=[CountSample(SampleKey(cgroup_id=11), 1)]),
            by=("container",),
        ),
        make_probe("team-a/total", FakeProgram(counts=[CountSample(SampleKey(), 9)]), by=()),
    ]
    fams, _ = scrape(probes)
    samples = fams["tracekeeper_probe_hits"]
    assert {tuple(sorted(s.labels)) for s in samples} == {tuple(sorted(SAMPLE_LABELS))}
    hits = by_labels(samples, "tracekeeper_probe_hits_total")
    assert hits[lbl(namespace="team-a", probe="by-pid", pid="7")] == 1.0
    assert hits[lbl(namespace="team-a", probe="by-container", container="app")] == 1.0
    assert hits[lbl(namespace="team-a", probe="total")] == 9.0


def test_pod_of_another_namespace_is_qualified() -> None:
    program = FakeProgram(counts=[CountSample(SampleKey(cgroup_id=21), 4)])
    fams, _ = scrape([make_probe("tracekeeper-system/all-opens", program)])
    hits = by_labels(fams["tracekeeper_probe_hits"], "tracekeeper_probe_hits_total")
    assert hits == {lbl(namespace="tracekeeper-system", probe="all-opens", pod="team-b/db-0"): 4.0}


def test_histogram_buckets_are_cumulative_le_powers_of_two() -> None:
    program = FakeProgram(
        histograms=[
            HistogramSample(SampleKey(cgroup_id=11), {0: 1, 3: 4, 5: 2}),
            HistogramSample(SampleKey(cgroup_id=12), {3: 1}),  # same pod: summed
            HistogramSample(SampleKey(cgroup_id=13), {1: 6}),
        ]
    )
    fams, _ = scrape([make_probe("team-a/read-latency", program, kind="histogram")])
    samples = fams["tracekeeper_probe_value"]
    web0 = [s for s in samples if s.labels.get("pod") == "web-0"]
    buckets = {s.labels["le"]: s.value for s in web0 if s.name.endswith("_bucket")}
    # slot s holds [2**s, 2**(s+1)): its bound is le=2**(s+1); only slots holding values.
    assert buckets == {"2.0": 1.0, "16.0": 6.0, "64.0": 8.0, "+Inf": 8.0}
    count = next(s.value for s in web0 if s.name == "tracekeeper_probe_value_count")
    total = next(s.value for s in web0 if s.name == "tracekeeper_probe_value_sum")
    assert count == 8.0
    assert total == 1.0 + 5 * 12.0 + 2 * 48.0
    # web-1 has its own buckets: slot 1 only.
    web1 = {
        s.labels["le"]: s.value
        for s in samples
        if s.labels.get("pod") == "web-1" and s.name.endswith("_bucket")
    }
    assert web1 == {"4.0": 6.0, "+Inf": 6.0}


def test_a_bucket_once_shown_stays_as_the_kernel_counts_grow() -> None:
    program = FakeProgram(histograms=[HistogramSample(SampleKey(cgroup_id=11), {9: 1})])
    probe = make_probe("team-a/read-latency", program, kind="histogram")
    metrics = AgentMetrics(ListBoard(lambda: [probe]), PODS)
    assert 'le="1024.0"' in generate_latest(metrics.registry).decode()
    program.histograms = [HistogramSample(SampleKey(cgroup_id=11), {2: 1, 9: 1})]
    text = generate_latest(metrics.registry).decode()
    assert 'le="8.0"' in text and 'le="1024.0"' in text


def test_cumulative_buckets_and_sum_helpers() -> None:
    assert cumulative_buckets({1: 2, 3: 0, 4: 1}) == [("4.0", 2.0), ("32.0", 3.0), ("+Inf", 3.0)]
    assert cumulative_buckets({}) == [("+Inf", 0.0)]
    assert estimated_sum({0: 2, 10: 1}) == 2.0 + 1536.0


def test_series_cap_keeps_the_largest_and_sums_the_rest() -> None:
    counts = [
        CountSample(SampleKey(pid=p), v) for p, v in [(1, 50), (2, 40), (3, 3), (4, 2), (5, 1)]
    ]
    program = FakeProgram(counts=counts)
    fams, _ = scrape([make_probe("team-a/by-pid", program, by=("pid",))], series_cap=3)
    hits = by_labels(fams["tracekeeper_probe_hits"], "tracekeeper_probe_hits_total")
    ns = {"namespace": "team-a", "probe": "by-pid"}
    assert hits == {
        lbl(**ns, pid="1"): 50.0,
        lbl(**ns, pid="2"): 40.0,
        lbl(**ns, pod=OVERFLOW): 6.0,
    }
    assert sum(hits.values()) == sum(c.value for c in counts)


def test_series_cap_applies_to_histograms() -> None:
    hists = [HistogramSample(SampleKey(pid=p), {p: p}) for p in range(1, 6)]
    fams, _ = scrape(
        [make_probe("team-a/lat", FakeProgram(histograms=hists), kind="histogram", by=("pid",))],
        series_cap=2,
    )
    counts = {
        (s.labels["pod"], s.labels["pid"]): s.value
        for s in fams["tracekeeper_probe_value"]
        if s.name == "tracekeeper_probe_value_count"
    }
    assert counts == {("", "5"): 5.0, (OVERFLOW, ""): 10.0}


def test_cap_series_under_the_cap_keeps_everything() -> None:
    kept, overflow = cap_series({("a", "", "", ""): 1}, lambda v: v, 1, sum)
    assert kept == [(("a", "", "", ""), 1)]
    assert overflow is None


async def test_events_and_drops_by_reason() -> None:
    program = FakeProgram(rate_limit=6)
    probe = make_probe("team-a/execs", program, kind="events")
    hub = EventHub(PODS, queue_bytes=1)
    await hub.sync([probe])
    try:
        async with hub.subscribe("team-a/execs"):  # never read: the first chunk queued,
            program.emit([raw_event(n) for n in range(3)])  # the next one is backlog
            await until(lambda: hub.counts(probe.id).received == 3)
            program.emit([raw_event(n) for n in range(3, 10)])
            await until(lambda: hub.counts(probe.id).received == 6)
            fams, _ = scrape([probe])
    finally:
        await hub.close()
    ids = {"namespace": "team-a", "probe": "execs"}
    assert by_labels(fams["tracekeeper_probe_events"], "tracekeeper_probe_events_total") == {
        tuple(sorted(ids.items())): 6.0
    }
    dropped = {
        s.labels["reason"]: s.value
        for s in fams["tracekeeper_probe_events_dropped"]
        if s.name == "tracekeeper_probe_events_dropped_total"
    }
    assert dropped == {"rate_limit": 4.0, "ring_full": 0.0, "backlog": 3.0}


def test_agent_self_metrics() -> None:
    probes = [
        make_probe("team-a/a", FakeProgram(counters=KernelCounters(lru_new_keys=1), live=3)),
        make_probe("team-a/b", FakeProgram()),
    ]
    probes[0].filter_entries = 12
    fams, metrics = scrape(probes)
    assert fams["tracekeeper_agent_programs_loaded"][0].value == 2.0
    assert by_labels(
        fams["tracekeeper_agent_filter_entries"], "tracekeeper_agent_filter_entries"
    ) == {
        (("namespace", "team-a"), ("probe", "a")): 12.0,
        (("namespace", "team-a"), ("probe", "b")): 0.0,
    }
    # More live keys than new ones (the map outlived a counter reset): never negative.
    evictions = by_labels(
        fams["tracekeeper_probe_map_evictions"], "tracekeeper_probe_map_evictions_total"
    )
    assert evictions[(("namespace", "team-a"), ("probe", "a"))] == 0.0

    metrics.observe_compile(0.3)
    with metrics.time_compile():
        pass
    text = generate_latest(metrics.registry).decode()
    compile_samples = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "tracekeeper_agent_compile_seconds"
        for s in f.samples
    }
    assert compile_samples["tracekeeper_agent_compile_seconds_count"] == 2.0


def test_a_probe_that_fails_to_read_is_skipped() -> None:
    class Broken(FakeProgram):
        def read_counts(self, bit: int) -> list[CountSample]:
            raise OSError("map closed")

    ok = FakeProgram(counts=[CountSample(SampleKey(cgroup_id=11), 1)])
    fams, _ = scrape([make_probe("team-a/broken", Broken()), make_probe("team-a/ok", ok)])
    hits = by_labels(fams["tracekeeper_probe_hits"], "tracekeeper_probe_hits_total")
    assert hits == {lbl(namespace="team-a", probe="ok", pod="web-0"): 1.0}


def test_second_collector_with_the_same_names_is_refused() -> None:
    metrics = AgentMetrics(ListBoard(lambda: []), PODS)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        AgentMetrics(ListBoard(lambda: []), PODS, registry=metrics.registry)


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/setup.sh)")
    probes = [
        make_probe(
            "team-a/opens",
            FakeProgram(counts=[CountSample(SampleKey(cgroup_id=11, comm="nginx"), 3)]),
            by=("pod", "comm"),
        ),
        make_probe(
            "team-a/lat",
            FakeProgram(histograms=[HistogramSample(SampleKey(cgroup_id=11), {10: 2})]),
            kind="histogram",
        ),
        make_probe("team-a/execs", FakeProgram(), kind="events"),
    ]
    for p in probes:
        p.filter_entries = 1
    _, metrics = scrape(probes)
    metrics.observe_compile(0.25)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(metrics.registry),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert result.stdout + result.stderr == b""


def test_cgroup_claims_are_read_at_scrape_time() -> None:
    metrics = AgentMetrics(ListBoard(lambda: []), PODS)
    now = [CgroupClaims(pending_pods=2, pending_paths=6, capacity=2048, left_out_pods=1)]
    metrics.add_claims(lambda: now[0])
    now[0] = now[0].model_copy(update={"claimed": 5, "identity_full": 1})
    text = generate_latest(metrics.registry).decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["tracekeeper_agent_pending_cgroup_pods"] == 2.0
    assert values["tracekeeper_agent_pending_cgroup_paths"] == 6.0
    assert values["tracekeeper_agent_pending_cgroup_paths_capacity"] == 2048.0
    assert values["tracekeeper_agent_pending_cgroup_pods_left_out"] == 1.0  # never silent
    assert values["tracekeeper_agent_cgroups_claimed_total"] == 5.0
    assert values["tracekeeper_agent_cgroup_claims_identity_full_total"] == 1.0


def test_a_failing_save_is_a_metric() -> None:
    """Issue 18's chaos: a full state directory was a log line only."""
    metrics = AgentMetrics(ListBoard(lambda: []), PODS)
    now = [Persistence(revision=3)]
    metrics.add_persistence(lambda: now[0])

    def values() -> dict[str, float]:
        text = generate_latest(metrics.registry).decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    assert values()["tracekeeper_agent_state_saved"] == 1.0
    assert values()["tracekeeper_agent_state_saved_revision"] == 3.0
    now[0] = Persistence(revision=3, error="revision 4 not saved: [Errno 28] No space")
    assert values()["tracekeeper_agent_state_saved"] == 0.0
