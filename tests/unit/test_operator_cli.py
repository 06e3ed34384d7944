"""tracekeeper-operator run: arguments to settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracekeeper_operator.cli import _parser, settings_from
from tracekeeper_operator.settings import own_namespace


def test_defaults_make_the_operators_namespace_the_privileged_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "tk")
    settings = settings_from(_parser().parse_args(["run"]))
    assert settings.namespace == "tk" and settings.privileged == frozenset({"tk"})
    assert not settings.allow_raw_programs and settings.read_nodes
    assert settings.agent_labels == {"app.kubernetes.io/name": "tracekeeper-agent"}
    assert settings.agent_daemonset == "tracekeeper-agent"
    assert not settings.trust_endpoint_annotation  # never in a cluster unless asked


def test_flags_reach_the_settings() -> None:
    args = _parser().parse_args([
        "run", "--namespace", "ops", "--privileged-namespace", "platform",
        "--privileged-namespace", "ops", "--allow-raw-programs", "--token-file", "/t",
        "--agent-selector", "app=agent,tier=node", "--no-node-labels", "--push-debounce", "0.5",
        "--resync-interval", "5", "--unload-timeout", "9", "--agent-daemonset", "agents",
        "--trust-agent-endpoint-annotation",
    ])  # fmt: skip
    s = settings_from(args)
    assert s.privileged == frozenset({"platform", "ops"}) and s.allow_raw_programs
    assert s.token_file == Path("/t") and s.agent_labels == {"app": "agent", "tier": "node"}
    assert not s.read_nodes and s.push_debounce == 0.5 and s.push_max_delay == 2.5
    assert (s.resync_interval, s.unload_timeout) == (5, 9)
    assert s.agent_daemonset == "agents" and s.trust_endpoint_annotation


def test_namespace_precedence() -> None:
    assert own_namespace("x", {"POD_NAMESPACE": "y"}) == "x"
    assert own_namespace(None, {"POD_NAMESPACE": "y"}) == "y"
    assert own_namespace(None, {}) == "tracekeeper-system"
