"""A BPF map read and written by its fd, with ctypes key and value types: the part of BCC's
table API the agent uses (bpf/loader.py), for maps no BCC module describes (an adopted
program's, opened from their pins). The calls are libbcc's bpf(2) wrappers."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bcc.libbcc import lib
from bcc.utils import get_possible_cpus

from tracekeeper_agent.programs.map_layouts import Layout

_BPF_ANY = 0


@functools.cache
def possible_cpus() -> int:
    """Per-CPU maps hold a value per possible CPU (not only the online ones)."""
    return len(get_possible_cpus())


def map_info(fd: int) -> dict[str, int]:
    """map_type, key_size, value_size, max_entries, map_id, ... (/proc/self/fdinfo)."""
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+)$", text, re.MULTILINE)}


_ARRAYS = {2, 6}  # BPF_MAP_TYPE_ARRAY, _PERCPU_ARRAY
_PER_CPU = {5, 6, 10}  # BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH


def raw_layout(fd: int) -> Layout:
    """Bytes of the map's own sizes: for a map the agent only clears."""
    info = map_info(fd)
    kind = info["map_type"]
    return Layout(
        ctypes.c_ubyte * info["key_size"],
        ctypes.c_ubyte * info["value_size"],
        per_cpu=kind in _PER_CPU,
        array=kind in _ARRAYS,
    )


class LayoutMismatch(ValueError):
    """The pinned map is not laid out as this agent's types say (another version's)."""


class FdMap:
    """Implements what BccProgram uses of bcc.table's tables. Owns its fd."""

    def __init__(self, fd: int, layout: Layout, name: str) -> None:
        self.map_fd = fd
        self.name = name
        self.Key: Any = layout.key
        self._one: Any = layout.value
        self.Leaf: Any = layout.value * possible_cpus() if layout.per_cpu else layout.value
        self.array = layout.array
        info = map_info(fd)
        value_size = ctypes.sizeof(layout.value)
        if (info.get("key_size"), info.get("value_size")) != (ctypes.sizeof(self.Key), value_size):
            raise LayoutMismatch(
                f"map {name}: key/value {info.get('key_size')}/{info.get('value_size')} bytes, "
                f"this agent's {ctypes.sizeof(self.Key)}/{value_size}"
            )
        self.max_entries = info["max_entries"]

    def get(self, key: Any) -> Any:
        leaf = self.Leaf()
        if lib.bpf_lookup_elem(self.map_fd, ctypes.byref(key), ctypes.byref(leaf)) < 0:
            return None
        return leaf

    def __getitem__(self, key: Any) -> Any:
        leaf = self.get(key)
        if leaf is None:
            raise KeyError(key)
        return leaf

    def __setitem__(self, key: Any, leaf: Any) -> None:
        if lib.bpf_update_elem(self.map_fd, ctypes.byref(key), ctypes.byref(leaf), _BPF_ANY) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"updating map {self.name}: {os.strerror(err)}")

    def __delitem__(self, key: Any) -> None:
        if lib.bpf_delete_elem(self.map_fd, ctypes.byref(key)) < 0:
            raise KeyError(key)

    def keys(self) -> list[Any]:
        """Every key now (collected first: deleting while walking restarts the walk)."""
        found: list[Any] = []
        prev: Any = None
        while True:
            nxt = self.Key()
            start = ctypes.byref(prev) if prev is not None else None
            if lib.bpf_get_next_key(self.map_fd, start, ctypes.byref(nxt)) < 0:
                return found
            found.append(nxt)
            prev = nxt

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def items(self) -> list[tuple[Any, Any]]:
        pairs = ((k, self.get(k)) for k in self.keys())
        return [(k, v) for k, v in pairs if v is not None]

    def items_update_batch(self, keys: Any, values: Any) -> None:
        count = ctypes.c_uint32(len(keys))
        if lib.bpf_update_batch(self.map_fd, ctypes.byref(keys), ctypes.byref(values),
                                ctypes.byref(count)) < 0:  # fmt: skip
            raise OSError(ctypes.get_errno(), f"batch update of map {self.name}")

    def items_delete_batch(self, keys: Any) -> None:
        count = ctypes.c_uint32(len(keys))
        if lib.bpf_delete_batch(self.map_fd, ctypes.byref(keys), ctypes.byref(count)) < 0:
            raise OSError(ctypes.get_errno(), f"batch delete of map {self.name}")

    def clear(self) -> None:
        """Empty it: an array's entries zeroed (one batch), a hash's keys deleted."""
        if self.array:
            n = self.max_entries
            keys = (ctypes.c_uint * n)(*range(n))  # an array's key is its u32 index
            self.items_update_batch(keys, (self.Leaf * n)())
            return
        found = self.keys()
        if not found:
            return
        try:
            self.items_delete_batch((self.Key * len(found))(*found))
        except OSError:  # a key the kernel evicted meanwhile stops the batch: one by one
            for key in found:
                with contextlib.suppress(KeyError):
                    del self[key]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.map_fd)
