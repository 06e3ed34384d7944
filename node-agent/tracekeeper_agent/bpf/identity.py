"""The node-wide identity table: cgroup id -> pod slot, one pinned BPF map that every
program of the agent declares (BPF_TABLE_PINNED in c_prelude.h) and reads.

The agent creates it before the first program loads (an object holding only the map) and
writes it; programs find it at its bpffs path. A table left pinned by a previous agent is
removed first: the agent writes it again from its own state.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bcc import BPF

from tracekeeper_agent.bpf.maps import write_diff
from tracekeeper_agent.programs.constants import MAX_IDENTITIES

PIN_ROOT = Path("/sys/fs/bpf/tracekeeper")
_serial = itertools.count()


def default_pin() -> Path:
    """A path of this loader alone (tests, standalone runs): several loaders of one
    process, or several agents of one machine, never share a table by accident."""
    return PIN_ROOT / f"{os.getpid()}-{next(_serial)}" / "identity"


class PinnedIdentities:
    """Implements ports.IdentityMap over the pinned map."""

    def __init__(self, pin: Path) -> None:
        self.pin = pin
        pin.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            pin.unlink()
        text = f'BPF_TABLE_PINNED("hash", u64, u32, tk_identity, {MAX_IDENTITIES}, "{pin}");'
        self._bpf: Any = BPF(text=text.encode())
        self._inode = os.stat(pin).st_ino
        atexit.register(self.close)
        self._table = self._bpf[b"tk_identity"]
        self._written: dict[int, int] = {}

    def sync(self, table: Mapping[int, int]) -> None:
        write_diff(self._table, self._written, table, key_of=ctypes.c_ulonglong)
        self._written = dict(table)

    def close(self) -> None:
        """Unpin, if the pin is still ours (programs still loaded keep the map until they
        close; a later agent of the node may have pinned its own there)."""
        atexit.unregister(self.close)
        with contextlib.suppress(OSError):
            if os.stat(self.pin).st_ino == self._inode:
                self.pin.unlink()
                self.pin.parent.rmdir()
        self._bpf.cleanup()
