"""What a tenant's TraceProbe may attach to: tracepoints about the task they run in.

A tenant may only trace its own pods. The filter makes sure a program only counts hits in
those pods' tasks, but a tracepoint's payload can still be about someone else:
`sched:sched_switch` carries the next task's comm and pid, `kmem:kmalloc` kernel addresses,
and irq/softirq tracepoints run in interrupt context, charged to whichever task was
interrupted. So outside the privileged namespaces only tracepoints whose payload is about
the current task are allowed: the default allowlist below, which the platform team may
extend (operator flags --tenant-tracepoint / --tenant-raw-tracepoint, and the admission
policy's variables in manifests/base/admission-policy.yaml: a unit test keeps the policy's
defaults equal to these). Kprobes (kernel functions: any context, kernel pointers) and raw
programs are privileged. Syscalls and uprobes run in the calling task: always allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tracekeeper_api.probes import TraceProbeSpec

# category:name, or category:* for a whole category. Each entry: its payload is about the
# task that hits it (the one the filter attributes the hit to).
DEFAULT_TENANT_TRACEPOINTS: tuple[str, ...] = (
    "syscalls:*",  # the calling task's own arguments and results
    "raw_syscalls:*",
    "sched:sched_process_exec",  # current execs: its filename, pid
    "sched:sched_process_exit",  # current exits
    "sched:sched_process_fork",  # current forks: itself and its new child
    "signal:signal_deliver",  # a signal delivered to current
    "task:task_newtask",  # current creates a task (a copy of itself)
)

# Raw tracepoints decode no argument: a hit is counted for the current task, so what
# matters is only that the hit happens in that task's context (sched_switch: current is
# the task switched out; not irq/softirq handlers, which interrupt anyone).
DEFAULT_TENANT_RAW_TRACEPOINTS: tuple[str, ...] = (
    "sys_enter",
    "sys_exit",
    "sched_switch",
    "sched_process_exec",
    "sched_process_exit",
    "sched_process_fork",
)

_TRACEPOINT_ENTRY = re.compile(r"^[a-z0-9_]{1,64}:([a-z0-9_]{1,96}|\*)$")
_RAW_ENTRY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

# Why a category is not on the list, for the refusal message (else the generic reason).
_CATEGORY_WHY = {
    "irq": "it runs in interrupt context and is charged to whichever task was interrupted",
    "softirq": "it runs in softirq context and is charged to whichever task was interrupted",
    "irq_vectors": "it runs in interrupt context and is charged to whichever task was interrupted",
    "kmem": "its fields carry kernel addresses (call_site, ptr)",
    "sched": "its payload can be about other tasks (e.g. sched_switch's next_comm, next_pid)",
}
_GENERIC_WHY = "its payload may be about other tasks or kernel memory"


def check_tracepoint_entry(entry: str) -> str:
    """An allowlist extension entry, or ValueError saying what is allowed."""
    if not _TRACEPOINT_ENTRY.fullmatch(entry):
        raise ValueError(
            f"{entry!r} is not a tenant tracepoint: use category:name or category:* "
            "(e.g. sched:sched_process_exec, syscalls:*)"
        )
    return entry


def check_raw_tracepoint_entry(entry: str) -> str:
    if not _RAW_ENTRY.fullmatch(entry):
        raise ValueError(f"{entry!r} is not a raw tracepoint name (e.g. sched_switch)")
    return entry


@dataclass(frozen=True)
class TenantRules:
    """The attach points a tenant namespace may use."""

    tracepoints: frozenset[str] = frozenset(DEFAULT_TENANT_TRACEPOINTS)
    raw_tracepoints: frozenset[str] = frozenset(DEFAULT_TENANT_RAW_TRACEPOINTS)

    @classmethod
    def extended(cls, tracepoints: Iterable[str] = (), raw: Iterable[str] = ()) -> TenantRules:
        """The defaults plus the platform team's entries (checked: ValueError if malformed).
        Extensions only add: the defaults cannot be taken away."""
        return cls(
            frozenset(DEFAULT_TENANT_TRACEPOINTS)
            | {check_tracepoint_entry(t) for t in tracepoints},
            frozenset(DEFAULT_TENANT_RAW_TRACEPOINTS)
            | {check_raw_tracepoint_entry(r) for r in raw},
        )

    def allows_tracepoint(self, tracepoint: str) -> bool:
        category = tracepoint.partition(":")[0]
        return tracepoint in self.tracepoints or f"{category}:*" in self.tracepoints

    def refusal(self, spec: TraceProbeSpec) -> str | None:
        """Why a tenant may not use this probe's attach point, naming it; None if it may."""
        if spec.kprobe is not None:
            return (
                f"kprobe {spec.kprobe.function!r} is privileged: a kernel function runs in "
                "any context and its arguments are kernel pointers; use a tracepoint, a "
                "syscall or a uprobe"
            )
        if spec.tracepoint is not None and not self.allows_tracepoint(spec.tracepoint):
            category = spec.tracepoint.partition(":")[0]
            why = _CATEGORY_WHY.get(category, _GENERIC_WHY)
            return (
                f"tracepoint {spec.tracepoint!r} is privileged: {why}; tenants may trace "
                f"{', '.join(sorted(self.tracepoints))}"
            )
        if spec.raw_tracepoint is not None and spec.raw_tracepoint not in self.raw_tracepoints:
            return (
                f"rawTracepoint {spec.raw_tracepoint!r} is privileged: it may run outside "
                "the task it is charged to; tenants may use "
                f"{', '.join(sorted(self.raw_tracepoints))}"
            )
        return None
