"""The BCC loader's pure parts: how kernel errors are put to users."""

from __future__ import annotations

from tracekeeper_agent.bpf.loader import explain


def test_the_tracepoint_program_limit_is_explained() -> None:
    # What BCC reported for the 65th program on syscalls:sys_enter_getppid on this kernel.
    seen = (
        "ioctl(PERF_EVENT_IOC_SET_BPF): Argument list too long\n"
        "Failed to attach BPF program b'tracepoint__syscalls__sys_enter_getppid' "
        "to tracepoint b'syscalls:sys_enter_getppid'"
    )
    explained = explain(seen)
    assert explained.startswith(seen)
    assert explained.endswith(
        "at most 64 BPF programs on one tracepoint (BPF_TRACE_MAX_PROGS): 64 shapes of 64 "
        "probes each, or fewer when other tools on this node use some"
    )


def test_other_errors_are_left_as_they_are() -> None:
    assert explain("error: use of undeclared identifier 'x'") == (
        "error: use of undeclared identifier 'x'"
    )
