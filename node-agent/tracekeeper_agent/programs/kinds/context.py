"""What a probe kind gets to render with, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tracekeeper_agent.host.kernel_features import KernelFeatures
from tracekeeper_agent.ports import Attachment, EventField, TargetRoot


@dataclass(frozen=True)
class BuildContext:
    kernel: KernelFeatures
    tracefs: Path | None = None
    roots: tuple[TargetRoot, ...] = ()
    """Where uprobe binaries are looked up: the targeted containers' roots, or the host's
    for host targets. Empty: no targeted container runs a process yet."""
    allow_program: bool = False
    privileged: bool = False
    """The probe comes from a privileged namespace: it may capture address fields, which
    tenants' probes may not (tracefs.tenant_field_refusal)."""


@dataclass(frozen=True)
class KindRender:
    body: str
    """C functions for this attach point (they start with TK_ADMIT(), then the output code)."""
    attachments: tuple[Attachment, ...]
    event_fields: tuple[EventField, ...] = ()
    event_decls: tuple[str, ...] = field(default=())
    """Extra C member declarations of struct tk_event, matching event_fields."""
    raw: bool = False
    """The body is user source: the output macros are defined for it, nothing else."""
    held_fds: tuple[int, ...] = ()
    """Open files the attachments name (uprobes); the plan takes them over."""
