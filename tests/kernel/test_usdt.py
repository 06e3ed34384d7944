"""USDT probes for real: a C program with sys/sdt.h probes, built by gcc here, traced in a
cgroup the test makes; counts equal the times each probe site ran, events carry the
arguments, a semaphore-gated site runs only while the probe is attached."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kernel.conftest import bind, load_alone, run_in_cgroup
from tracekeeper_agent.bpf.loader import BccProgram
from tracekeeper_agent.host.rootfs import open_process_root
from tracekeeper_agent.ports import FilterEntries, LoadFailure, TargetRoot
from tracekeeper_agent.programs.builder import build_plan, node_kernel
from tracekeeper_agent.programs.kinds import BuildContext
from tracekeeper_agent.targets.cgroups import cgroup_id
from tracekeeper_api.protocol import ProbeAssignment
from tracekeeper_sim.kubelet import create_cgroup

pytestmark = pytest.mark.kernel

EXAMPLES = Path(__file__).parents[2] / "examples"

POD_TARGET = {
    "pods": [{"uid": "00000000-0000-0000-0000-000000000001", "namespace": "t", "name": "p"}]
}

MAIN_C = r"""
#include <sys/sdt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
long gated(int i);
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    char line[8];
    if (argc > 2 && !fgets(line, sizeof line, stdin)) return 1; /* wait for "go" */
    long enabled = 0;
    for (int i = 0; i < n; i++) {
        long big = (i % 2 ? -1L : 1L) * (long)i * 1000000007L;
        int neg = -i;
        DTRACE_PROBE2(tk_test, tick, i, big);
        DTRACE_PROBE3(tk_test, mixed, neg, (uint8_t)(200 + i), (int16_t)-3);
        enabled += gated(i);
    }
    printf("%ld\n", enabled);
    return 0;
}
"""

# A probe with a semaphore, as dtrace -h headers make them: its site runs only while the
# semaphore is non-zero, that is while someone has it attached.
GATED_C = r"""
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
unsigned short tk_test_gated_semaphore __attribute__((section(".probes")));
long gated(int i) {
    if (!tk_test_gated_semaphore) return 0;
    DTRACE_PROBE1(tk_test, gated, i);
    return 1;
}
"""


def build(directory: Path, *flags: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "main.c").write_text(MAIN_C)
    (directory / "gated.c").write_text(GATED_C)
    out = directory / "tk-sdt"
    subprocess.run(
        ["gcc", *flags, "-o", str(out), str(directory / "main.c"), str(directory / "gated.c")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="module", params=["-O2", "-O0"], ids=["registers", "memory"])
def sdt_binary(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PIE built at -O2 (arguments in registers) and at -O0 (in the stack frame)."""
    return build(tmp_path_factory.mktemp("sdt"), str(request.param))


@pytest.fixture
def pods(cgroup_sandbox: Path) -> dict[str, Path]:
    layout = {}
    for pod in ("pod-a", "pod-b"):
        layout[pod] = cgroup_sandbox / pod
        layout[f"{pod}/c1"] = cgroup_sandbox / pod / "c1"
        create_cgroup(layout[f"{pod}/c1"])
    return layout


def assignment(spec: dict[str, Any]) -> ProbeAssignment:
    return ProbeAssignment.model_validate(
        {"id": "t/usdt", "specHash": "0" * 16, "spec": spec, "targets": POD_TARGET}
    )


def usdt(binary: Path | str, name: str, **output: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"usdt": {"binary": str(binary), "provider": "tk_test", "name": name}}
    if output:
        spec["output"] = output
    return spec


def counts_by_cgroup(p: BccProgram) -> dict[int | None, int]:
    return {s.key.cgroup_id: s.value for s in p.read_counts(0)}


def test_count_equals_the_times_the_site_ran(
    loaded: list[BccProgram], pods: dict[str, Path], sdt_binary: Path
) -> None:
    p = load_alone(loaded, assignment(usdt(sdt_binary, "tick")))
    assert [a.kind for a in p.plan.attachments] == ["usdt"]
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    run_in_cgroup(pods["pod-a/c1"], str(sdt_binary), "37")
    run_in_cgroup(pods["pod-b/c1"], str(sdt_binary), "11")  # not targeted
    assert counts_by_cgroup(p) == {cgroup_id(pods["pod-a/c1"]): 37}
    assert p.read_counters(0).matched == 37


def test_events_carry_the_arguments(
    loaded: list[BccProgram], pods: dict[str, Path], sdt_binary: Path
) -> None:
    tick = load_alone(loaded, assignment(usdt(sdt_binary, "tick", kind="events")))
    mixed = load_alone(loaded, assignment(usdt(sdt_binary, "mixed", kind="events")))
    for p in (tick, mixed):
        bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    run_in_cgroup(pods["pod-a/c1"], str(sdt_binary), "20")

    got = [(e.fields["arg0"], e.fields["arg1"]) for e in tick.poll_events(500)]
    assert got == [(i, (-1 if i % 2 else 1) * i * 1000000007) for i in range(20)]
    assert [f.kind for f in tick.plan.event_fields] == ["int", "int"]  # -4@, -8@: signed
    got3 = [tuple(e.fields[f"arg{k}"] for k in range(3)) for e in mixed.poll_events(500)]
    assert got3 == [(-i, (200 + i) & 0xFF, -3) for i in range(20)]  # s32, u8, constant s16
    assert {e.comm for e in tick.poll_events(0)} <= {"tk-sdt"}


