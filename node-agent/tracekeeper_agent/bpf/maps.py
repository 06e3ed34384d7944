"""Filter map synchronisation: make a BPF hash map hold exactly the desired entries
with inserts and deletes only (batched where the kernel supports it)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from typing import Any

# Values with this bit were added by the kernel (children of traced PIDs): keep them.
KERNEL_OWNED = 0x80000000


def sync_table(
    table: Any,
    desired: Mapping[Any, int],
    *,
    key_of: Callable[[Any], Any],
    keep: Callable[[int], bool] = lambda _v: False,
) -> tuple[int, int]:
    """Bring `table` to `desired` (python key -> u32 value). Returns (upserts, deletes).

    `key_of` turns a python key into the table's ctypes key; existing entries are
    compared by their python form, read back from the ctypes key with `.value`
    (or the key itself for structs, through `key_of` of the decoded form)."""
    current: dict[bytes, int] = {}
    ctypes_keys: dict[bytes, Any] = {}
    for k, v in table.items():
        raw = bytes(k)
        current[raw] = int(v.value)
        ctypes_keys[raw] = k
    wanted: dict[bytes, tuple[Any, int]] = {}
    for key, value in desired.items():
        ck = key_of(key)
        wanted[bytes(ck)] = (ck, value)
    stale = [ctypes_keys[raw] for raw, v in current.items() if raw not in wanted and not keep(v)]
    changes = [(ck, v) for raw, (ck, v) in wanted.items() if current.get(raw) != v]
    if stale:
        _delete(table, stale)
    if changes:
        _update(table, changes)
    return len(changes), len(stale)


def _update(table: Any, changes: list[tuple[Any, int]]) -> None:
    keys = (table.Key * len(changes))(*(k for k, _ in changes))
    values = (table.Leaf * len(changes))(*(table.Leaf(v) for _, v in changes))
    try:
        table.items_update_batch(keys, values)
    except Exception:  # batch ops need kernel >= 5.6 for this map type: fall back
        for k, v in changes:
            table[k] = table.Leaf(v)


def _delete(table: Any, stale: list[Any]) -> None:
    keys = (table.Key * len(stale))(*stale)
    try:
        table.items_delete_batch(keys)
    except Exception:
        for k in stale:
            del table[k]


def bump_generation(table: Any) -> None:
    """Invalidate the in-kernel verdict cache after a filter change."""
    zero = ctypes.c_int(0)
    table[zero] = table.Leaf(table[zero].value + 1)
