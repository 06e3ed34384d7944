"""Programs pinned across agent restarts (bpf/pinned_programs.py), on this kernel: a
SIGKILLed loader's programs stay attached; the next loader adopts them for plans of the
same source (same program ids, no compile, maps reset), compiles the others, detaches the
leftovers nobody took, and leaves nothing behind when closed cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracekeeper_agent.bpf.loader import BccLoader, BccProgram
from tracekeeper_agent.host.bpffs import PIN_ROOT
from tracekeeper_agent.ports import BindingConfig, ProgramMaps
from tracekeeper_agent.programs.builder import build_plan
from tracekeeper_agent.programs.constants import Flag
from tracekeeper_api.protocol import ProbeAssignment
from tracekeeper_sim.world import wait_bpf_gone

pytestmark = pytest.mark.kernel

SPECS = {
    "getppid": {"syscall": {"name": "getppid"}, "output": {"kind": "count", "by": ["pid"]}},
    "getpgrp": {"syscall": {"name": "getpgrp"}, "output": {"kind": "count", "by": ["pid"]}},
    "getuid": {"syscall": {"name": "getuid"}, "output": {"kind": "events"}},
    "getpid": {"syscall": {"name": "getpid"}, "output": {"kind": "count"}},
}

# The previous agent: loads two shapes pinned, traces its own pid, prints the ids, waits.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from tracekeeper_agent.bpf.loader import BccLoader
    from tracekeeper_agent.ports import BindingConfig, ProgramMaps
    from tracekeeper_agent.programs.builder import build_plan
    from tracekeeper_agent.programs.constants import Flag
    from tracekeeper_api.protocol import ProbeAssignment
    root, specs = Path(sys.argv[1]), json.loads(sys.argv[2])
    loader = BccLoader(root / "identity", programs_pin=root / "programs")
    ids = {}
    for name, spec in specs.items():
        a = ProbeAssignment.model_validate(
            {"id": f"t/{name}", "specHash": "0" * 16, "spec": spec,
             "targets": {"pids": [os.getpid()]}})
        p = loader.load(build_plan(a))
        p.update_maps(ProgramMaps(pids={os.getpid(): 1}, no_comm_mask=1, flags=Flag.PID,
                                  bindings={0: BindingConfig()}))
        ids[name] = list(p.program_ids)
    for _ in range(3):  # records left unread in the events program's ring
        os.getuid()
    print(json.dumps(ids), flush=True)
    time.sleep(600)
    """
)


def assignment(name: str) -> ProbeAssignment:
    return ProbeAssignment.model_validate(
        {
            "id": f"t/{name}",
            "specHash": "0" * 16,
            "spec": SPECS[name],
            "targets": {"pids": [os.getpid()]},
        }
    )


def trace_me(p: BccProgram) -> None:
    p.update_maps(
        ProgramMaps(
            pids={os.getpid(): 1}, no_comm_mask=1, flags=Flag.PID, bindings={0: BindingConfig()}
        )
    )


def calls(p: BccProgram) -> int:
    return p.read_counters(0).matched


@pytest.fixture
def pin_root() -> Iterator[Path]:
    root = PIN_ROOT / f"test-{uuid.uuid4().hex[:8]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)  # unlinking pins detaches what a failure left


def killed_agent(root: Path, names: list[str]) -> dict[str, set[int]]:
    """Run the previous agent, SIGKILL it once loaded: its program ids by shape."""
    specs = json.dumps({n: SPECS[n] for n in names})
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), specs],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the first loader exited before loading"
        ids = {name: set(v) for name, v in json.loads(line).items()}
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return ids


def test_a_killed_loaders_programs_are_adopted_and_the_rest_detached(pin_root: Path) -> None:
    before = killed_agent(pin_root, ["getppid", "getpgrp", "getuid"])
    # Killed: its programs are still loaded and attached (the pins hold the links).
    every = set().union(*before.values())
    assert wait_bpf_gone(every, set(), 0) == {f"prog {i}" for i in every}
    loader = BccLoader(pin_root / "identity", programs_pin=pin_root / "programs")
    programs: list[BccProgram] = []
    try:
        same = loader.load(build_plan(assignment("getppid")))
        programs.append(same)
        assert same.adopted and loader.adopted == 1
        assert set(same.program_ids) == before["getppid"], "not the pinned program"
        assert calls(same) == 0, "the previous agent's counts were not reset"
        os.getppid()
        assert calls(same) == 0, "a binding the previous agent wrote still counts"
        trace_me(same)
        for _ in range(5):
            os.getppid()
        assert calls(same) == 5

        events = loader.load(build_plan(assignment("getuid")))
        programs.append(events)
        assert events.adopted and set(events.program_ids) == before["getuid"]
        trace_me(events)
        for _ in range(2):
            os.getuid()
        # Only this agent's binding's records: the dead one's three were skipped.
        batch = events.poll_batch(500, 100)
        assert len(batch) == 2 and set(batch.records["pid"]) == {os.getpid()}

        other = loader.load(build_plan(assignment("getpid")))  # no leftover: compiled
        programs.append(other)
        assert not other.adopted and loader.adopted == 2

        # getpgrp's leftover was not taken: detached once the restore is over.
        assert loader.drop_leftovers() == 1
        assert not wait_bpf_gone(before["getpgrp"], set(), 10), "the leftover stayed loaded"
        assert {e.name.split("-")[0] for e in (pin_root / "programs").iterdir()} == {
            p.plan.source_hash for p in programs
        }
    finally:
        for p in programs:
            p.close()
        loader.close()
    # A clean close leaves nothing: no pin, no program.
    assert not (pin_root / "programs").exists()
    assert not (pin_root / "identity").exists()
    ids = {i for p in programs for i in p.program_ids}
    assert not wait_bpf_gone(ids, set(), 10), "closed programs stayed loaded"


def test_without_leftovers_the_identity_table_is_new(pin_root: Path) -> None:
    """Kept only for adoption: a table left pinned with no programs is replaced."""
    killed_agent(pin_root, ["getppid"])
    shutil.rmtree(pin_root / "programs")  # its programs detach; the table stays pinned
    old = os.stat(pin_root / "identity").st_ino
    loader = BccLoader(pin_root / "identity", programs_pin=pin_root / "programs")
    try:
        assert os.stat(pin_root / "identity").st_ino != old
    finally:
        loader.close()
