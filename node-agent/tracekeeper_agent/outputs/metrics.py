"""Prometheus metrics: what loaded probes produce, read from their maps at scrape time.

The collector keeps no copy of any count: every scrape reads the kernel maps of the probes
the ProgramBoard holds (each its binding's share of a shared program), attributes cgroup
ids to pods, and sums what ends up with the same labels. Each probe contributes at most
`series_cap` series per family, each namespace at most `namespace_series_cap` on this node
and the node at most `node_series_cap`; the rest is summed into one overflow series per
probe (its label sets counted in tracekeeper_probe_series_overflowed), so a probe keyed by
pid, or a tenant with many probes, cannot flood Prometheus. Histograms show only the
buckets that hold values.

A scrape holds the board's lock only while it copies one probe's maps (a program being
closed waits for at most that), and formats everything after.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tracekeeper_agent.active import ActiveProbe, ProgramBoard
from tracekeeper_agent.outputs.cost import CostLedger
from tracekeeper_agent.ports import (
    Attributor,
    CountSample,
    HistogramSample,
    KernelCounters,
    SampleKey,
)
from tracekeeper_api.protocol import CgroupClaims, Persistence

log = logging.getLogger(__name__)

DEFAULT_SERIES_CAP = 500
DEFAULT_NAMESPACE_SERIES_CAP = 10_000
"""Prometheus series of one namespace's probes on one node: a count label set is one, a
histogram's is one per used bucket plus +Inf, _sum and _count."""
DEFAULT_NODE_SERIES_CAP = 40_000
OVERFLOW = "__overflow__"
"""The pod label of the series that sums a probe's series beyond the cap (pod names are
DNS labels: no real pod can be called this)."""

# Every family keyed by sample has all of these labels; those not in a probe's `by` are ""
# so that the label set of a family never changes (Prometheus requires it).
SAMPLE_LABELS = ("namespace", "probe", "pod", "container", "comm", "pid")
PROBE_LABELS = ("namespace", "probe")

KeyLabels = tuple[str, str, str, str]
"""pod, container, comm, pid."""

_T = TypeVar("_T")

# client_python's own `le` spelling (Go's float format), so our buckets read like theirs.
_go_float: Callable[[float], str] = floatToGoString


def key_labels(
    key: SampleKey, by: Sequence[str], namespace: str, attributor: Attributor
) -> KeyLabels:
    """The pod/container/comm/pid labels of a kernel key; "" for keys not in `by`.

    A cgroup no target owns (a host process of a host-wide probe, a pod already deleted)
    has no pod: "". A pod outside the probe's namespace (privileged probes) is written
    namespace/pod, since the namespace label is the probe's."""
    pod = container = ""
    if key.cgroup_id is not None and ("pod" in by or "container" in by):
        ident = attributor.identify(key.cgroup_id)
        if ident is not None:
            if "pod" in by:
                pod = (
                    ident.pod if ident.namespace == namespace else f"{ident.namespace}/{ident.pod}"
                )
            if "container" in by:
                container = ident.container
    comm = (key.comm or "") if "comm" in by else ""
    pid = str(key.pid) if "pid" in by and key.pid is not None else ""
    return pod, container, comm, pid


def cap_series(
    series: Mapping[KeyLabels, _T],
    weight: Callable[[_T], int],
    cap: int,
    merge: Callable[[list[_T]], _T],
    *,
    cost: Callable[[_T], int] = lambda _: 1,
    budget: int = sys.maxsize,
    overflow_cost: int = 1,
) -> tuple[list[tuple[KeyLabels, _T]], _T | None]:
    """Keep the heaviest label sets (ties by labels, so the choice is stable) and merge the
    rest into one overflow value: at most `cap` label sets, and at most `budget` Prometheus
    series (`cost` each; the overflow's room is reserved). Within both, everything is kept
    as it is."""
    ranked = sorted(series.items(), key=lambda kv: (-weight(kv[1]), kv[0]))
    if len(ranked) <= cap and sum(cost(v) for _, v in ranked) <= budget:
        return ranked, None
    room, keep = budget - overflow_cost, 0
    while keep < min(cap - 1, len(ranked)) and cost(ranked[keep][1]) <= room:
        room -= cost(ranked[keep][1])
        keep += 1
    return ranked[:keep], merge([v for _, v in ranked[keep:]])


