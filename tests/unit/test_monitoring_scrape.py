"""The monitoring overlay against a real Prometheus (Debian's), on loopback.

Two loopback exporters serve the agent's and the operator's real collectors (over the unit
fakes of the kernel seam). Prometheus scrapes them with the scrape configs the Prometheus
Operator makes of the overlay's PodMonitor and ServiceMonitor: its target labels
(namespace, pod, container of the scraped pod), then the monitor's relabelings, and
honor_labels from honorLabels. It loads the overlay's PrometheusRule. A tenant's series
must keep namespace="team-a" (not the agent's tracekeeper-system), and the alerts must
name it. Then `promtool test rules` runs on series with exactly the labels Prometheus
stored.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from tests.unit.output_fakes import FakeAttributor, FakeProgram, ListBoard, make_probe
from tests.unit.test_manifests import MONITORING_DOCS, _one, _rule_group
from tracekeeper_agent.outputs.metrics import AgentMetrics
from tracekeeper_agent.ports import CountSample, PodIdentity, SampleKey
from tracekeeper_operator.metrics import OperatorMetrics, ProbeReadiness
from tracekeeper_sim.local_cluster import find_free_ports

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="prometheus (Debian package; make setup)"
)
DEADLINE = 90.0
Obj = dict[str, Any]


class _Exporter:
    """GET /metrics from a registry on 127.0.0.1; `before_scrape` runs at every scrape."""

    def __init__(self, registry: CollectorRegistry, before_scrape: Callable[[], None]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                before_scrape()
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _relabel(rule: Obj) -> Obj:
    """A monitor's relabeling (camelCase) as Prometheus config (snake_case)."""
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return {names.get(k, k): v for k, v in rule.items()}


def _scrape_config(job: str, kind: str, endpoint: Obj, port: int, meta: dict[str, str]) -> Obj:
    """What the Prometheus Operator generates for one monitor endpoint, with the discovered
    target's meta labels given statically: the target labels it always adds, then the
    monitor's own relabelings."""
    target_labels = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    if kind == "ServiceMonitor":
        target_labels.append(
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"}
        )
    return {
        "job_name": f"{kind}/{job}",
        "honor_labels": endpoint.get("honorLabels", False),
        "scrape_interval": "1s",
        "metrics_path": endpoint["path"],
        "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": meta}],
        "relabel_configs": [
            *target_labels,
            {"target_label": "job", "replacement": job},
            {"target_label": "endpoint", "replacement": endpoint["port"]},
            *(_relabel(r) for r in endpoint.get("relabelings", [])),
        ],
    }


def _query(port: int, promql: str) -> list[Obj]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[Obj] = body["data"]["result"]
    return result


def _wait_for(port: int, promql: str) -> list[Obj]:
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            result = _query(port, promql)
        except OSError:
            result = []
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no result for {promql} within {DEADLINE:.0f}s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    # The agent: a tenant's count probe by pod, and an events probe dropping events.
    pods = FakeAttributor({11: PodIdentity("team-a", "web-0", "app")})
    opens = FakeProgram(counts=[CountSample(SampleKey(cgroup_id=11), 5)])
    execs = FakeProgram()
    probes = [
        make_probe("team-a/opens", opens, by=("pod", "container")),
        make_probe("team-a/execs", execs, kind="events"),
    ]
    agent = AgentMetrics(ListBoard(lambda: probes), pods)

    def kernel_moves() -> None:  # the kernel counting between scrapes
        opens.counts = [CountSample(SampleKey(cgroup_id=11), opens.counts[0].value + 5)]
        c = execs.counters
        execs.counters = replace(c, matched=c.matched + 10, rate_limited=c.rate_limited + 7)

    operator = OperatorMetrics()
    operator.watch_probes(lambda: [ProbeReadiness("team-a", "opens", False, "CompileFailed")])
    exporters = [
        _Exporter(agent.registry, kernel_moves),
        _Exporter(operator.registry, lambda: None),
    ]

    pod_monitor = _one("PodMonitor", docs=MONITORING_DOCS)
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    service_monitor = _one("ServiceMonitor", docs=MONITORING_DOCS)
    (service_endpoint,) = service_monitor["spec"]["endpoints"]
    system = pod_monitor["metadata"].get("namespace", "tracekeeper-system")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            _scrape_config(
                f"{system}/tracekeeper-agent", "PodMonitor", pod_endpoint, exporters[0].port,
                {"__meta_kubernetes_namespace": system,
                 "__meta_kubernetes_pod_name": "tracekeeper-agent-x7k2p",
                 "__meta_kubernetes_pod_container_name": "agent",
                 "__meta_kubernetes_pod_node_name": "node-a"},
            ),
            _scrape_config(
                "tracekeeper-operator-metrics", "ServiceMonitor", service_endpoint,
                exporters[1].port,
                {"__meta_kubernetes_namespace": system,
                 "__meta_kubernetes_pod_name": "tracekeeper-operator-5d9f-abcde",
                 "__meta_kubernetes_pod_container_name": "operator",
                 "__meta_kubernetes_service_name": "tracekeeper-operator-metrics"},
            ),
        ],
    }  # fmt: skip
    workdir = tmp_path_factory.mktemp("prometheus")
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    (workdir / "rules.yaml").write_text(yaml.safe_dump(_rule_group()))
    (port,) = find_free_ports(1)
    assert PROMETHEUS is not None
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        for exporter in exporters:
            exporter.close()


