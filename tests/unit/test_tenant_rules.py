"""Tenant attach points: only tracepoints about the current task, kprobes privileged.

Checked through the operator's selection (where NotPermitted is decided), with the same
settings the operator's command line builds, and against the admission policy's copy of
the allowlist (one source of truth: the policy's defaults must equal the Python ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.tenant_rules import (
    DEFAULT_TENANT_RAW_TRACEPOINTS,
    DEFAULT_TENANT_TRACEPOINTS,
    TenantRules,
)
from tracekeeper_operator.cli import _parser, settings_from
from tracekeeper_operator.cluster_view import ClusterView
from tracekeeper_operator.records import (
    AgentRecord,
    ContainerRecord,
    ObjectRef,
    PodRecord,
    ProbeRecord,
)
from tracekeeper_operator.selection import Refusal, Selected, select
from tracekeeper_operator.settings import OperatorSettings

POLICY = Path(__file__).resolve().parents[2] / "manifests" / "base" / "admission-policy.yaml"
SETTINGS = OperatorSettings(namespace="tracekeeper-system")
UID = "00000000-0000-4000-8000-000000000001"


def probe(ns: str, spec: dict[str, Any]) -> ProbeRecord:
    return ProbeRecord(
        ref=ObjectRef("TraceProbe", ns, "p", UID),
        generation=1,
        spec=TraceProbeSpec.model_validate(spec),
    )


def view(ns: str) -> ClusterView:
    pod = PodRecord(
        namespace=ns,
        name="app-0",
        uid="00000000-0000-4000-8000-000000000002",
        node="node-a",
        labels={},
        phase="Running",
        containers=(ContainerRecord("app", "containerd://" + "1" * 64),),
    )
    return ClusterView.build(pods=[pod], agents=[AgentRecord("node-a", "tk/a", "http://a:1")])


def refusal(ns: str, spec: dict[str, Any], settings: OperatorSettings = SETTINGS) -> str | None:
    result = select(probe(ns, spec), view(ns), settings)
    if isinstance(result, Selected):
        assert result.pods == 1
        return None
    assert isinstance(result, Refusal) and result.reason == "NotPermitted", result
    return result.message


ALLOWED = [
    {"tracepoint": "syscalls:sys_enter_openat"},
    {"tracepoint": "sched:sched_process_exec", "output": {"kind": "events", "fields": ["pid"]}},
    {"tracepoint": "raw_syscalls:sys_enter"},
    {"syscall": {"name": "read", "latency": True}, "output": {"kind": "histogram"}},
    {"uprobe": {"binary": "c", "symbol": "getaddrinfo"}},
    {"rawTracepoint": "sched_switch"},
]

REFUSED = [
    ({"tracepoint": "sched:sched_switch"}, "tracepoint 'sched:sched_switch'", "next_comm"),
    ({"tracepoint": "irq:irq_handler_entry"}, "tracepoint 'irq:irq_handler_entry'", "interrupt"),
    ({"tracepoint": "softirq:softirq_entry"}, "tracepoint 'softirq:softirq_entry'", "softirq"),
    ({"tracepoint": "kmem:kmalloc"}, "tracepoint 'kmem:kmalloc'", "kernel addresses"),
    ({"kprobe": {"function": "tcp_v4_connect"}}, "kprobe 'tcp_v4_connect'", "kernel pointers"),
    ({"rawTracepoint": "irq_handler_entry"}, "rawTracepoint 'irq_handler_entry'", "outside"),
]


@pytest.mark.parametrize("spec", ALLOWED, ids=lambda s: next(iter(s.values())).__str__()[:40])
def test_tenant_safe_attach_points_are_accepted_in_a_tenant_namespace(
    spec: dict[str, Any],
) -> None:
    assert refusal("team-a", spec) is None


@pytest.mark.parametrize(("spec", "names", "why"), REFUSED, ids=[r[1] for r in REFUSED])
def test_other_tasks_and_kernel_attach_points_are_not_permitted_for_tenants(
    spec: dict[str, Any], names: str, why: str
) -> None:
    message = refusal("team-a", spec)
    assert message is not None
    assert names in message and "privileged" in message and why in message
    assert "tracekeeper-system" in message and "'team-a'" in message
    # The same probe in the privileged namespace is admitted.
    assert refusal("tracekeeper-system", spec) is None


def test_the_platform_teams_extension_admits_a_tracepoint_and_only_that() -> None:
    spec = {"tracepoint": "irq:irq_handler_entry"}
    args = _parser().parse_args([
        "run", "--tenant-tracepoint", "irq:irq_handler_entry",
        "--tenant-tracepoint", "block:*", "--tenant-raw-tracepoint", "irq_handler_exit",
    ])  # fmt: skip
    extended = settings_from(args)
    assert refusal("team-a", spec, extended) is None
    assert refusal("team-a", {"tracepoint": "block:block_rq_issue"}, extended) is None
    assert refusal("team-a", {"rawTracepoint": "irq_handler_exit"}, extended) is None
    assert refusal("team-a", {"tracepoint": "irq:irq_handler_exit"}, extended) is not None
    assert refusal("team-a", {"tracepoint": "sched:sched_switch"}, extended) is not None
    # Extensions add to the defaults, never replace them.
    assert refusal("team-a", {"tracepoint": "syscalls:sys_enter_read"}, extended) is None
    assert refusal("team-a", spec) is not None  # without the flag


@pytest.mark.parametrize("bad", ["irq", "irq:", "IRQ:x", "irq:irq/x", "*:*", "a:b:c"])
def test_a_malformed_extension_is_refused_on_the_command_line(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--tenant-tracepoint", bad])
    assert "category:name or category:*" in capsys.readouterr().err


def test_wildcards_cover_one_category_only() -> None:
    rules = TenantRules.extended(["block:*"])
    assert rules.allows_tracepoint("block:block_rq_issue")
    assert not rules.allows_tracepoint("blockx:block_rq_issue")
    assert not rules.allows_tracepoint("sched:block")


def _policy_variables() -> dict[str, list[str]]:
    (policy,) = [
        d
        for d in yaml.safe_load_all(POLICY.read_text())
        if d["kind"] == "ValidatingAdmissionPolicy"
        and d["metadata"]["name"] == "tracekeeper-traceprobe-privileged-fields"
    ]
    # The variables are CEL list literals of strings, which read as YAML flow sequences.
    return {v["name"]: yaml.safe_load(v["expression"]) for v in policy["spec"]["variables"]}


def test_the_admission_policy_allows_exactly_the_default_allowlist() -> None:
    variables = _policy_variables()
    assert variables["tenantTracepoints"] == list(DEFAULT_TENANT_TRACEPOINTS)
    assert variables["tenantRawTracepoints"] == list(DEFAULT_TENANT_RAW_TRACEPOINTS)
