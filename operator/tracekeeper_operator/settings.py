"""Operator settings: who is privileged, how agents are found and reached, push pacing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tracekeeper_api.budgets import Budget
from tracekeeper_api.status import MAX_FAILURES
from tracekeeper_api.tenant_rules import TenantRules

NAMESPACE_ENV = "POD_NAMESPACE"
"""Set from the downward API in the operator's Deployment: its own namespace."""
DEFAULT_NAMESPACE = "tracekeeper-system"
DEFAULT_AGENT_SELECTOR = "app.kubernetes.io/name=tracekeeper-agent"
DEFAULT_AGENT_PORT_NAME = "api"
DEFAULT_TOKEN_FILE = Path("/var/run/secrets/tracekeeper/token")
DEFAULT_AGENT_DAEMONSET = "tracekeeper-agent"
"""The agent DaemonSet (manifests/base/agent.yaml): only pods it controls, in the operator's
namespace, are agents. Labels alone prove nothing: any tenant can set them."""
AGENT_ENDPOINT_ANNOTATION = "tracekeeper.dev/agent-endpoint"
"""An explicit agent URL on an (already trusted) agent pod, for agents not reached at pod
IP:port such as the e2e tier's local processes. Ignored unless the operator runs with
--trust-agent-endpoint-annotation: it would let whoever edits agent pods redirect pushes."""


def parse_label_selector(text: str) -> dict[str, str]:
    """`k=v,k2=v2` -> {k: v, k2: v2}; equality terms only (what kopf's labels filter takes)."""
    labels: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.partition("=")
        if not sep or not key.strip() or value.startswith("="):
            raise ValueError(f"agent selector term {term!r} is not key=value")
        labels[key.strip()] = value.strip()
    if not labels:
        raise ValueError("the agent selector is empty")
    return labels


def own_namespace(explicit: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The operator's namespace: --namespace, else $POD_NAMESPACE, else the default."""
    return explicit or environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE


@dataclass(frozen=True)
class OperatorSettings:
    namespace: str = DEFAULT_NAMESPACE
    """The operator's own namespace (privileged unless privileged_namespaces says otherwise)."""
    privileged_namespaces: frozenset[str] = frozenset()
    """Namespaces whose objects may use privileged fields; empty means {namespace}."""
    allow_raw_programs: bool = False
    """Raw BCC source is refused everywhere unless this is on (and then only privileged)."""
    agent_labels: Mapping[str, str] = field(
        default_factory=lambda: parse_label_selector(DEFAULT_AGENT_SELECTOR)
    )
    agent_port_name: str = DEFAULT_AGENT_PORT_NAME
    agent_daemonset: str = DEFAULT_AGENT_DAEMONSET
    """Agent pods are those controlled by this DaemonSet in `namespace`."""
    trust_endpoint_annotation: bool = False
    """Honour AGENT_ENDPOINT_ANNOTATION on agent pods (local test worlds only)."""
    token_file: Path = DEFAULT_TOKEN_FILE
    read_nodes: bool = True
    """Whether Node objects are watched (for nodeSelector). Off when RBAC forbids it."""
    render_debounce: float = 0.05
    """Quiet time after a cluster change before desired states are rendered again."""
    push_debounce: float = 0.2
    """Quiet time after a node's desired state changed before it is pushed."""
    push_max_delay: float = 1.0
    """A node under constant churn is still pushed at least this often."""
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    resync_interval: float = 30.0
    """How often each agent's report is read back (GET /v1/state) to notice restarts."""
    cost_interval: float = 60.0
    """How often a loaded probe's status.cost is refreshed from the agents' reports."""
    push_timeout: float = 30.0
    """Per request; a compile on the agent happens inside the PUT."""
    unload_timeout: float = 120.0
    """How long a deleted probe waits for every agent to confirm before its finalizer goes."""
    max_failures: int = MAX_FAILURES
    budget: Budget = field(default_factory=Budget)
    """Each tenant namespace's share of a node (privileged namespaces have none); a
    namespace's tracekeeper.dev/budget annotation overrides fields of it."""
    tenant_rules: TenantRules = field(default_factory=TenantRules)
    """Which tracepoints tenants may attach to (defaults plus --tenant-tracepoint)."""

    @property
    def privileged(self) -> frozenset[str]:
        return self.privileged_namespaces or frozenset({self.namespace})

    def is_privileged(self, namespace: str) -> bool:
        return namespace in self.privileged
