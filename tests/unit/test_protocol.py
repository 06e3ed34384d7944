"""Operator -> agent protocol: round trips, bounds, the spec hash."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.protocol import (
    NodeReport,
    NodeState,
    ProbeOutcome,
    spec_hash,
)
from tracekeeper_api.selectors import LabelSelector
from tracekeeper_api.text import truncate_message

STATE = {
    "node": "node-1",
    "revision": 7,
    "probes": [
        {
            "id": "team-a/opens",
            "specHash": "0123456789abcdef",
            "spec": {"tracepoint": "syscalls:sys_enter_openat", "output": {"by": ["pod", "comm"]}},
            "targets": {
                "pods": [
                    {
                        "uid": "5d1c6a4e-0000-4000-8000-000000000001",
                        "namespace": "team-a",
                        "name": "web-0",
                        "containers": [{"name": "app", "containerId": "containerd://abc"}],
                    }
                ],
                "processNames": ["nginx"],
            },
        }
    ],
}


def test_node_state_round_trip() -> None:
    state = NodeState.model_validate(STATE)
    again = NodeState.model_validate(state.to_wire())
    assert again == state
    assert state.probes[0].namespace == "team-a"
    assert state.probes[0].targets.pods[0].containers[0].container_id == "containerd://abc"


def test_duplicate_probe_ids_refused() -> None:
    doc = {**STATE, "probes": STATE["probes"] * 2}  # type: ignore[operator]
    with pytest.raises(ValidationError, match="probe ids must be unique, repeated: team-a/opens"):
        NodeState.model_validate(doc)


def test_probe_id_must_be_namespace_slash_name() -> None:
    probe = {**STATE["probes"][0], "id": "opens"}  # type: ignore[index]
    with pytest.raises(ValidationError, match=r"probes\.0\.id"):
        NodeState.model_validate({**STATE, "probes": [probe]})


def test_spec_hash_ignores_whom_but_not_what() -> None:
    base = TraceProbeSpec.model_validate({"tracepoint": "syscalls:sys_enter_openat"})
    refiltered = TraceProbeSpec.model_validate(
        {"tracepoint": "syscalls:sys_enter_openat", "filterRef": "web", "suspend": True}
    )
    other = TraceProbeSpec.model_validate(
        {"tracepoint": "syscalls:sys_enter_openat", "sampling": 2}
    )
    assert spec_hash(base) == spec_hash(refiltered)
    assert spec_hash(base) != spec_hash(other)


def test_report_round_trip() -> None:
    report = NodeReport(
        node="n",
        revision=3,
        boot_id="b",
        probes=[
            ProbeOutcome(
                id="a/b",
                spec_hash="x" * 16,
                state="Unsupported",
                reason="Unsupported",
                message="kprobes are not available",
            )
        ],
    )
    assert NodeReport.model_validate(report.to_wire()) == report
    assert report.to_wire()["bootId"] == "b"


def test_truncate_keeps_the_end() -> None:
    text = "start " + "x" * 2000 + " the verifier error"
    out = truncate_message(text, 100)
    assert len(out) == 100 and out.endswith("the verifier error")


def test_label_selector_matching() -> None:
    sel = LabelSelector.model_validate(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "track", "operator": "NotIn", "values": ["canary"]},
                {"key": "tier", "operator": "Exists"},
            ],
        }
    )
    assert sel.matches({"app": "web", "tier": "fe"})
    assert not sel.matches({"app": "web", "tier": "fe", "track": "canary"})
    assert not sel.matches({"app": "web"})
    assert not sel.matches({"app": "db", "tier": "fe"})
    assert LabelSelector().matches({})
