"""Processes: parent -> children from /proc, for followChildren."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class ProcTable:
    """Parent -> children from /proc/<pid>/stat, read on demand."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc

    def descendants(self, pids: Iterable[int]) -> frozenset[int]:
        children = self._children()
        seen: set[int] = set()
        frontier = list(pids)
        while frontier:
            for child in children.get(frontier.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    frontier.append(child)
        return frozenset(seen)

    def _children(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for name in os.listdir(self.proc):
            if not name.isdigit():
                continue
            ppid = parse_ppid(self._read_stat(name))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(name))
        return children

    def _read_stat(self, name: str) -> str:
        try:
            return (self.proc / name / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            return ""


def parse_ppid(stat_line: str) -> int | None:
    """The parent pid from a /proc/<pid>/stat line; comm may hold spaces and parentheses."""
    _, paren, rest = stat_line.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 2:
        return None
    try:
        return int(fields[1])
    except ValueError:
        return None
