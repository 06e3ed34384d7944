"""Every probe kind this kernel supports, loaded for real and fired by a workload."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.conftest import bind, kernel_loader, load_alone, run_in_cgroup
from tracekeeper_agent.bpf.loader import BccProgram
from tracekeeper_agent.ports import FilterEntries, LoadFailure
from tracekeeper_agent.programs.builder import build_plan
from tracekeeper_agent.targets.cgroups import cgroup_id
from tracekeeper_api.protocol import ProbeAssignment
from tracekeeper_sim.kubelet import create_cgroup

pytestmark = pytest.mark.kernel

PY = "/usr/bin/python3"  # Debian's: comm "python3", libc-linked
POD_TARGET = {
    "pods": [{"uid": "00000000-0000-0000-0000-000000000001", "namespace": "t", "name": "p"}]
}


def assignment(spec: dict[str, Any], targets: dict[str, Any] | None = None) -> ProbeAssignment:
    return ProbeAssignment.model_validate(
        {"id": "t/probe", "specHash": "0" * 16, "spec": spec, "targets": targets or POD_TARGET}
    )


def getppid_loop(n: int) -> list[str]:
    return [PY, "-S", "-c", f"import os\nfor _ in range({n}): os.getppid()"]


def load(programs: list[BccProgram], a: ProbeAssignment) -> BccProgram:
    return load_alone(programs, a)


def counts_by_cgroup(p: BccProgram) -> dict[int | None, int]:
    return {s.key.cgroup_id: s.value for s in p.read_counts(0)}


def bpftool_has_prog(prog_id: int) -> bool:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True
    )
    return out.returncode == 0 and json.loads(out.stdout)["id"] == prog_id


@pytest.fixture
def pods(cgroup_sandbox: Path) -> dict[str, Path]:
    """Two pod-level cgroups with one container cgroup each, kubelet-style."""
    layout = {}
    for pod in ("pod-a", "pod-b"):
        layout[pod] = cgroup_sandbox / pod
        layout[f"{pod}/c1"] = cgroup_sandbox / pod / "c1"
        create_cgroup(layout[f"{pod}/c1"])
    return layout


def test_tracepoint_counts_hits_and_ignores_misses(
    loaded: list[BccProgram], pods: dict[str, Path]
) -> None:
    p = load(loaded, assignment({"tracepoint": "syscalls:sys_enter_getppid"}))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(500))
    run_in_cgroup(pods["pod-b/c1"], *getppid_loop(300))
    counts = counts_by_cgroup(p)
    # Keyed by the task's own (container) cgroup, matched through the pod-level entry.
    assert counts == {cgroup_id(pods["pod-a/c1"]): 500}
    assert p.read_counters(0).matched == 500


def test_live_filter_update_keeps_the_program(
    loaded: list[BccProgram], pods: dict[str, Path]
) -> None:
    p = load(loaded, assignment({"tracepoint": "syscalls:sys_enter_getppid"}))
    a, b = cgroup_id(pods["pod-a"]), cgroup_id(pods["pod-b"])
    bind(p, FilterEntries(cgroups=frozenset({a})))
    ids_before = p.program_ids
    assert all(bpftool_has_prog(i) for i in ids_before)
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(100))
    run_in_cgroup(pods["pod-b/c1"], *getppid_loop(100))  # miss, and cached as a miss

    bind(p, FilterEntries(cgroups=frozenset({b})))  # swap: a out, b in
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(70))
    run_in_cgroup(pods["pod-b/c1"], *getppid_loop(40))

    assert p.program_ids == ids_before, "a filter update must not reload the program"
    assert all(bpftool_has_prog(i) for i in ids_before)
    counts = counts_by_cgroup(p)
    assert counts[cgroup_id(pods["pod-a/c1"])] == 100  # nothing after removal
    assert counts[cgroup_id(pods["pod-b/c1"])] == 40  # cached miss was invalidated


def test_pod_entry_covers_a_container_created_after_it(
    loaded: list[BccProgram], pods: dict[str, Path]
) -> None:
    p = load(loaded, assignment({"tracepoint": "syscalls:sys_enter_getppid"}))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    restarted = create_cgroup(pods["pod-a"] / "c1-restarted")
    run_in_cgroup(pods["pod-a"] / "c1-restarted", *getppid_loop(123))
    assert counts_by_cgroup(p) == {restarted: 123}


def test_events_carry_captured_fields(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    spec = {
        "tracepoint": "syscalls:sys_enter_openat",
        "output": {"kind": "events", "fields": ["filename", "flags", "dfd"]},
    }
    p = load(loaded, assignment(spec))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    marker = f"/tmp/tracekeeper-marker-{pods['pod-a'].parent.name}"
    code = f"import os\ntry: os.open({marker!r}, os.O_RDONLY)\nexcept OSError: pass"
    run_in_cgroup(pods["pod-a/c1"], PY, "-S", "-c", code)
    events = p.poll_events(500)
    hits = [e for e in events if e.fields["filename"] == marker]
    assert len(hits) == 1
    (e,) = hits
    assert e.comm == "python3"
    assert e.cgroup_id == cgroup_id(pods["pod-a/c1"])
    assert int(e.fields["flags"]) & 0o3 == 0  # O_RDONLY (python adds O_CLOEXEC)
    assert e.fields["dfd"] == -100  # AT_FDCWD, narrowed from the record's 8 unsigned bytes


def test_rate_limit_drops_are_counted_exactly(
    loaded: list[BccProgram], pods: dict[str, Path]
) -> None:
    spec = {
        "tracepoint": "syscalls:sys_enter_getppid",
        "output": {"kind": "events", "rateLimit": 10},
    }
    p = load(loaded, assignment(spec))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(1000))
    delivered = len(p.poll_events(500))
    c = p.read_counters(0)
    assert c.matched == 1000
    assert 10 <= delivered <= 20  # one or two one-second windows
    assert c.rate_limited + c.ring_full == c.matched - delivered


def test_sampling_is_decided_in_kernel(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    p = load(loaded, assignment({"tracepoint": "syscalls:sys_enter_getppid", "sampling": 10}))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(5000))
    kept = sum(counts_by_cgroup(p).values())
    c = p.read_counters(0)
    assert c.matched == 5000
    assert kept + c.sampled_out == 5000
    assert 350 < kept < 650  # 1 in 10, binomial sd ~21


def test_syscall_latency_histogram(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    spec = {"syscall": {"name": "getppid", "latency": True}, "output": {"kind": "histogram"}}
    p = load(loaded, assignment(spec))
    assert len(p.program_ids) == 2  # enter and exit
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(400))
    (h,) = p.read_histograms(0)
    assert sum(h.buckets.values()) == 400
    assert all(0 <= slot < 40 for slot in h.buckets)  # < 2**40 ns


def test_tracepoint_field_histogram(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    spec = {
        "tracepoint": "syscalls:sys_enter_read",
        "output": {"kind": "histogram", "value": "count"},
    }
    p = load(loaded, assignment(spec))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    code = (
        "import os\nfd = os.open('/dev/zero', os.O_RDONLY)\nfor _ in range(50): os.read(fd, 4096)"
    )
    run_in_cgroup(pods["pod-a/c1"], PY, "-S", "-c", code)
    (h,) = p.read_histograms(0)
    assert h.buckets.get(12, 0) >= 50  # 4096 = 2**12


def test_raw_tracepoint(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    p = load(loaded, assignment({"rawTracepoint": "sys_enter", "output": {"by": ["comm"]}}))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(1000))
    by_comm = {s.key.comm: s.value for s in p.read_counts(0)}
    assert by_comm.get("python3", 0) >= 1000  # every syscall, getppid among them


@pytest.mark.parametrize("ret", [False, True], ids=["uprobe", "uretprobe"])
def test_uprobe_on_libc(loaded: list[BccProgram], pods: dict[str, Path], ret: bool) -> None:
    p = load(loaded, assignment({"uprobe": {"binary": "c", "symbol": "getpid", "return": ret}}))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    code = "import ctypes\nlibc = ctypes.CDLL('libc.so.6')\nfor _ in range(250): libc.getpid()"
    run_in_cgroup(pods["pod-a/c1"], PY, "-S", "-c", code)
    run_in_cgroup(pods["pod-b/c1"], PY, "-S", "-c", code)
    assert counts_by_cgroup(p) == {cgroup_id(pods["pod-a/c1"]): 250}


def test_comm_filter_is_matched_in_kernel(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    targets = {**POD_TARGET, "processNames": ["cat"]}
    spec = {"tracepoint": "syscalls:sys_enter_openat", "output": {"by": ["comm"]}}
    p = load(loaded, assignment(spec, targets))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])}), comms=frozenset({"cat"})))
    run_in_cgroup(pods["pod-a/c1"], "cat", "/dev/null")
    run_in_cgroup(pods["pod-a/c1"], PY, "-S", "-c", "open('/dev/null').close()")
    by_comm = {s.key.comm: s.value for s in p.read_counts(0)}
    assert set(by_comm) == {"cat"}


def test_pid_filter_follows_children(loaded: list[BccProgram]) -> None:
    targets = {"pids": [1], "followChildren": True}
    spec = {"tracepoint": "syscalls:sys_enter_getppid", "output": {"by": ["pid"]}}
    p = load(loaded, assignment(spec, targets))
    # A shell that waits for a line, then forks a python3 that calls getppid.
    parent = subprocess.Popen(
        [
            "sh",
            "-c",
            f"read go; {PY} -S -c 'import os\nfor _ in range(77): os.getppid()'",
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        bind(p, FilterEntries(pids=frozenset({parent.pid})))
        assert parent.stdin is not None
        parent.stdin.write("go\n")
        parent.stdin.close()
        assert parent.wait(30) == 0
    finally:
        parent.kill()
    by_pid = {s.key.pid: s.value for s in p.read_counts(0)}
    children = {pid: n for pid, n in by_pid.items() if pid != parent.pid}
    assert list(children.values()) == [77]  # the shell itself may call getppid too


def test_kprobe_is_unsupported_here() -> None:
    with pytest.raises(LoadFailure) as exc:
        build_plan(assignment({"kprobe": {"function": "tcp_v4_connect"}}))
    assert exc.value.state == "Unsupported"
    assert "has no kprobes" in exc.value.message
    assert "CONFIG_KPROBES" in exc.value.message


@pytest.mark.parametrize(
    ("spec", "reason", "text"),
    [
        ({"tracepoint": "nosuch:event"}, "AttachFailed", "tracepoint nosuch:event does not exist"),
        ({"syscall": {"name": "nosuchcall"}}, "AttachFailed", "syscalls:sys_enter_nosuchcall"),
        ({"rawTracepoint": "no_such_rawtp"}, "AttachFailed", "raw tracepoint no_such_rawtp"),
        (
            {"uprobe": {"binary": "/usr/bin/no-such-binary", "symbol": "main"}},
            "AttachFailed",
            "no-such-binary",
        ),
        (
            {"uprobe": {"binary": "c", "symbol": "no_such_symbol_xyz"}},
            "AttachFailed",
            "symbol 'no_such_symbol_xyz' not found",
        ),
        (
            {
                "tracepoint": "syscalls:sys_enter_openat",
                "output": {"kind": "events", "fields": ["nope"]},
            },
            "InvalidSpec",
            "has no field 'nope'; its fields are: __syscall_nr, dfd, filename, flags, mode",
        ),
    ],
    ids=["tracepoint", "syscall", "raw-tracepoint", "binary", "symbol", "field"],
)
def test_bad_targets_fail_with_a_message_naming_them(
    spec: dict[str, Any], reason: str, text: str
) -> None:
    with pytest.raises(LoadFailure) as exc:
        build_plan(assignment(spec))
    assert exc.value.state == "Failed"
    assert exc.value.reason == reason
    assert text in exc.value.message


def test_compile_error_carries_the_compiler_text() -> None:
    a = ProbeAssignment.model_validate(
        {
            "id": "t/raw",
            "specHash": "0" * 16,
            "spec": {"program": {"source": "int broken( { return 0; }"}},
            "allowProgram": True,
        }
    )
    with pytest.raises(LoadFailure) as exc:
        kernel_loader().load(build_plan(a))
    assert exc.value.reason == "CompileFailed"
    assert "error: expected" in exc.value.message


def test_raw_program_uses_the_filter_macros(
    loaded: list[BccProgram], pods: dict[str, Path]
) -> None:
    source = (
        "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {\n"
        "    if (!TK_FILTER())\n        return 0;\n    TK_COUNT();\n    return 0;\n}\n"
    )
    a = ProbeAssignment.model_validate(
        {
            "id": "t/raw",
            "specHash": "0" * 16,
            "spec": {"program": {"source": source}},
            "targets": POD_TARGET,
            "allowProgram": True,
        }
    )
    p = load_alone(loaded, a)
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(33))
    run_in_cgroup(pods["pod-b/c1"], *getppid_loop(33))
    assert counts_by_cgroup(p) == {cgroup_id(pods["pod-a/c1"]): 33}


def test_empty_filter_matches_nothing(loaded: list[BccProgram], pods: dict[str, Path]) -> None:
    """No pod of the probe's namespace on this node: the program must trace nobody."""
    p = load(loaded, assignment({"tracepoint": "syscalls:sys_enter_getppid"}, {"pods": []}))
    run_in_cgroup(pods["pod-a/c1"], *getppid_loop(50))
    assert p.read_counts(0) == []
    assert p.read_counters(0).matched == 0
