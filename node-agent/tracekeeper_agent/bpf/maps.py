"""Map synchronisation: make a BPF hash map hold exactly the desired entries with inserts
and deletes only (batched where the kernel supports it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def write_diff(
    table: Any,
    written: Mapping[Any, int],
    desired: Mapping[Any, int],
    *,
    key_of: Callable[[Any], Any],
) -> tuple[int, int]:
    """Bring a map that only the agent writes from `written` (what it holds) to `desired`,
    without reading it back. Returns (upserts, deletes)."""
    stale = [key_of(k) for k in written if k not in desired]
    changes = [(key_of(k), v) for k, v in desired.items() if written.get(k) != v]
    if stale:
        _delete(table, stale)
    if changes:
        _update(table, changes)
    return len(changes), len(stale)


def write_values(table: Any, changes: Mapping[Any, int], *, key_of: Callable[[Any], Any]) -> None:
    """Write these entries (an array map's: there is nothing to delete, only values to
    set, 0 included), batched where the kernel supports it."""
    if changes:
        _update(table, [(key_of(k), v) for k, v in changes.items()])


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
