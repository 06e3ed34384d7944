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

from tracekeeper_agent.bpf.loader import BccProgram
from tracekeeper_agent.targets.cgroups import detect_root
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
