"""What a probe kind gets to render with, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tracekeeper_agent.kernel import Attachment, EventField
from tracekeeper_agent.kernel_features import KernelFeatures

DEFAULT_PRIVILEGED_NAMESPACES = frozenset({"tracekeeper-system"})
"""Whose probes the agent treats as privileged (the operator's default); a probe the
operator lets run raw source (allowProgram) is privileged too, as are standalone runs."""


@dataclass(frozen=True)
class BuildContext:
    kernel: KernelFeatures
    tracefs: Path | None = None
    roots: tuple[Path, ...] = (Path("/"),)
    """Filesystem roots where uprobe binaries are looked up: the target containers' roots
    (/proc/PID/root), or / for host targets."""
    allow_program: bool = False
    privileged: bool = False
    """The probe comes from a privileged namespace: it may capture address fields, which
    tenants' probes may not (tracefs.tenant_field_refusal)."""


@dataclass(frozen=True)
class KindRender:
    body: str
    """C functions for this attach point (they call tk_admit() and the output code)."""
    attachments: tuple[Attachment, ...]
    event_fields: tuple[EventField, ...] = ()
    event_decls: tuple[str, ...] = field(default=())
    """Extra C member declarations of struct tk_event, matching event_fields."""
    raw: bool = False
    """The body is user source: the output macros are defined for it, nothing else."""
