"""The node inventory: what a node's agent reported its kernel can do keeps a probe the node
cannot run off that node, with the node's own fact, and shows in the node detail and the
operator's metrics."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from tests.unit.test_operator_budgets import NODE, SETTINGS, pod, probe, view
from tracekeeper_api.output import node_detail
from tracekeeper_api.protocol import KernelInfo, NodeReport
from tracekeeper_operator.agent_views import AgentView
from tracekeeper_operator.cluster_plan import plan_cluster
from tracekeeper_operator.control_loop import probe_status
from tracekeeper_operator.inventory import node_refusal
from tracekeeper_operator.metrics import OperatorMetrics
from tracekeeper_operator.output_api.placement import placements

NS = "team-a"
THIS_VM = KernelInfo(
    release="6.18.44", kprobes=False, uprobes=True, btf=True, headers=True,
    tracepoints=True, ring_buffer=True, batch_map_ops=True, cgroup_v2=True,
    missing={"kprobes": "CONFIG_KPROBES is not set in /proc/config.gz"},
)  # fmt: skip


def test_each_missing_feature_refuses_what_needs_it() -> None:
    kp = probe(NS, "kp", tracepoint=None, kprobe={"function": "do_sys_openat2"})
    assert kp.spec is not None
    reason, msg = node_refusal(kp.spec, "n1", THIS_VM) or ("", "")
    assert reason == "Unsupported"
    assert "node n1's kernel (6.18.44) has no kprobes" in msg
    assert "CONFIG_KPROBES is not set in /proc/config.gz" in msg
    tp = probe(NS, "tp")
    assert tp.spec is not None and node_refusal(tp.spec, "n1", THIS_VM) is None
    events = probe(NS, "ev", output={"kind": "events"})
    assert events.spec is not None
    old = THIS_VM.model_copy(update={"ring_buffer": False, "missing": {}})
    assert (node_refusal(events.spec, "n1", old) or ("",))[0] == "Unsupported"
    bare = THIS_VM.model_copy(update={"headers": False})
    assert (node_refusal(tp.spec, "n1", bare) or ("",))[0] == "KernelHeadersMissing"
    # An agent that predates a fact (None) or reported none at all is not refused.
    older = THIS_VM.model_copy(update={"ring_buffer": None})
    assert node_refusal(events.spec, "n1", older) is None
    assert node_refusal(tp.spec, "n1", KernelInfo()) is None


def test_usdt_probes_need_uprobes() -> None:
    usdt = {"binary": "/usr/bin/python3", "provider": "python", "name": "function__entry"}
    p = probe(NS, "usdt", tracepoint=None, usdt=usdt)
    assert p.spec is not None and node_refusal(p.spec, "n1", THIS_VM) is None
    no_uprobes = THIS_VM.model_copy(
        update={"uprobes": False, "missing": {"uprobes": "CONFIG_UPROBES is not set"}}
    )
    reason, msg = node_refusal(p.spec, "n1", no_uprobes) or ("", "")
    assert reason == "Unsupported"
    assert msg == (
        "node n1's kernel (6.18.44) has no uprobes (its agent found: CONFIG_UPROBES is not "
        "set), which USDT probes are attached with"
    )
    # Not pushed there at all.
    v = view([p], [pod(NS, "web-0")])
    now = datetime(2026, 12, 2, tzinfo=UTC)
    plan = plan_cluster(v, SETTINGS, {p.id: None}, now, {NODE: no_uprobes})
    assert plan.rendered.nodes.get(NODE, ()) == ()
    assert plan.rendered.unsupported[NODE][p.id][0] == "Unsupported"


def test_a_node_that_cannot_run_it_gets_no_push_and_the_status_names_its_fact() -> None:
    # kprobes are for the privileged namespaces (tenant rules): the platform team's probe.
    ns = SETTINGS.namespace
    kp = probe(ns, "kp", tracepoint=None, kprobe={"function": "do_sys_openat2"})
    v = view([kp], [pod(ns, "web-0")])
    now = datetime(2026, 12, 2, tzinfo=UTC)
    plan = plan_cluster(v, SETTINGS, {kp.id: None}, now, {NODE: THIS_VM})
    assert plan.rendered.nodes.get(NODE, ()) == ()
    assert plan.rendered.unsupported[NODE][kp.id][0] == "Unsupported"
    report = NodeReport(node=NODE, revision=1, boot_id="b", kernel=THIS_VM)
    views = {NODE: AgentView(NODE, "http://n1:1", report, None)}
    status = probe_status(
        kp, plan.selections[kp.id], plan, views, previous=None, now=now, max_failures=10
    )
    assert status is not None
    degraded = status.condition("Degraded")
    assert degraded is not None and degraded.reason == "Unsupported"
    assert "CONFIG_KPROBES is not set" in degraded.message
    assert [(f.node, f.reason) for f in status.failures] == [(NODE, "Unsupported")]
    # The node detail says so too, with the node's kernel.
    (place,) = placements(kp.id, views, plan.rendered.unsupported)
    detail = node_detail(place.node, place.outcome, place.error, place.kernel, place.refused)
    assert (detail.state, detail.reason) == ("Failed", "Unsupported")
    assert detail.kernel is not None and detail.kernel.release == "6.18.44"


def test_the_inventory_is_a_metric_per_node() -> None:
    metrics = OperatorMetrics(CollectorRegistry())
    metrics.watch_kernels(lambda: {"n1": THIS_VM, "n2": KernelInfo(release="5.4.0")})
    labels = {
        s.labels["node"]: s.labels
        for family in metrics.registry.collect()
        if family.name == "tracekeeper_operator_node_kernel_info"
        for s in family.samples
    }
    assert labels["n1"]["kprobes"] == "false" and labels["n1"]["ring_buffer"] == "true"
    assert labels["n2"]["release"] == "5.4.0" and labels["n2"]["cgroup_v2"] == "unknown"
