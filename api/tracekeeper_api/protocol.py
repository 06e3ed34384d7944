"""The operator -> agent wire protocol: desired node state and per-probe outcomes.

Level-triggered: the operator always sends a node's full desired state
(`PUT /v1/state`); the agent answers with what it has in the kernel. Pod UIDs and
container IDs travel; PIDs and cgroup ids are node-local facts the agent resolves.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Self

from pydantic import Field, model_validator

from tracekeeper_api.base import WireModel
from tracekeeper_api.filters import Pid
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.status import MAX_MESSAGE
from tracekeeper_api.strings import CgroupPath, ProcessName

MAX_PROBES_PER_NODE = 256
MAX_PODS_PER_PROBE = 2048
MAX_CONTAINERS_PER_POD = 64

ProbeState = Literal["Loaded", "Failed", "Unsupported", "KernelHeadersMissing", "Suspended"]


class ContainerTarget(WireModel):
    """A container of a targeted pod. Without containerId it has not started yet."""

    name: str = Field(min_length=1, max_length=253)
    container_id: str | None = Field(default=None, max_length=256)
    """As in pod status: runtime://id (containerd://, cri-o://, docker://)."""


class PodTarget(WireModel):
    """A pod bound to this node whose processes the probe traces."""

    uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F-]+$")
    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
    all_containers: bool = True
    """True: a pod-level entry covers every container, including ones not started yet and
    restarted ones. False: only the listed containers are traced."""
    containers: list[ContainerTarget] = Field(
        default_factory=list, max_length=MAX_CONTAINERS_PER_POD
    )


class ProbeTargets(WireModel):
    """Whom one probe traces on one node."""

    pods: list[PodTarget] = Field(default_factory=list, max_length=MAX_PODS_PER_PROBE)
    process_names: list[ProcessName] = Field(default_factory=list, max_length=16)
    """If set, only processes with these names (AND with the other targets)."""
    pids: list[Pid] = Field(default_factory=list, max_length=64)
    follow_children: bool = False
    cgroup_paths: list[CgroupPath] = Field(default_factory=list, max_length=16)
    host_wide: bool = False


class ProbeAssignment(WireModel):
    """One probe the node should run, with its targets on this node."""

    id: str = Field(min_length=3, max_length=320, pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    """namespace/name of the TraceProbe."""
    spec_hash: str = Field(min_length=8, max_length=64)
    spec: TraceProbeSpec
    targets: ProbeTargets = Field(default_factory=ProbeTargets)
    allow_program: bool = False
    """The operator permits raw program source for this probe (privileged namespace)."""

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.id.split("/", 1)[1]


class NodeState(WireModel):
    """The full desired state of one node's agent."""

    node: str = Field(min_length=1, max_length=253)
    revision: int = Field(ge=0)
    """Increases with every change the operator makes; an older revision is refused."""
    probes: list[ProbeAssignment] = Field(default_factory=list, max_length=MAX_PROBES_PER_NODE)

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        ids = [p.id for p in self.probes]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"probe ids must be unique, repeated: {', '.join(dupes)}")
        return self


class EventDrops(WireModel):
    """Events that did not reach the stream, by where they were lost."""

    rate_limited: int = 0
    ring_full: int = 0
    backlog: int = 0
    """Dropped in user space because a consumer was too slow."""


class ProbeOutcome(WireModel):
    """What the agent has for one probe."""

    id: str
    spec_hash: str
    state: ProbeState
    reason: str = Field(max_length=64)
    """CamelCase: Loaded, CompileFailed, AttachFailed, Unsupported, KernelHeadersMissing,
    InvalidSpec, NotPermitted, Suspended."""
    message: str = Field(default="", max_length=MAX_MESSAGE)
    program_ids: list[int] = Field(default_factory=list)
    """The kernel's BPF program ids (bpftool prog show); unchanged across filter updates."""
    filter_entries: int = 0
    pods: int = 0
    containers: int = 0
    drops: EventDrops = Field(default_factory=EventDrops)


class KernelInfo(WireModel):
    release: str = ""
    kprobes: bool = False
    uprobes: bool = False
    btf: bool = False
    headers: bool = False


class NodeReport(WireModel):
    """The agent's answer to PUT /v1/state and GET /v1/state."""

    node: str
    revision: int
    boot_id: str
    """Random per agent start: a change tells the operator the agent restarted."""
    kernel: KernelInfo = Field(default_factory=KernelInfo)
    probes: list[ProbeOutcome] = Field(default_factory=list)


def spec_hash(spec: TraceProbeSpec) -> str:
    """Hash of what the program is built from. Whom it traces (filter, targets) is left out:
    those change map entries, never the program."""
    relevant = spec.to_wire()
    for key in ("filter", "filterRef", "nodeSelector", "suspend"):
        relevant.pop(key, None)
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def truncate_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """Bound a verifier/compiler message: keep its end, where the error is."""
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1) :]
