"""The cgroup claims program (cgroup_claims.c): its C text and the pending table's key, which
Python and the kernel compute alike. Pure: no kernel access."""

from __future__ import annotations

import os
from pathlib import Path

from tracekeeper_agent.programs.constants import FNV_OFFSET, FNV_PRIME, MAX_CGROUP_PATH, c_defines

SOURCE = (Path(__file__).parent / "cgroup_claims.c").read_text()
_U64 = (1 << 64) - 1


def claims_source() -> str:
    """The program's C text (the identity table's pin path is the loader's -D flag)."""
    return c_defines() + SOURCE


def path_bytes(path: str) -> bytes:
    """A path as the kernel's cgroup tracepoints carry it (kernfs names are bytes)."""
    return os.fsencode(path)


def claimable(path: str) -> bool:
    """Whether the program can match this path (it reads at most MAX_CGROUP_PATH bytes)."""
    return 0 < len(path_bytes(path)) <= MAX_CGROUP_PATH


def path_key(path: str) -> int:
    """FNV-1a 64 of the path's bytes: tk_pending's key (the loop in cgroup_claims.c)."""
    h = FNV_OFFSET
    for byte in path_bytes(path):
        h = ((h ^ byte) * FNV_PRIME) & _U64
    return h