def test_a_tenants_series_keep_the_tenants_namespace(prometheus: int) -> None:
    (hits,) = _wait_for(prometheus, 'tracekeeper_probe_hits_total{probe="opens"}')
    labels = hits["metric"]
    assert labels["namespace"] == "team-a", labels
    assert (labels["pod"], labels["container"]) == ("web-0", "app")
    assert labels["node"] == "node-a" and labels["job"] == "tracekeeper-system/tracekeeper-agent"
    assert "exported_namespace" not in labels
    # Where the agent sets no namespace (its own metrics), the agent pod's fills in.
    (loaded,) = _wait_for(prometheus, "tracekeeper_agent_programs_loaded")
    assert loaded["metric"]["namespace"] == "tracekeeper-system"
    assert loaded["metric"]["pod"] == "tracekeeper-agent-x7k2p"
    # The operator's per-TraceProbe series, through the ServiceMonitor.
    (ready,) = _wait_for(prometheus, "tracekeeper_operator_probe_ready")
    assert ready["metric"]["namespace"] == "team-a" and ready["metric"]["probe"] == "opens"


@pytest.mark.parametrize(
    ("alert", "probe"),
    [("TraceProbeNotReady", "opens"), ("TracekeeperProbeEventsDropped", "execs")],
)
def test_the_shipped_alerts_name_the_tenants_namespace(
    prometheus: int, alert: str, probe: str
) -> None:
    # `for:` keeps them pending for minutes; pending alerts carry the same labels.
    (pending,) = _wait_for(prometheus, f'ALERTS{{alertname="{alert}"}}')
    assert pending["metric"]["namespace"] == "team-a", pending["metric"]
    assert pending["metric"]["probe"] == probe


def test_promtool_tests_the_rules_on_the_series_as_scraped(prometheus: int, tmp_path: Path) -> None:
    def as_series(result: Obj) -> str:
        labels: dict[str, str] = dict(result["metric"])
        name = labels.pop("__name__")
        return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"

    (ready,) = _wait_for(prometheus, "tracekeeper_operator_probe_ready")
    drops = _wait_for(prometheus, 'tracekeeper_probe_events_dropped_total{reason="rate_limit"}')
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": as_series(ready), "values": "0x20"},
                {"series": as_series(drops[0]), "values": "0+60x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "TraceProbeNotReady", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "team-a",
                                   "probe": "opens", "reason": "CompileFailed"},
                    "exp_annotations": {
                        "summary": "TraceProbe team-a/opens is not Ready (CompileFailed)",
                        "description": "TraceProbe team-a/opens has not been Ready for 10 "
                        "minutes, reason CompileFailed. kubectl -n team-a describe traceprobe "
                        "opens shows the condition's message, the failing nodes and the Events.",
                    },
                }]},
                {"eval_time": "15m", "alertname": "TracekeeperProbeEventsDropped",
                 "exp_alerts": [{
                    "exp_labels": {"severity": "info", "namespace": "team-a",
                                   "probe": "execs", "reason": "rate_limit"},
                    "exp_annotations": {
                        "summary": "TraceProbe team-a/execs drops events (rate_limit)",
                        "description": "team-a/execs has dropped 1.00 events per second for "
                        "10 minutes, reason rate_limit. rate_limit: the probe's "
                        "spec.output.rateLimit; ring_full: the agent reads too slowly for the "
                        "event rate; backlog: a consumer of the event stream is too slow.",
                    },
                 }]},
            ],
        }],
    }  # fmt: skip
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rule_group()))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    assert PROMTOOL is not None
    res = subprocess.run(
        [PROMTOOL, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