def histogram_series(buckets: Mapping[int, int]) -> int:
    """Prometheus series of one histogram label set: its used buckets, +Inf, _sum, _count."""
    return sum(1 for count in buckets.values() if count) + 3


MAX_HISTOGRAM_SERIES = 64 + 3
"""The most series one histogram label set can cost (every log2 slot used)."""


def cumulative_buckets(buckets: Mapping[int, int]) -> list[tuple[str, float]]:
    """log2 slots -> Prometheus `le` buckets: slot s holds [2**s, 2**(s+1)), so its upper
    bound is le=2**(s+1); every bucket counts all smaller values too, then +Inf.

    Only slots holding values get a bucket: a bucket whose count equals the one below says
    nothing (histogram_quantile interpolates the same without it). Kernel slot counts only
    grow, so a bucket once shown stays (rate() over `le` keeps its series)."""
    out: list[tuple[str, float]] = []
    running = 0
    for slot in sorted(s for s, count in buckets.items() if count):
        running += buckets[slot]
        out.append((_go_float(float(2 ** (slot + 1))), float(running)))
    out.append(("+Inf", float(running)))
    return out


def estimated_sum(buckets: Mapping[int, int]) -> float:
    """The kernel keeps no sum: estimate it from each slot's midpoint (slot 0 is [0, 2))."""
    return float(
        sum(count * (1.0 if slot == 0 else 1.5 * 2**slot) for slot, count in buckets.items())
    )


def _merge_counts(values: list[int]) -> int:
    return sum(values)


