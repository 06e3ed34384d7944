"""Kernel tier: real BPF programs on this machine's kernel, as root.

These tests fail (never skip) as root when something is wrong; they skip only when
not root, where BPF cannot load at all.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracekeeper_agent.bpf.loader import BccLoader, BccProgram
from tracekeeper_agent.ports import FilterEntries
from tracekeeper_agent.programs.builder import build_plan
from tracekeeper_agent.programs.kinds import BuildContext
from tracekeeper_agent.programs.sharing import binding_of, program_maps
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_api.protocol import ProbeAssignment
from tracekeeper_sim.kubelet import create_cgroup, remove_cgroup_tree


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tier: needs root to load BPF programs")


@pytest.fixture
def loaded() -> Iterator[list[BccProgram]]:
    """Programs a test loads, closed afterwards whatever happens."""
    programs: list[BccProgram] = []
    yield programs
    for p in programs:
        p.close()


@pytest.fixture
def cgroup_root() -> Path:
    return detect_root()


@pytest.fixture
def cgroup_sandbox(cgroup_root: Path) -> Iterator[Path]:
    """A fresh cgroup subtree of the v2 hierarchy, removed afterwards."""
    top = cgroup_root / f"tracekeeper-test-{uuid.uuid4().hex[:8]}"
    create_cgroup(top)
    try:
        yield top
    finally:
        remove_cgroup_tree(top, evacuate_to=cgroup_root)


def run_in_cgroup(
    cgroup: Path, *argv: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run argv with its process placed in `cgroup` before it execs, as a runtime does."""
    script = f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"'
    return subprocess.run(
        ["sh", "-c", script, "sh", *argv],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- one probe alone in a program (binding 0), as the reconciler would write it ----------------

_LOADER: BccLoader | None = None
_ASSIGNMENTS: dict[int, ProbeAssignment] = {}


def kernel_loader() -> BccLoader:
    """One loader (one identity table) for the tests that load programs directly."""
    global _LOADER
    if _LOADER is None:
        _LOADER = BccLoader()
    return _LOADER


def load_alone(
    programs: list[BccProgram], assignment: ProbeAssignment, ctx: BuildContext | None = None
) -> BccProgram:
    """The program of the assignment's shape, loaded for it alone; closed after the test.
    Binaries resolve in the host's root, or in `ctx`'s roots."""
    p = kernel_loader().load(build_plan(assignment, ctx))
    programs.append(p)
    _ASSIGNMENTS[id(p)] = assignment
    return p


def bind(p: BccProgram, entries: FilterEntries) -> None:
    """Make `entries` the targets of binding 0 (with its probe's sampling, rate limit and
    followChildren): identity table, then the program's maps."""
    identities = kernel_loader().identities
    slots = {cgid: slot for slot, cgid in enumerate(sorted(entries.cgroups), start=1)}
    identities.sync(slots)
    binding = binding_of(0, _ASSIGNMENTS[id(p)], entries)
    p.update_maps(program_maps([binding], slots))
