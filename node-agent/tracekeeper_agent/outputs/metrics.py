"""Prometheus metrics: what loaded probes produce, read from their maps at scrape time.

The collector keeps no copy of any count: every scrape reads the kernel maps of the probes
the reconciler has loaded, attributes cgroup ids to pods, and sums what ends up with the
same labels. Each probe contributes at most `series_cap` series per family; the rest is
summed into one overflow series, so a probe keyed by pid cannot flood Prometheus.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.outputs.events import EventHub
from tracekeeper_agent.ports import Attributor, HistogramSample, KernelCounters, SampleKey

log = logging.getLogger(__name__)

DEFAULT_SERIES_CAP = 500
OVERFLOW = "__overflow__"
"""The pod label of the series that sums a probe's series beyond the cap (pod names are
DNS labels: no real pod can be called this)."""

# Every family keyed by sample has all of these labels; those not in a probe's `by` are ""
# so that the label set of a family never changes (Prometheus requires it).
SAMPLE_LABELS = ("namespace", "probe", "pod", "container", "comm", "pid")
PROBE_LABELS = ("namespace", "probe")

ProbeSource = Callable[[], Sequence[ActiveProbe]]
FilterEntryCount = Callable[[ActiveProbe], int]

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
) -> tuple[list[tuple[KeyLabels, _T]], _T | None]:
    """Keep the `cap - 1` heaviest series (ties by labels, so the choice is stable) and merge
    the rest into one overflow value; under the cap everything is kept as it is."""
    ranked = sorted(series.items(), key=lambda kv: (-weight(kv[1]), kv[0]))
    if len(ranked) <= cap:
        return ranked, None
    keep = max(cap - 1, 0)
    return ranked[:keep], merge([v for _, v in ranked[keep:]])


def cumulative_buckets(buckets: Mapping[int, int], top_slot: int) -> list[tuple[str, float]]:
    """log2 slots -> Prometheus `le` buckets: slot s holds [2**s, 2**(s+1)), so its upper
    bound is le=2**(s+1); every bucket counts all smaller values too, then +Inf."""
    out: list[tuple[str, float]] = []
    running = 0
    for slot in range(top_slot + 1):
        running += buckets.get(slot, 0)
        out.append((_go_float(float(2 ** (slot + 1))), float(running)))
    out.append(("+Inf", float(sum(buckets.values()))))
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
        )


class ProbeCollector(Collector):
    """Reads the probes' maps at every scrape; holds no counts of its own.

    Scrapes may run on any thread (prometheus_client's server, or a to_thread from aiohttp);
    a probe that fails to read (closed under our feet) is skipped and logged."""

    def __init__(
        self,
        probes: ProbeSource,
        attributor: Attributor,
        *,
        series_cap: int = DEFAULT_SERIES_CAP,
        events: EventHub | None = None,
        filter_entries: FilterEntryCount | None = None,
    ) -> None:
        if series_cap < 1:
            raise ValueError("series_cap must be at least 1")
        self._probes = probes
        self._attributor = attributor
        self._cap = series_cap
        self._events = events
        self._filter_entries = filter_entries
        # The highest histogram slot each probe has shown: its bucket layout only grows, so a
        # bucket never vanishes between scrapes (which would break rate() over `le`).
        self._top_slot: dict[str, int] = {}
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        # Sample-less families: lets the registry refuse a second collector with our names.
        yield from _Families.empty()

    def collect(self) -> Iterator[Metric]:
        fam = _Families.empty()
        probes = list(self._probes())
        fam.loaded.add_metric([], float(len(probes)))
        for probe in probes:
            try:
                self._collect_probe(probe, fam)
            except Exception:
                log.warning("metrics: reading probe %s failed; skipped", probe.id, exc_info=True)
        with self._lock:
            live = {p.id for p in probes}
            for gone in set(self._top_slot) - live:
                del self._top_slot[gone]
        yield from fam

    def _collect_probe(self, probe: ActiveProbe, fam: _Families) -> None:
        ids = [probe.namespace, probe.name]
        counters = probe.program.read_counters()
        kind = probe.plan.output_kind
        if kind == "count":
            self._add_counts(probe, fam)
        elif kind == "histogram":
            self._add_histograms(probe, fam)
        else:
            self._add_events(probe, counters, fam)
        fam.matched.add_metric(ids, float(counters.matched))
        fam.sampled_out.add_metric(ids, float(counters.sampled_out))
        evicted = 0
        if kind != "events":
            evicted = max(counters.lru_new_keys - probe.program.live_keys(), 0)
        fam.evictions.add_metric(ids, float(evicted))
        if self._filter_entries is not None:
            fam.filter_entries.add_metric(ids, float(self._filter_entries(probe)))

    def _labels(self, probe: ActiveProbe, key: SampleKey) -> KeyLabels:
        return key_labels(key, probe.plan.by, probe.namespace, self._attributor)

    def _add_counts(self, probe: ActiveProbe, fam: _Families) -> None:
        series: dict[KeyLabels, int] = {}
        for sample in probe.program.read_counts():
            labels = self._labels(probe, sample.key)
            series[labels] = series.get(labels, 0) + sample.value
        kept, overflow = cap_series(series, lambda v: v, self._cap, _merge_counts)
        ids = [probe.namespace, probe.name]
        for labels, value in kept:
            fam.hits.add_metric([*ids, *labels], float(value))
        if overflow is not None:
            fam.hits.add_metric([*ids, OVERFLOW, "", "", ""], float(overflow))

    def _add_histograms(self, probe: ActiveProbe, fam: _Families) -> None:
        series: dict[KeyLabels, dict[int, int]] = {}
        for sample in probe.program.read_histograms():
            labels = self._labels(probe, sample.key)
            series[labels] = _merge_buckets([series.get(labels, {}), _slots(sample)])
        top = max((slot for b in series.values() for slot in b), default=0)
        with self._lock:
            top = max(top, self._top_slot.get(probe.id, 0))
            self._top_slot[probe.id] = top
        kept, overflow = cap_series(series, lambda b: sum(b.values()), self._cap, _merge_buckets)
        ids = [probe.namespace, probe.name]
        rows = [([*ids, *labels], b) for labels, b in kept]
        if overflow is not None:
            rows.append(([*ids, OVERFLOW, "", "", ""], overflow))
        for labels_list, buckets in rows:
            fam.value.add_metric(
                labels_list, cumulative_buckets(buckets, top), estimated_sum(buckets)
            )

    def _add_events(self, probe: ActiveProbe, counters: KernelCounters, fam: _Families) -> None:
        ids = [probe.namespace, probe.name]
        fam.dropped.add_metric([*ids, "rate_limit"], float(counters.rate_limited))
        fam.dropped.add_metric([*ids, "ring_full"], float(counters.ring_full))
        if self._events is not None:
            counts = self._events.counts(probe.id)
            fam.events.add_metric(ids, float(counts.received))
            fam.dropped.add_metric([*ids, "backlog"], float(counts.backlog))


# Compiles take about 0.3 s here; large programs and a cold cache several seconds.
COMPILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics:
    """The agent's metrics in one registry: the probe collector, plus the compile-time
    histogram the reconciler observes (a compile is an event, not state to read back)."""

    def __init__(
        self,
        probes: ProbeSource,
        attributor: Attributor,
        *,
        registry: CollectorRegistry | None = None,
        series_cap: int = DEFAULT_SERIES_CAP,
        events: EventHub | None = None,
        filter_entries: FilterEntryCount | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.collector = ProbeCollector(
            probes,
            attributor,
            series_cap=series_cap,
            events=events,
            filter_entries=filter_entries,
        )
        self.registry.register(self.collector)
        self._compile = Histogram(
            "tracekeeper_agent_compile_seconds",
            "Time to compile and load one probe's BPF program.",
            buckets=COMPILE_BUCKETS,
            registry=self.registry,
        )

    def observe_compile(self, seconds: float) -> None:
        self._compile.observe(seconds)

    @contextmanager
    def time_compile(self) -> Iterator[None]:
        """`with metrics.time_compile(): loader.load(plan)` (also observed when it fails)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_compile(time.perf_counter() - start)
