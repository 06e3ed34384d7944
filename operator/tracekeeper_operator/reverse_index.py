"""Which items read which keys, kept both ways (pure): a pass that knows which keys changed
finds the items to look at again (probes reading a namespace's pods or naming a filter,
probes targeting a node, filters counting a namespace's pods)."""

from __future__ import annotations

from collections.abc import Collection


class ReverseIndex:
    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, ...]] = {}
        """item -> the keys it reads (absent: none)."""
        self._readers: dict[str, set[str]] = {}
        """key -> the items reading it (absent: none)."""

    def set(self, item: str, keys: tuple[str, ...]) -> None:
        """`item` now reads `keys` (none: it is forgotten)."""
        old = self._keys.get(item, ())
        if old == keys:
            return
        for key in old:
            readers = self._readers[key]
            readers.discard(item)
            if not readers:
                del self._readers[key]
        for key in keys:
            self._readers.setdefault(key, set()).add(item)
        if keys:
            self._keys[item] = keys
        else:
            del self._keys[item]

    def readers(self, key: str) -> Collection[str]:
        return self._readers.get(key, ())

    def keep_only(self, items: Collection[str]) -> None:
        """Forget every item not among `items`."""
        for item in self._keys.keys() - set(items):
            self.set(item, ())
