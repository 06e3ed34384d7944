"""The tracepoints of a probe's nodes, on request: chosen by glob, bounded, merged."""

from __future__ import annotations

import pytest

from tracekeeper_api.output import (
    MAX_MATCH,
    MAX_TRACEPOINTS,
    ProbeTracepoints,
    Tracepoints,
    select_tracepoints,
)
from tracekeeper_api.output_text import tracepoints_text

KERNEL = ["syscalls:sys_enter_openat", "sched:sched_switch", "syscalls:sys_enter_openat2",
          "syscalls:sys_exit_openat", "sched:sched_switch"]  # fmt: skip


def test_a_glob_chooses_sorted_unique_names() -> None:
    got = select_tracepoints(KERNEL, "syscalls:sys_enter_openat*")
    assert got == Tracepoints(
        match="syscalls:sys_enter_openat*",
        total=2,
        names=["syscalls:sys_enter_openat", "syscalls:sys_enter_openat2"],
    )
    assert select_tracepoints(KERNEL, "*").total == 4
    assert select_tracepoints(KERNEL, "nope:*").names == []


def test_a_wide_glob_is_bounded_and_says_so() -> None:
    many = [f"cat:tp{i:05d}" for i in range(MAX_TRACEPOINTS + 7)]
    got = select_tracepoints(many, "cat:*")
    assert got.total == MAX_TRACEPOINTS + 7 and len(got.names) == MAX_TRACEPOINTS
    assert got.truncated
    with pytest.raises(ValueError, match="longer than"):
        select_tracepoints(KERNEL, "x" * (MAX_MATCH + 1))


def test_the_plugin_shows_which_nodes_have_each() -> None:
    listing = ProbeTracepoints(
        probe="shop/opens",
        match="syscalls:*",
        nodes={
            "n1": select_tracepoints(KERNEL, "syscalls:*"),
            "n2": select_tracepoints(["syscalls:sys_enter_openat"], "syscalls:*"),
        },
        unavailable={"n3": "agent unreachable (TimeoutError)"},
    )
    rows = {line.split()[0]: line.split()[1] for line in tracepoints_text(listing).splitlines()}
    assert rows["syscalls:sys_enter_openat"] == "all"
    assert rows["syscalls:sys_enter_openat2"] == "n1"
    assert rows["n3:"] == "not"  # "n3: not asked: agent unreachable ..."
    empty = ProbeTracepoints(probe="shop/opens", match="kvm:*")
    assert tracepoints_text(empty) == "no tracepoint matches 'kvm:*' on any node\n"
