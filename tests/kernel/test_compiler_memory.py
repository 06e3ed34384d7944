"""The compiler's memory handed back between compiles, on this kernel (MADV_PAGEOUT)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kernel.test_probe_kinds import assignment, load
from tracekeeper_agent.bpf.compiler_memory import (
    COMPILER_LIBRARIES,
    release_compiler_memory,
)
from tracekeeper_agent.bpf.loader import BccProgram

pytestmark = pytest.mark.kernel


def compiler_resident_kib() -> int:
    """Resident KiB of the compiler libraries' mappings in this process (smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            fields = line.split(maxsplit=5)
            inside = len(fields) == 6 and Path(fields[5]).name.startswith(COMPILER_LIBRARIES)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_compile_pages_the_compiler_in_and_a_release_hands_it_back(
    loaded: list[BccProgram],
) -> None:
    load(loaded, assignment({"tracepoint": "syscalls:sys_enter_getppid"}))
    after_compile = compiler_resident_kib()
    released = release_compiler_memory()
    after_release = compiler_resident_kib()
    assert after_compile > 20 * 1024, "a compile runs LLVM: its pages are resident"
    assert released.failed == 0 and released.mapped_bytes > 0
    assert after_release < after_compile / 4, (after_compile, after_release)
    # Nothing was lost: the next compile faults back what it needs and loads.
    program = load(loaded, assignment({"tracepoint": "syscalls:sys_enter_getpid"}))
    assert program.program_ids