def test_a_semaphore_is_raised_while_attached(
    loaded: list[BccProgram], pods: dict[str, Path], sdt_binary: Path
) -> None:
    before = run_in_cgroup(pods["pod-a/c1"], str(sdt_binary), "25")
    assert before.stdout.strip() == "0"  # nobody listens: the gated site never runs

    p = load_alone(loaded, assignment(usdt(sdt_binary, "gated")))
    (site,) = p.plan.attachments
    assert site.ref_ctr_offset > 0
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    during = run_in_cgroup(pods["pod-a/c1"], str(sdt_binary), "25")
    assert during.stdout.strip() == "25"
    assert counts_by_cgroup(p) == {cgroup_id(pods["pod-a/c1"]): 25}

    p.close()
    loaded.remove(p)
    after = run_in_cgroup(pods["pod-a/c1"], str(sdt_binary), "25")
    assert after.stdout.strip() == "0"  # detached: the kernel lowered it again


@pytest.fixture
def chrooted(tmp_path: Path, pods: dict[str, Path]) -> Iterator[subprocess.Popen[str]]:
    """A static tk-sdt at /app/tk-sdt of a root of its own (nowhere on the host at that
    path), running chrooted in pod-a/c1 and waiting for a line before it loops 42 times."""
    root = tmp_path / "root"
    build(root / "app", "-O2", "-static")
    script = f'echo $$ > "{pods["pod-a/c1"]}/cgroup.procs" && exec chroot "{root}" /app/tk-sdt 42 w'
    proc = subprocess.Popen(
        ["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def wait_for_root(pid: int, directory: Path) -> int:
    """The workload's root once it is chrooted. The binary is looked up through the fd
    itself: a root opened just before `exec chroot` is the host's, while the process's
    /proc root may already be the new one (the test flaked on that)."""
    for _ in range(200):
        fd = open_process_root(pid, directory)
        if fd is not None:
            try:
                os.stat("app/tk-sdt", dir_fd=fd)
                return fd
            except FileNotFoundError:
                os.close(fd)
        subprocess.run(["sleep", "0.01"], check=True)
    raise AssertionError("the chrooted workload did not start")


def test_binary_resolves_in_the_target_containers_root(
    loaded: list[BccProgram], pods: dict[str, Path], chrooted: subprocess.Popen[str]
) -> None:
    assert not Path("/app/tk-sdt").exists()
    fd = wait_for_root(chrooted.pid, pods["pod-a/c1"])
    try:
        ctx = BuildContext(kernel=node_kernel(), roots=(TargetRoot(fd, "pod-a/c1"),))
        p = load_alone(loaded, assignment(usdt("/app/tk-sdt", "gated")), ctx)
    finally:
        os.close(fd)
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))
    # Attached after the process mapped the file: the kernel raises the semaphore there too.
    out, _ = chrooted.communicate("go\n", timeout=30)
    assert out.strip() == "42"
    assert counts_by_cgroup(p) == {cgroup_id(pods["pod-a/c1"]): 42}


def test_a_missing_probe_fails_naming_it_and_the_probes_there(sdt_binary: Path) -> None:
    with pytest.raises(LoadFailure) as exc:
        build_plan(assignment(usdt(sdt_binary, "no_such_probe")))
    assert exc.value.state == "Failed"
    assert exc.value.reason == "AttachFailed"
    assert exc.value.message == (
        f"USDT probe tk_test:no_such_probe not found in {sdt_binary}; "
        "its probes are: tk_test:gated, tk_test:mixed, tk_test:tick"
    )


def test_a_binary_without_notes_says_so() -> None:
    with pytest.raises(LoadFailure) as exc:
        build_plan(assignment(usdt("/usr/bin/env", "tick")))
    assert exc.value.state == "Failed"
    assert "/usr/bin/env has no USDT probes" in exc.value.message


def test_the_examples_python_probe_counts_each_collection(
    loaded: list[BccProgram], pods: dict[str, Path]
) -> None:
    """examples/usdt-python-gc.yaml on Debian's python3, whose probes have semaphores (the
    interpreter reports only while someone listens); its argument, the generation, is read
    from the interpreter's stack (`-4@112(%rsp)` in Debian's build)."""
    doc = yaml.safe_load((EXAMPLES / "usdt-python-gc.yaml").read_text())
    p = load_alone(loaded, assignment({**doc["spec"], "output": {"kind": "events"}}))
    bind(p, FilterEntries(cgroups=frozenset({cgroup_id(pods["pod-a"])})))

    def generations(n: int) -> list[int | str]:
        code = f"import gc\nfor _ in range({n}): gc.collect(2)"
        run_in_cgroup(pods["pod-a/c1"], "/usr/bin/python3", "-S", "-E", "-c", code)
        return [e.fields["arg0"] for e in p.poll_events(500)]

    startup = generations(0)
    assert set(startup) <= {0, 1, 2}
    assert sorted(generations(40)) == sorted([*startup, *[2] * 40])
