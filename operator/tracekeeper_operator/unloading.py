"""When a deleted TraceProbe's finalizer may go: every agent confirmed it no longer runs the
probe, or the unload timeout passed (an Event then names the nodes that did not confirm)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tracekeeper_api.text import first_of
from tracekeeper_operator.kube_events import EventSpec

MAX_NODES_NAMED = 10


@dataclass(frozen=True)
class UnloadVerdict:
    release: bool
    message: str
    event: EventSpec | None = None


def _named(nodes: Sequence[str]) -> str:
    return first_of(nodes, MAX_NODES_NAMED)


def parse_rfc3339(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def unload_verdict(
    holding: Sequence[str], *, deletion_started: str, now: datetime, timeout: float
) -> UnloadVerdict:
    if not holding:
        return UnloadVerdict(
            True,
            "unloaded from every node",
            EventSpec("Normal", "ProbeUnloaded", "unloaded from every node"),
        )
    started = parse_rfc3339(deletion_started) or now
    waited = (now - started).total_seconds()
    if waited < timeout:
        return UnloadVerdict(
            False, f"waiting for {len(holding)} node(s) to unload it: {_named(holding)}"
        )
    message = (
        f"node(s) {_named(holding)} did not confirm unloading within {timeout:.0f}s; "
        "the finalizer is released anyway (their agents unload it when they next get "
        "their state)"
    )
    return UnloadVerdict(True, message, EventSpec("Warning", "ProbeUnloaded", message))
