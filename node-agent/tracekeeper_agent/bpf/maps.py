"""Map synchronisation: make a BPF hash map hold exactly the desired entries with inserts
and deletes only (batched where the kernel supports it)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping
from typing import Any

_SIMPLE = (ctypes.c_int, ctypes.c_uint, ctypes.c_ulonglong)
"""Key types whose ctypes arrays take python ints as they are (no object per key)."""


def write_diff(
    table: Any,
    written: Mapping[Any, int],
    desired: Mapping[Any, int],
    *,
    key_of: Callable[[Any], Any],
    missing_ok: bool = False,
) -> tuple[int, int]:
    """Bring a map that only the agent writes from `written` (what it holds) to `desired`,
    without reading it back. Returns (upserts, deletes). `missing_ok`: an entry to delete
    may be gone already (the kernel deletes too)."""
    stale = [key_of(k) for k in written if k not in desired]
    changes = {k: v for k, v in desired.items() if written.get(k) != v}
    if stale:
        _delete(table, stale, missing_ok=missing_ok)
    if changes:
        _update(table, changes, key_of)
    return len(changes), len(stale)


def write_values(table: Any, changes: Mapping[Any, int], *, key_of: Callable[[Any], Any]) -> None:
    """Write these entries (an array map's: there is nothing to delete, only values to
    set, 0 included), batched where the kernel supports it."""
    if changes:
        _update(table, changes, key_of)


def _update(table: Any, changes: Mapping[Any, int], key_of: Callable[[Any], Any]) -> None:
    n = len(changes)
    raw = key_of in _SIMPLE
    keys = (table.Key * n)(*(changes if raw else (key_of(k) for k in changes)))
    values = (table.Leaf * n)(*changes.values())
    try:
        table.items_update_batch(keys, values)
    except Exception:  # batch ops need kernel >= 5.6 for this map type: fall back
        for k, v in changes.items():
            table[key_of(k)] = table.Leaf(v)


def _delete(table: Any, stale: list[Any], *, missing_ok: bool = False) -> None:
    keys = (table.Key * len(stale))(*stale)
    try:
        table.items_delete_batch(keys)
    except Exception:  # unsupported, or a key was missing (the batch stops there): one by one
        for k in stale:
            try:
                del table[k]
            except KeyError:
                if not missing_ok:
                    raise
