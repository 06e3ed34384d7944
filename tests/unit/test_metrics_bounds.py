"""What one scrape can cost: series caps per probe, namespace and node (with the overflow
series counted), only used histogram buckets (still valid cumulative histograms with +Inf),
and the programs lock held per probe read, never for the whole scrape.

The worst case of the issue: 16 histogram probes x 500 series, each series with values in
every one of 64 slots (every bucket used)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections import defaultdict
from collections.abc import Sequence

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.output_fakes import FakeAttributor, FakeProgram, ListBoard, make_probe
from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.outputs.metrics import (
    DEFAULT_NAMESPACE_SERIES_CAP,
    DEFAULT_NODE_SERIES_CAP,
    MAX_HISTOGRAM_SERIES,
    OVERFLOW,
    AgentMetrics,
)
from tracekeeper_agent.ports import HistogramSample, KernelCounters, SampleKey

PROBES, SERIES, SLOTS = 16, 500, 64
MAX_SCRAPE_BYTES = 8 * 1024 * 1024
"""The bound for a node's whole scrape, worst case (was ~1 GB; 68 MB at 16 x 500 x 66):
the node cap of 40,000 series at ~150 bytes a line."""


def histogram_probes(namespaces: Sequence[str], slots: int) -> list[ActiveProbe]:
    probes = []
    for i in range(PROBES):
        ns = namespaces[i % len(namespaces)]
        hists = [
            HistogramSample(SampleKey(pid=pid), {s: 1 + (pid + s) % 7 for s in range(slots)})
            for pid in range(1, SERIES + 1)
        ]
        program = FakeProgram(histograms=hists)
        probes.append(make_probe(f"{ns}/lat-{i:02d}", program, kind="histogram", by=("pid",)))
    return probes


def parse(text: str) -> dict[str, list[tuple[dict[str, str], str, float]]]:
    out: dict[str, list[tuple[dict[str, str], str, float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.labels, s.name, s.value) for s in fam.samples]
    return out


def series_by_probe(samples: list[tuple[dict[str, str], str, float]]) -> dict[str, int]:
    per: dict[str, int] = defaultdict(int)
    for labels, name, _ in samples:
        if name.endswith("_count"):
            per[f"{labels['namespace']}/{labels['probe']}"] += 1
    return dict(per)


def assert_valid_histograms(samples: list[tuple[dict[str, str], str, float]]) -> None:
    """Per series: cumulative (non-decreasing in le), a +Inf bucket equal to _count."""
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = defaultdict(list)
    counts = {}
    for labels, name, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if name.endswith("_bucket"):
            buckets[key].append((float(labels["le"]), value))
        elif name.endswith("_count"):
            counts[key] = value
    assert set(buckets) == set(counts)
    for key, bs in buckets.items():
        bs.sort()
        assert bs[-1][0] == float("inf"), key
        assert bs[-1][1] == counts[key], key
        values = [v for _, v in bs]
        assert values == sorted(values), key


def check_scrape(text: str, probes: list[ActiveProbe], series_cap: int) -> None:
    """At most `series_cap` series plus one overflow label set per probe; every probe's label
    sets kept or counted as overflowed; totals unchanged; valid histograms; bounded bytes."""
    fams = parse(text)
    samples = fams["tracekeeper_probe_value"]
    # Every sample line is one Prometheus series (each bucket is its own series).
    assert len(samples) <= series_cap + PROBES * MAX_HISTOGRAM_SERIES, len(samples)
    overflowed = {
        f"{labels['namespace']}/{labels['probe']}": value
        for labels, _, value in fams["tracekeeper_probe_series_overflowed"]
    }
    label_sets = series_by_probe(samples)
    folded = {
        f"{labels['namespace']}/{labels['probe']}"
        for labels, name, _ in samples
        if name.endswith("_count") and labels["pod"] == OVERFLOW
    }
    assert {p: label_sets[p] - (p in folded) + overflowed[p] for p in label_sets} == {
        p.id: SERIES for p in probes
    }
    assert folded, "the test must reach the caps"
    expected = float(sum(sum(h.buckets.values()) for h in probes[0].read_histograms()))
    totals: dict[str, float] = defaultdict(float)
    for labels, name, value in samples:
        if name.endswith("_count"):
            totals[labels["probe"]] += value
    assert set(totals.values()) == {expected}  # nothing lost: the overflow carries the rest
    assert_valid_histograms(samples)
    assert len(text) < MAX_SCRAPE_BYTES, len(text)


def test_one_namespace_is_capped_per_node_with_overflow_series_counted() -> None:
    probes = histogram_probes(["team-a"], SLOTS)
    text = generate_latest(
        AgentMetrics(ListBoard(lambda: probes), FakeAttributor()).registry
    ).decode()
    check_scrape(text, probes, DEFAULT_NAMESPACE_SERIES_CAP)
    per_probe = series_by_probe(parse(text)["tracekeeper_probe_value"])
    # Probes in id order take the namespace's budget; the last ones keep only their
    # overflow label set, which carries their sums.
    # (The overflow's room, a full histogram, is reserved first.)
    room = DEFAULT_NAMESPACE_SERIES_CAP - MAX_HISTOGRAM_SERIES
    assert per_probe["team-a/lat-00"] == room // (SLOTS + 3) + 1
    assert per_probe["team-a/lat-15"] == 1


def test_the_node_cap_bounds_many_namespaces() -> None:
    probes = histogram_probes([f"team-{i:02d}" for i in range(PROBES)], SLOTS)
    text = generate_latest(
        AgentMetrics(ListBoard(lambda: probes), FakeAttributor()).registry
    ).decode()
    check_scrape(text, probes, DEFAULT_NODE_SERIES_CAP)


def test_label_sets_per_probe_are_capped_too() -> None:
    probes = histogram_probes(["team-a"], 2)[:1]  # 500 label sets of 5 series each
    small = AgentMetrics(ListBoard(lambda: probes), FakeAttributor(), series_cap=100)
    per_probe = series_by_probe(
        parse(generate_latest(small.registry).decode())["tracekeeper_probe_value"]
    )
    assert per_probe == {"team-a/lat-00": 100}  # 99 kept and the overflow


def test_only_used_buckets_are_emitted_and_stay_a_valid_histogram() -> None:
    hists = [
        HistogramSample(SampleKey(pid=1), {3: 2, 10: 1}),
        HistogramSample(SampleKey(pid=2), {0: 5}),
    ]
    probe = make_probe("team-a/lat", FakeProgram(histograms=hists), kind="histogram", by=("pid",))
    samples = parse(
        generate_latest(
            AgentMetrics(ListBoard(lambda: [probe]), FakeAttributor()).registry
        ).decode()
    )["tracekeeper_probe_value"]
    les: dict[str, list[str]] = defaultdict(list)
    for labels, name, _ in samples:
        if name.endswith("_bucket"):
            les[labels["pid"]].append(labels["le"])
    assert les == {"1": ["16.0", "2048.0", "+Inf"], "2": ["2.0", "+Inf"]}
    assert_valid_histograms(samples)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
def test_promtool_accepts_the_capped_sparse_exposition() -> None:
    probes = histogram_probes(["team-a", "team-b"], 12)
    text = generate_latest(AgentMetrics(ListBoard(lambda: probes), FakeAttributor()).registry)
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    # promtool lints names and help; "no issues" is an empty output (exit 0).
    assert res.returncode == 0, res.stdout + res.stderr


class _Spy(FakeProgram):
    """Records, at each read, whether another thread could take the programs lock."""

    def __init__(self, lock: threading.Lock, log: list[str], name: str) -> None:
        super().__init__(counters=KernelCounters(matched=1))
        self._lock, self._log, self._name = lock, log, name

    def read_counters(self, bit: int) -> KernelCounters:
        self._log.append(f"read {self._name}: lock {'free' if _free(self._lock) else 'held'}")
        return super().read_counters(bit)


def _free(lock: threading.Lock) -> bool:
    """Whether another thread can take the lock now (a non-blocking try: no timing)."""
    result: list[bool] = []

    def attempt() -> None:
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        result.append(got)

    t = threading.Thread(target=attempt)
    t.start()
    t.join()
    return result[0]


def test_the_programs_lock_is_taken_per_probe_not_for_the_whole_scrape() -> None:
    lock = threading.Lock()
    log: list[str] = []

    class Between:
        """The programs lock as the collector takes it, noting whether it was free
        (for another thread) just before each take."""

        def __enter__(self) -> None:
            log.append(f"take: lock {'free' if _free(lock) else 'held'}")
            lock.acquire()

        def __exit__(self, *_: object) -> None:
            lock.release()

    probes = [make_probe(f"team-a/p{i}", _Spy(lock, log, f"p{i}")) for i in range(3)]
    board = ListBoard(lambda: probes)
    board.lock = Between()  # type: ignore[assignment]
    metrics = AgentMetrics(board, FakeAttributor())
    generate_latest(metrics.registry)
    # The maps, probe by probe; then their costs (each its own program here), likewise.
    per_probe = [f"{what}: lock {how}" for i in range(3) for what, how in (
        ("take", "free"), (f"read p{i}", "held"))]  # fmt: skip
    assert log == per_probe + per_probe
    assert _free(lock)  # and formatting ran after the last release
