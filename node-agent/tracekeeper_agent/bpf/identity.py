"""The node-wide identity table: cgroup id -> pod slot, one pinned BPF map that every
program of the agent declares (BPF_TABLE_PINNED in c_prelude.h) and reads; and the cgroup
claims program (programs/cgroup_claims.c) that adds to it at mkdir from the pending table.

The agent loads the claims program before the first probe program (it creates and pins the
table) and writes both tables; probe programs find the identity table at its bpffs path. A
table left pinned by a previous agent is removed first: the agent writes it again from its
own state and the cgroup tree. One claims program per identity table, so one per node
however many probes run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from bcc import BPF

from tracekeeper_agent.bpf.maps import write_diff
from tracekeeper_agent.host.bpf_ids import prog_id
from tracekeeper_agent.host.bpffs import PIN_ROOT
from tracekeeper_agent.ports import ClaimCounters
from tracekeeper_agent.programs.claims import claimable, claims_source, path_bytes, path_key
from tracekeeper_agent.programs.constants import MAX_PENDING_PATHS, ClaimCounter

_HOOKS = ("cgroup_mkdir", "cgroup_rmdir")
_serial = itertools.count()


def default_pin() -> Path:
    """A path of this loader alone (tests, standalone runs): several loaders of one
    process, or several agents of one machine, never share a table by accident."""
    return PIN_ROOT / f"{os.getpid()}-{next(_serial)}" / "identity"


class PinnedIdentities:
    """Implements ports.IdentityMap over the pinned map and the claims program."""

    def __init__(self, pin: Path, *, keep: bool = False) -> None:
        """`keep`: use a table left pinned there (programs adopted from a previous agent
        read it), emptied; otherwise a new one replaces it."""
        self.pin = pin
        pin.parent.mkdir(parents=True, exist_ok=True)
        kept = keep and pin.exists()
        if not kept:
            with contextlib.suppress(FileNotFoundError):
                pin.unlink()
        cflags = ["-Wno-macro-redefined", f'-DTK_IDENTITY_PIN="{pin}"']
        try:
            self._bpf: Any = BPF(text=claims_source().encode(), cflags=cflags)
        except Exception:
            # The table is pinned as the object is built: a failed load must not leave it.
            if not kept:
                with contextlib.suppress(OSError):
                    pin.unlink()
                    pin.parent.rmdir()
            raise
        self._inode = os.stat(pin).st_ino
        atexit.register(self.close)
        self._table = self._bpf[b"tk_identity"]
        self._pending = self._bpf[b"tk_pending"]
        self._written: dict[int, int] = {}
        self._pending_written: dict[str, int] = {}
        funcs = self._bpf.funcs
        self._program_ids = tuple(
            prog_id(funcs[f"tracepoint__cgroup__{t}".encode()].fd) for t in _HOOKS
        )
        if kept:  # the previous agent's slots: this one numbers pods anew
            stale = [ctypes.c_ulonglong(k) for k in self.kernel_entries()]
            for key in stale:
                with contextlib.suppress(KeyError):
                    del self._table[key]

    @property
    def map_fd(self) -> int:
        return int(self._table.map_fd)

    @property
    def program_ids(self) -> tuple[int, ...]:
        """The claims program's BPF ids, cgroup_mkdir's then cgroup_rmdir's (bpftool prog
        show id N)."""
        return self._program_ids

    def sync(self, table: Mapping[int, int]) -> None:
        # An entry the agent wrote may be gone already: cgroup_rmdir deleted it.
        write_diff(self._table, self._written, table, key_of=ctypes.c_ulonglong, missing_ok=True)
        self._written = dict(table)

    def sync_pending(self, paths: Mapping[str, int]) -> None:
        if len(paths) > MAX_PENDING_PATHS:
            raise ValueError(f"{len(paths)} pending paths: the table holds {MAX_PENDING_PATHS}")
        old, table = self._pending_written, self._pending
        for path in old.keys() - paths.keys():
            with contextlib.suppress(KeyError):
                del table[ctypes.c_ulonglong(path_key(path))]
        for path, slot in paths.items():
            if old.get(path) == slot:
                continue
            if not claimable(path):
                raise ValueError(f"pending path {path!r} is longer than the program reads")
            raw = path_bytes(path)
            table[ctypes.c_ulonglong(path_key(path))] = table.Leaf(slot, len(raw), raw)
        self._pending_written = dict(paths)

    def release(self, slots: Collection[int]) -> None:
        freed = set(slots)
        stale = [
            key
            for key, slot in self.kernel_entries().items()
            if slot in freed and self._written.get(key) != slot
        ]
        for key in stale:
            with contextlib.suppress(KeyError):  # removed at rmdir meanwhile
                del self._table[ctypes.c_ulonglong(key)]

    def held(self, keys: Collection[int]) -> frozenset[int]:
        table = self._table
        return frozenset(k for k in keys if table.get(ctypes.c_ulonglong(k)) is not None)

    def kernel_entries(self) -> dict[int, int]:
        """The table as the kernel holds it now (the agent's entries and the claims)."""
        try:
            pairs = list(self._table.items_lookup_batch())
        except Exception:  # batch ops need kernel >= 5.6 for hash maps: one by one
            pairs = list(self._table.items())
        return {_int(k): _int(v) for k, v in pairs}

    def pending_paths(self) -> dict[int, tuple[int, bytes]]:
        """The pending table as the kernel holds it: key -> (slot, path)."""
        return {
            int(k.value): (int(v.slot), bytes(v.path[: v.len])) for k, v in self._pending.items()
        }

    def claim_counters(self) -> ClaimCounters:
        per_cpu = self._bpf[b"tk_claim_counters"]
        sums = {c: sum(int(x) for x in per_cpu[ctypes.c_int(c)]) for c in ClaimCounter}
        return ClaimCounters(
            mkdirs=sums[ClaimCounter.MKDIRS],
            claimed=sums[ClaimCounter.CLAIMED],
            identity_full=sums[ClaimCounter.IDENTITY_FULL],
            removed=sums[ClaimCounter.REMOVED],
        )

    def close(self) -> None:
        """Detach the claims program and unpin, if the pin is still ours (programs still
        loaded keep the map until they close; a later agent of the node may have pinned its
        own there)."""
        atexit.unregister(self.close)
        with contextlib.suppress(OSError):
            if os.stat(self.pin).st_ino == self._inode:
                self.pin.unlink()
                self.pin.parent.rmdir()
        self._bpf.cleanup()


def _int(value: Any) -> int:
    """A key or value as BCC hands it back: a ctypes scalar, or an int (batch lookups)."""
    return int(getattr(value, "value", value))