def _merge_buckets(values: list[dict[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for buckets in values:
        for slot, count in buckets.items():
            out[slot] = out.get(slot, 0) + count
    return out


def _slots(sample: HistogramSample) -> dict[int, int]:
    # Slots come from bpf_log2l (0..64); clamp anything odd rather than emit a bogus `le`.
    return {min(max(slot, 0), 63): count for slot, count in sample.buckets.items() if count}


@dataclass(frozen=True)
class _Families:
    hits: CounterMetricFamily
    value: HistogramMetricFamily
    events: CounterMetricFamily
    dropped: CounterMetricFamily
    matched: CounterMetricFamily
    sampled_out: CounterMetricFamily
    evictions: CounterMetricFamily
    loaded: GaugeMetricFamily
    filter_entries: GaugeMetricFamily
    overflowed: GaugeMetricFamily
    run_seconds: CounterMetricFamily
    runs: CounterMetricFamily
    kernel_memory: GaugeMetricFamily

    @classmethod
    def empty(cls) -> _Families:
        probe = list(PROBE_LABELS)
        return cls(
            hits=CounterMetricFamily(
                "tracekeeper_probe_hits",
                "Hits of count probes, by the probe's aggregation keys (read from kernel maps).",
                labels=SAMPLE_LABELS,
            ),
            value=HistogramMetricFamily(
                "tracekeeper_probe_value",
                "Values observed by histogram probes in the probe's unit (nanoseconds for "
                "latency), in log2 buckets; _sum is estimated from bucket midpoints.",
                labels=SAMPLE_LABELS,
            ),
            events=CounterMetricFamily(
                "tracekeeper_probe_events",
                "Events read from the probe's ring buffer by the agent.",
                labels=probe,
            ),
            dropped=CounterMetricFamily(
                "tracekeeper_probe_events_dropped",
                "Events lost: rate_limit and ring_full in kernel, backlog when a consumer of "
                "the stream was too slow.",
                labels=[*probe, "reason"],
            ),
            matched=CounterMetricFamily(
                "tracekeeper_probe_matched",
                "Hits that passed the probe's filter, before sampling and rate limit.",
                labels=probe,
            ),
            sampled_out=CounterMetricFamily(
                "tracekeeper_probe_sampled_out",
                "Matched hits that sampling discarded in kernel.",
                labels=probe,
            ),
            evictions=CounterMetricFamily(
                "tracekeeper_probe_map_evictions",
                "Keys evicted from the probe's LRU output map; their counts are lost.",
                labels=probe,
            ),
            loaded=GaugeMetricFamily(
                "tracekeeper_agent_programs_loaded",
                "Probes whose BPF program is loaded and attached on this node.",
            ),
            filter_entries=GaugeMetricFamily(
                "tracekeeper_agent_filter_entries",
                "Entries in the probe's in-kernel filter maps (cgroups, pids, comms).",
                labels=probe,
            ),
            overflowed=GaugeMetricFamily(
                "tracekeeper_probe_series_overflowed",
                "Label sets beyond the series caps (per probe, namespace and node), summed "
                f'into the probe\'s overflow series (pod="{OVERFLOW}").',
                labels=probe,
            ),
            run_seconds=CounterMetricFamily(
                "tracekeeper_probe_run_seconds",
                "Kernel run time of the probe's BPF program (BPF run-time statistics); a "
                "shared program's is split equally among its probes.",
                labels=probe,
            ),
            runs=CounterMetricFamily(
                "tracekeeper_probe_runs",
                "Runs of the probe's BPF program, split like its run time: rate(run_seconds) "
                "/ rate(runs) is what the program costs per traced call.",
                labels=probe,
            ),
            kernel_memory=GaugeMetricFamily(
                "tracekeeper_probe_kernel_memory_bytes",
                "The probe's share of the kernel memory its BPF programs and maps hold.",
                labels=probe,
            ),
        )

    def __iter__(self) -> Iterator[Metric]:
        yield from (
            self.hits,
            self.value,
            self.events,
            self.dropped,
            self.matched,
            self.sampled_out,
            self.evictions,
            self.loaded,
            self.filter_entries,
            self.overflowed,
            self.run_seconds,
            self.runs,
            self.kernel_memory,
        )


@dataclass(frozen=True)
class _Snapshot:
    """One probe's maps, copied under the programs lock; formatted after it is released."""

    probe: ActiveProbe
    counters: KernelCounters
    counts: list[CountSample]
    histograms: list[HistogramSample]
    live_keys: int


class _SeriesBudget:
    """What is left of the namespace and node series caps during one scrape."""

    def __init__(self, namespace_cap: int, node_cap: int) -> None:
        self._namespace_cap = namespace_cap
        self._node_left = node_cap
        self._namespace_left: dict[str, int] = {}

    def left(self, namespace: str) -> int:
        """Prometheus series this probe may still emit (its overflow series is emitted even
        at 0: it carries the sum)."""
        left = self._namespace_left.get(namespace, self._namespace_cap)
        return max(0, min(left, self._node_left))

    def spend(self, namespace: str, series: int) -> None:
        left = self._namespace_left.get(namespace, self._namespace_cap)
        self._namespace_left[namespace] = max(left - series, 0)
        self._node_left = max(self._node_left - series, 0)


class ProbeCollector(Collector):
    """Reads the probes' maps at every scrape; holds no counts of its own.

    Scrapes may run on any thread (prometheus_client's server, or a to_thread from aiohttp);
    a probe that fails to read (closed under our feet) is skipped and logged."""

    def __init__(
        self,
        board: ProgramBoard,
        attributor: Attributor,
        *,
        series_cap: int = DEFAULT_SERIES_CAP,
        namespace_series_cap: int = DEFAULT_NAMESPACE_SERIES_CAP,
        node_series_cap: int = DEFAULT_NODE_SERIES_CAP,
        costs: CostLedger | None = None,
    ) -> None:
        if min(series_cap, namespace_series_cap, node_series_cap) < 1:
            raise ValueError("series caps must be at least 1")
        self._board = board
        self._attributor = attributor
        self._cap = series_cap
        self._namespace_cap = namespace_series_cap
        self._node_cap = node_series_cap
        self._costs = costs

    def describe(self) -> Iterator[Metric]:
        # Sample-less families: lets the registry refuse a second collector with our names.
        yield from _Families.empty()

    def collect(self) -> Iterator[Metric]:
        fam = _Families.empty()
        probes = self._board.probes()
        fam.loaded.add_metric([], float(len(probes)))
        snapshots = []
        for probe in probes:
            try:
                # One probe at a time: a program closing waits for one map copy, not a scrape.
                with self._board.lock:
                    snapshots.append(self._snapshot(probe))
            except Exception:
                log.warning("metrics: reading probe %s failed; skipped", probe.id, exc_info=True)
        # In id order, so that which probes the namespace and node caps cut is stable.
        budget = _SeriesBudget(self._namespace_cap, self._node_cap)
        for snap in sorted(snapshots, key=lambda s: s.probe.id):
            self._add_probe(snap, fam, budget)
        if self._costs is not None:
            by_id = {p.id: p for p in probes}
            for probe_id, cost in sorted(self._costs.read().items()):
                found = by_id.get(probe_id)
                if found is None:
                    continue
                ids = [found.namespace, found.name]
                fam.run_seconds.add_metric(ids, cost.run_time_ns / 1e9)
                fam.runs.add_metric(ids, float(cost.runs))
                fam.kernel_memory.add_metric(ids, float(cost.kernel_memory_bytes))
        yield from fam

    def _snapshot(self, probe: ActiveProbe) -> _Snapshot:
        kind = probe.plan.output_kind
        return _Snapshot(
            probe=probe,
            counters=probe.read_counters(),
            counts=probe.read_counts() if kind == "count" else [],
            histograms=probe.read_histograms() if kind == "histogram" else [],
            live_keys=probe.live_keys() if kind != "events" else 0,
        )

    def _add_probe(self, snap: _Snapshot, fam: _Families, budget: _SeriesBudget) -> None:
        probe, counters = snap.probe, snap.counters
        ids = [probe.namespace, probe.name]
        kind = probe.plan.output_kind
        left = budget.left(probe.namespace)
        if kind == "count":
            emitted, overflowed = self._add_counts(snap, fam, left)
        elif kind == "histogram":
            emitted, overflowed = self._add_histograms(snap, fam, left)
        else:
            emitted, overflowed = 0, 0
            self._add_events(probe, counters, fam)
        budget.spend(probe.namespace, emitted)
        fam.matched.add_metric(ids, float(counters.matched))
        fam.sampled_out.add_metric(ids, float(counters.sampled_out))
        evicted = 0
        if kind != "events":
            evicted = max(counters.lru_new_keys - snap.live_keys, 0)
            fam.overflowed.add_metric(ids, float(overflowed))
        fam.evictions.add_metric(ids, float(evicted))
        fam.filter_entries.add_metric(ids, float(probe.filter_entries))

    def _labels(self, probe: ActiveProbe, key: SampleKey) -> KeyLabels:
        return key_labels(key, probe.plan.by, probe.namespace, self._attributor)

    def _add_counts(self, snap: _Snapshot, fam: _Families, budget: int) -> tuple[int, int]:
        """Adds the probe's hit series; returns (series emitted, label sets overflowed)."""
        probe = snap.probe
        series: dict[KeyLabels, int] = {}
        for sample in snap.counts:
            labels = self._labels(probe, sample.key)
            series[labels] = series.get(labels, 0) + sample.value
        kept, overflow = cap_series(series, lambda v: v, self._cap, _merge_counts, budget=budget)
        ids = [probe.namespace, probe.name]
        for labels, value in kept:
            fam.hits.add_metric([*ids, *labels], float(value))
        if overflow is None:
            return len(kept), 0
        fam.hits.add_metric([*ids, OVERFLOW, "", "", ""], float(overflow))
        return len(kept) + 1, len(series) - len(kept)

    def _add_histograms(self, snap: _Snapshot, fam: _Families, budget: int) -> tuple[int, int]:
        probe = snap.probe
        series: dict[KeyLabels, dict[int, int]] = {}
        for sample in snap.histograms:
            labels = self._labels(probe, sample.key)
            series[labels] = _merge_buckets([series.get(labels, {}), _slots(sample)])
        kept, overflow = cap_series(
            series,
            lambda b: sum(b.values()),
            self._cap,
            _merge_buckets,
            cost=histogram_series,
            budget=budget,
            overflow_cost=MAX_HISTOGRAM_SERIES,
        )
        ids = [probe.namespace, probe.name]
        rows = [([*ids, *labels], b) for labels, b in kept]
        if overflow is not None:
            rows.append(([*ids, OVERFLOW, "", "", ""], overflow))
        for labels_list, buckets in rows:
            fam.value.add_metric(labels_list, cumulative_buckets(buckets), estimated_sum(buckets))
        return sum(histogram_series(b) for _, b in rows), len(series) - len(kept)

    def _add_events(self, probe: ActiveProbe, counters: KernelCounters, fam: _Families) -> None:
        ids = [probe.namespace, probe.name]
        fam.dropped.add_metric([*ids, "rate_limit"], float(counters.rate_limited))
        fam.dropped.add_metric([*ids, "ring_full"], float(counters.ring_full))
        fam.events.add_metric(ids, float(probe.counts.received))
        fam.dropped.add_metric([*ids, "backlog"], float(probe.counts.backlog))


class PersistenceCollector(Collector):
    """Whether the state directory holds the accepted state (what a restart resumes): a
    full or read-only directory is an alert, not only a log line."""

    def __init__(self, source: Callable[[], Persistence]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        p = self._source()
        yield GaugeMetricFamily(
            "tracekeeper_agent_state_saved",
            "1 while the state directory holds the accepted state, 0 while saving it fails.",
            value=0.0 if p.error else 1.0,
        )
        yield GaugeMetricFamily(
            "tracekeeper_agent_state_saved_revision",
            "The revision the state directory holds (0: none); a restart resumes it.",
            value=float(p.revision),
        )


class ClaimsCollector(Collector):
    """The kernel's claims of pod cgroups at mkdir (the pending table, read at scrape time):
    a pending pod left out of the table is caught by the inotify fallback only, so that
    number is exported, never silent."""

    def __init__(self, source: Callable[[], CgroupClaims]) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no read of the kernel at registration (collect reads it)

    def collect(self) -> Iterator[Metric]:
        c = self._source()
        gauges = (
            (
                "pending_cgroup_pods",
                "Targeted pods without a cgroup yet, their paths in the pending table.",
                c.pending_pods,
            ),
            ("pending_cgroup_paths", "Cgroup paths in the pending table.", c.pending_paths),
            (
                "pending_cgroup_paths_capacity",
                "Cgroup paths the pending table holds at most.",
                c.capacity,
            ),
            (
                "pending_cgroup_pods_left_out",
                "Pending pods left out of the pending table (full, path too long): inotify only.",
                c.left_out_pods,
            ),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(f"tracekeeper_agent_{name}", text, value=float(value))
        yield CounterMetricFamily(
            "tracekeeper_agent_cgroups_claimed",
            "Cgroups given their pod's identity by the kernel in their mkdir call.",
            value=float(c.claimed),
        )
        yield CounterMetricFamily(
            "tracekeeper_agent_cgroup_claims_identity_full",
            "Cgroup claims the identity table had no room for.",
            value=float(c.identity_full),
        )
        covered = CounterMetricFamily(
            "tracekeeper_agent_pods_covered",
            "New pods covered by the agent after their mkdir, before or after their first "
            "process (after: its first calls were missed); the kernel's claims not included.",
            labels=["when"],
        )
        covered.add_metric(["before_first_process"], float(c.covered_before_processes))
        covered.add_metric(["after_first_process"], float(c.covered_after_processes))
        yield covered


# Compiles take about 0.3 s here; large programs and a cold cache several seconds.
COMPILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics:
    """The agent's metrics in one registry: the probe collector, plus the compile-time
    histogram the reconciler observes (a compile is an event, not state to read back)."""

    def __init__(
        self,
        board: ProgramBoard,
        attributor: Attributor,
        *,
        registry: CollectorRegistry | None = None,
        series_cap: int = DEFAULT_SERIES_CAP,
        namespace_series_cap: int = DEFAULT_NAMESPACE_SERIES_CAP,
        node_series_cap: int = DEFAULT_NODE_SERIES_CAP,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.costs = CostLedger(board)
        """Read by the scrape and by the state report (each probe's ProbeCost)."""
        self.collector = ProbeCollector(
            board,
            attributor,
            series_cap=series_cap,
            namespace_series_cap=namespace_series_cap,
            node_series_cap=node_series_cap,
            costs=self.costs,
        )
        self.registry.register(self.collector)
        self._compile = Histogram(
            "tracekeeper_agent_compile_seconds",
            "Time to compile and load one probe's BPF program.",
            buckets=COMPILE_BUCKETS,
            registry=self.registry,
        )
        self._adopted = Counter(
            "tracekeeper_agent_programs_adopted",
            "Programs taken over from the pins of the node's previous agent (not compiled).",
            registry=self.registry,
        )

    def observe_compile(self, seconds: float) -> None:
        self._compile.observe(seconds)

    def observe_adopted(self) -> None:
        self._adopted.inc()

    def add_claims(self, source: Callable[[], CgroupClaims]) -> None:
        """Export the cgroup claims (`Reconciler.claims`) from this registry."""
        self.registry.register(ClaimsCollector(source))

    def add_persistence(self, source: Callable[[], Persistence]) -> None:
        """Export what the state directory holds (`Reconciler.persisted`)."""
        self.registry.register(PersistenceCollector(source))

    @contextmanager
    def time_compile(self) -> Iterator[None]:
        """`with metrics.time_compile(): loader.load(plan)` (also observed when it fails)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_compile(time.perf_counter() - start)
