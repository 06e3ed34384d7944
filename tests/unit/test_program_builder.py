"""C rendering (golden text) and the builder's decisions, against a fake kernel.

Regenerate the golden files after an intended change with
    TRACEKEEPER_UPDATE_GOLDEN=1 pytest tests/unit/test_program_builder.py
and review the diff: it is the C that will run in kernels.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from tracekeeper_agent.host.kernel_features import FeatureCheck, KernelFeatures
from tracekeeper_agent.ports import LoadFailure
from tracekeeper_agent.programs.builder import PRELUDE, build_plan, plan_inputs
from tracekeeper_agent.programs.kinds import BuildContext
from tracekeeper_api.protocol import ProbeAssignment

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
TRACEFS = HERE / "tracefs"  # format files copied from a 6.18 kernel

YES = FeatureCheck(True, "test")
KERNEL = KernelFeatures(
    release="6.18.0-test",
    version=(6, 18, 0),
    config_source=None,
    kprobes=FeatureCheck(False, "CONFIG_KPROBES is not set in the test config"),
    uprobes=YES,
    tracepoints=YES,
    btf=YES,
    ring_buffer=YES,
    batch_map_ops=YES,
    cgroup_v2=YES,
    kernel_headers=YES,
    headers_dir="/lib/modules/6.18.0-test/build",
    headers_release="6.18.0-test",
)
CTX = BuildContext(kernel=KERNEL, tracefs=TRACEFS)
PODS = {"pods": [{"uid": "0000-1", "namespace": "team-a", "name": "web-0"}]}


def assignment(spec: dict[str, Any], targets: dict[str, Any] | None = None) -> ProbeAssignment:
    return ProbeAssignment.model_validate(
        {"id": "team-a/probe", "specHash": "0" * 16, "spec": spec, "targets": targets or PODS}
    )


CASES: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "tracepoint_count_by_pod": ({"tracepoint": "syscalls:sys_enter_openat"}, None),
    "tracepoint_events_fields_rate": (
        {
            "tracepoint": "sched:sched_process_exec",
            "output": {"kind": "events", "fields": ["filename", "pid"], "rateLimit": 50},
        },
        {**PODS, "processNames": ["nginx"]},
    ),
    "syscall_latency_histogram": (
        {
            "syscall": {"name": "read", "latency": True},
            "output": {"kind": "histogram", "by": ["container", "comm"]},
            "sampling": 10,
        },
        None,
    ),
    "raw_tracepoint_host_pids": (
        {"rawTracepoint": "sched_switch", "output": {"by": ["pid"]}},
        {"pids": [42], "followChildren": True},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_c_matches_golden(name: str) -> None:
    spec, targets = CASES[name]
    # The shared prelude is the same text for every probe: golden files show what varies.
    source = build_plan(assignment(spec, targets), CTX).source
    assert source.count(PRELUDE) == 1
    source = source.replace(PRELUDE, "/* ... c_prelude.h ... */\n")
    golden = GOLDEN / f"{name}.c"
    if os.environ.get("TRACEKEEPER_UPDATE_GOLDEN"):
        golden.write_text(source)
    assert source == golden.read_text()


def test_whom_and_how_often_are_not_in_the_text() -> None:
    """Targets, sampling and the rate limit are map contents: every variant compiles to one
    text and one shape key (adding processNames or pids, or changing sampling, compiles
    nothing)."""
    base = {"tracepoint": "syscalls:sys_enter_openat", "output": {"kind": "events"}}
    variants = [
        assignment(base, PODS),
        assignment(base, {"pods": []}),
        assignment({**base, "sampling": 10}, PODS),
        assignment({**base, "output": {"kind": "events", "rateLimit": 5}}, PODS),
        assignment(base, {**PODS, "processNames": ["nginx"]}),
        assignment(base, {"pids": [1]}),
        assignment(base, {"hostWide": True}),
    ]
    sources = {build_plan(a, CTX).source for a in variants}
    assert len(sources) == 1
    assert len({plan_inputs(a) for a in variants}) == 1


def test_what_changes_the_text_changes_the_shape() -> None:
    base: dict[str, Any] = {"tracepoint": "syscalls:sys_enter_openat"}
    others: list[dict[str, Any]] = [
        {"tracepoint": "syscalls:sys_enter_read"},
        {**base, "output": {"kind": "count", "by": ["pod", "comm"]}},
        {**base, "output": {"kind": "events"}},
        {**base, "output": {"kind": "events", "fields": ["filename"]}},
        {"syscall": {"name": "openat"}},
        {"syscall": {"name": "openat", "latency": True}, "output": {"kind": "histogram"}},
    ]
    keys = {plan_inputs(assignment(spec)) for spec in [base, *others]}
    assert len(keys) == 1 + len(others)
    # A privileged namespace's probe never shares with a tenant's.
    assert plan_inputs(assignment(base), True) != plan_inputs(assignment(base), False)
    # Following children brings the fork and exit followers into the program.
    follows = assignment(base, {"pids": [1], "followChildren": True})
    assert plan_inputs(follows) != plan_inputs(assignment(base, {"pids": [1]}))
    assert "#define TK_FOLLOW_CHILDREN 1" in build_plan(follows, CTX).source


def test_raw_programs_are_never_shared() -> None:
    spec = {"program": {"source": "int x;"}}
    a = assignment(spec)
    b = ProbeAssignment.model_validate({**a.to_wire(), "id": "team-a/other"})
    assert plan_inputs(a) != plan_inputs(b)


def test_kprobe_unsupported_names_the_kernel_and_evidence() -> None:
    with pytest.raises(LoadFailure) as exc:
        build_plan(assignment({"kprobe": {"function": "tcp_v4_connect"}}), CTX)
    assert exc.value.state == "Unsupported"
    assert exc.value.message.startswith("kprobe tcp_v4_connect: this node's kernel (6.18.0-test)")
    assert "CONFIG_KPROBES is not set in the test config" in exc.value.message


def test_kprobe_renders_where_supported() -> None:
    ctx = dataclasses.replace(CTX, kernel=dataclasses.replace(KERNEL, kprobes=YES))
    plan = build_plan(assignment({"kprobe": {"function": "tcp_v4_connect", "return": True}}), ctx)
    (attach,) = plan.attachments
    assert (attach.kind, attach.fn_name, attach.target) == (
        "kretprobe",
        "tk_kretprobe",
        "tcp_v4_connect",
    )
    assert "int tk_kretprobe(struct pt_regs *ctx)" in plan.source


def test_raw_program_needs_permission() -> None:
    a = assignment({"program": {"source": "int x;"}})
    with pytest.raises(LoadFailure) as exc:
        build_plan(a, CTX)
    assert exc.value.reason == "NotPermitted"
    allowed = build_plan(a, dataclasses.replace(CTX, allow_program=True))
    assert allowed.source.endswith("int x;\n")


def test_missing_headers_are_reported_before_compiling() -> None:
    no_headers = dataclasses.replace(
        KERNEL, kernel_headers=FeatureCheck(False, "/lib/modules/6.18.0-test/build missing")
    )
    with pytest.raises(LoadFailure) as exc:
        build_plan(
            assignment({"tracepoint": "syscalls:sys_enter_openat"}), BuildContext(no_headers)
        )
    assert exc.value.state == "KernelHeadersMissing"
    assert "/lib/modules/6.18.0-test/build missing" in exc.value.message


def test_histogram_value_must_be_numeric() -> None:
    spec = {
        "tracepoint": "sched:sched_process_exec",
        "output": {"kind": "histogram", "value": "filename"},
    }
    with pytest.raises(LoadFailure, match="a histogram needs a numeric field"):
        build_plan(assignment(spec), CTX)


def test_event_fields_describe_the_record() -> None:
    spec, targets = CASES["tracepoint_events_fields_rate"]
    plan = build_plan(assignment(spec, targets), CTX)
    assert [(f.name, f.kind, f.size) for f in plan.event_fields] == [
        ("filename", "str", 256),
        ("pid", "int", 8),
    ]


def test_source_hash_follows_the_source() -> None:
    a = build_plan(assignment({"tracepoint": "syscalls:sys_enter_openat"}), CTX)
    events = {"tracepoint": "syscalls:sys_enter_openat", "output": {"kind": "events"}}
    b = build_plan(assignment(events), CTX)
    again = build_plan(assignment({"tracepoint": "syscalls:sys_enter_openat"}), CTX)
    assert a.source_hash == again.source_hash != b.source_hash
