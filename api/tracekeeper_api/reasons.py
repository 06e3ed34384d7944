"""The reason vocabulary: every CamelCase reason tracekeeper produces, in the agent's probe
outcomes and in the operator's conditions. Stable: alerts and scripts key on them.

Typed where reasons are made (the agent's LoadFailure, the operator's selection and status
folding); the wire fields stay plain strings, so that an agent of another version may
report a reason this operator does not know and it still reaches the user (as a
`ReportedReason`, passed through unchanged).
"""

from __future__ import annotations

from typing import Literal, NewType

OutcomeReason = Literal[
    "Loaded",
    "Suspended",
    "CompileFailed",
    "AttachFailed",
    "Unsupported",
    "KernelHeadersMissing",
    "InvalidSpec",
    "NotPermitted",
    "Failed",
]
"""What an agent says of one probe (ProbeOutcome.reason)."""

RefusalReason = Literal["NotPermitted", "InvalidSpec", "FilterNotFound"]
"""Why the operator accepts an object nowhere (Accepted=False)."""

OperatorReason = Literal[
    RefusalReason,
    "Accepted",
    "Loaded",
    "Suspended",
    "NoFailures",
    "NoMatchingPods",
    "NodesPending",
    "QuotaExceeded",
    "AgentUnreachable",
    "Expired",
    "SessionRunning",
    "SessionPending",
    "StateSaved",
    "StateNotSaved",
]
"""The reasons of the conditions the operator decides itself."""

Reason = Literal[OutcomeReason, OperatorReason]
"""Every reason a TraceProbe or TraceFilter condition or failure can carry."""

ReportedReason = NewType("ReportedReason", str)
"""A reason as an agent reported it (an OutcomeReason, or one of a newer agent)."""
