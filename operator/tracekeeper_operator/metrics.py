"""The operator's own metrics (its control plane, not the traces: those are the agents')."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from tracekeeper_api.protocol import KernelInfo

PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ProbeReadiness:
    """One TraceProbe's Ready condition, as the operator last folded it."""

    namespace: str
    probe: str
    ready: bool
    reason: str


ReadinessSource = Callable[[], Iterable[ProbeReadiness]]


class _ProbeReadyCollector:
    """tracekeeper_operator_probe_ready, read at scrape time: one series per TraceProbe (its
    current reason only, so a reason change leaves no stale series behind)."""

    NAME = "tracekeeper_operator_probe_ready"

    def __init__(self) -> None:
        self.source: ReadinessSource = lambda: ()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            self.NAME,
            "1 when the TraceProbe's Ready condition is True, else 0; reason: the "
            "condition's reason (Loaded, NodesPending, CompileFailed, Suspended...).",
            labels=["namespace", "probe", "reason"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for r in self.source():
            family.add_metric([r.namespace, r.probe, r.reason], 1.0 if r.ready else 0.0)
        yield family


KernelSource = Callable[[], Mapping[str, KernelInfo]]

KERNEL_FEATURES = ("kprobes", "uprobes", "btf", "headers", "tracepoints", "ring_buffer",
                   "batch_map_ops", "cgroup_v2", "run_time_stats")  # fmt: skip


class _NodeKernelCollector:
    """tracekeeper_operator_node_kernel_info: the node inventory, one series per node with
    its kernel's facts as labels (like kube_node_info), read at scrape time."""

    NAME = "tracekeeper_operator_node_kernel_info"

    def __init__(self) -> None:
        self.source: KernelSource = dict

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            self.NAME,
            "What each node's kernel can do, as its agent reported it (1 per node); a "
            "feature's label is true, false or unknown (an agent that predates it).",
            labels=["node", "release", *KERNEL_FEATURES],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for node, kernel in sorted(self.source().items()):
            facts = [getattr(kernel, f) for f in KERNEL_FEATURES]
            family.add_metric(
                [
                    node,
                    kernel.release,
                    *("unknown" if v is None else str(v).lower() for v in facts),
                ],
                1.0,
            )
        yield family


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.renders = Counter(
            "tracekeeper_operator_renders",
            "Render passes: every probe's targets and every node's desired state computed.",
            registry=r,
        )
        self.reconciles = Counter(
            "tracekeeper_operator_reconciles",
            "Cluster changes (watch events) that asked for a render.",
            registry=r,
        )
        self.pushes = Counter(
            "tracekeeper_operator_pushes",
            "PUT /v1/state requests to agents, by outcome (ok, error, stale).",
            ["outcome"],
            registry=r,
        )
        self.push_seconds = Histogram(
            "tracekeeper_operator_push_duration_seconds",
            "Time of a PUT /v1/state to an agent, including its compiles.",
            buckets=PUSH_BUCKETS,
            registry=r,
        )
        self.push_bytes = Histogram(
            "tracekeeper_operator_push_bytes",
            "Size of the NodeState documents pushed.",
            buckets=(1e3, 1e4, 1e5, 1e6, 4e6),
            registry=r,
        )
        self.resyncs = Counter(
            "tracekeeper_operator_resyncs",
            "GET /v1/state reads of agent reports, by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.desired_assignments = Gauge(
            "tracekeeper_operator_desired_assignments",
            "Probe assignments in all nodes' desired states (probes x nodes).",
            registry=r,
        )
        self.desired_nodes = Gauge(
            "tracekeeper_operator_desired_nodes",
            "Nodes with an agent or with targets in the desired state.",
            registry=r,
        )
        self.status_patches = Counter(
            "tracekeeper_operator_status_patches",
            "Status writes, by kind (TraceProbe, TraceFilter) and outcome (ok, error).",
            ["kind", "outcome"],
            registry=r,
        )
        self.events = Counter(
            "tracekeeper_operator_events",
            "Kubernetes Events posted, by reason.",
            ["reason"],
            registry=r,
        )
        self._probe_ready = _ProbeReadyCollector()
        r.register(self._probe_ready)
        self._node_kernels = _NodeKernelCollector()
        r.register(self._node_kernels)

    def watch_probes(self, source: ReadinessSource) -> None:
        """Where tracekeeper_operator_probe_ready reads the TraceProbes' readiness at scrape
        time (the control loop). The scrape runs on the metrics server's thread: `source`
        must return a snapshot that the loop replaces, never mutates."""
        self._probe_ready.source = source

    def watch_kernels(self, source: KernelSource) -> None:
        """Where tracekeeper_operator_node_kernel_info reads the agents' kernel facts (a
        snapshot the loop replaces, as for watch_probes)."""
        self._node_kernels.source = source

    def observe_push(self, outcome: str, seconds: float, size: int) -> None:
        self.pushes.labels(outcome).inc()
        self.push_seconds.observe(seconds)
        self.push_bytes.observe(size)
