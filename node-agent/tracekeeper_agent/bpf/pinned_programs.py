"""Programs pinned in bpffs, so that they outlive a crashed agent and its successor adopts
them instead of compiling again (each compile is ~0.35 s of clang; a restart with four
shapes spent 2-4 s on them before tracing resumed).

Layout, per program: <root>/<source_hash>-<n>/ holding `prog-<function>` (the loaded
functions), `link-<i>` (their attachments: a link per tracepoint, bpf/links.py) and
`map-<name>` (the maps the agent reads and writes). The node's identity table has its own
pin (bpf/identity.py), which adopted programs keep using.

Lifecycle: a clean shutdown unpins and detaches everything (nothing outlives a stopped
agent). A SIGKILL or crash leaves the pins: the programs keep running on the last maps
they were given. The next agent of the node takes, for each plan it loads, a leftover of
the same source hash (the same C text, so the same program) and resets its maps; after its
persisted state is restored, it removes the leftovers nobody took.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tracekeeper_agent.bpf.links import open_pinned, pin

log = logging.getLogger(__name__)

_DIR = re.compile(r"^(?P<hash>[0-9a-f]+)-(?P<n>\d+)$")


@dataclass
class OpenedPins:
    """New fds for a pinned program's objects (the caller owns them)."""

    progs: dict[str, int] = field(default_factory=dict)
    links: list[int] = field(default_factory=list)
    maps: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in [*self.progs.values(), *self.links, *self.maps.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)


class ProgramPins:
    """The pins of one program."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def pin(self, progs: dict[str, int], links: list[int], maps: dict[str, int]) -> None:
        """Pin everything, or nothing (a half-pinned program is removed)."""
        try:
            for name, fd in progs.items():
                pin(fd, self.directory / f"prog-{name}")
            for i, fd in enumerate(links):
                pin(fd, self.directory / f"link-{i}")
            for name, fd in maps.items():
                pin(fd, self.directory / f"map-{name}")
        except BaseException:
            self.remove()
            raise

    def open(self) -> OpenedPins:
        opened = OpenedPins()
        try:
            for entry in sorted(self.directory.iterdir()):
                kind, _, name = entry.name.partition("-")
                fd = open_pinned(entry)
                if kind == "prog":
                    opened.progs[name] = fd
                elif kind == "link":
                    opened.links.append(fd)
                elif kind == "map":
                    opened.maps[name] = fd
                else:
                    os.close(fd)
        except BaseException:
            opened.close()
            raise
        if not opened.links:
            opened.close()
            raise FileNotFoundError(f"{self.directory}: no links pinned")
        return opened

    def remove(self) -> None:
        """Unpin: the links go with their last fd, the programs and maps with theirs."""
        with contextlib.suppress(FileNotFoundError):
            for entry in self.directory.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            self.directory.rmdir()


class PinStore:
    """The programs pinned under one root: those a previous agent left, and new ones."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._leftovers: dict[str, list[ProgramPins]] = {}
        self._lock = threading.Lock()
        """Loads (the compile worker) take, the restore's end drops: two threads."""
        for entry in sorted(root.iterdir()):
            m = _DIR.match(entry.name)
            if m is None or not entry.is_dir():
                continue
            self._leftovers.setdefault(m["hash"], []).append(ProgramPins(entry))
        if self._leftovers:
            log.info("%d programs left pinned by a previous agent", self.leftovers)

    @property
    def leftovers(self) -> int:
        return sum(len(pins) for pins in self._leftovers.values())

    def take(self, source_hash: str) -> ProgramPins | None:
        """A leftover program of this source, for adoption (None: compile)."""
        with self._lock:
            found = self._leftovers.get(source_hash)
            if not found:
                return None
            pins = found.pop()
            if not found:
                del self._leftovers[source_hash]
            return pins

    def new(self, source_hash: str) -> ProgramPins:
        n = 0
        while True:
            directory = self.root / f"{source_hash}-{n}"
            try:
                directory.mkdir()
            except FileExistsError:
                n += 1
                continue
            return ProgramPins(directory)

    def drop_leftovers(self) -> int:
        """Remove what no plan took: those programs detach now."""
        with self._lock:
            dropped = [p for found in self._leftovers.values() for p in found]
            self._leftovers.clear()
        for pins in dropped:
            pins.remove()
        return len(dropped)

    def drop_all(self) -> None:
        """Every pin under the root (a leftover that cannot be adopted: another layout)."""
        self.drop_leftovers()
        for entry in self.root.iterdir():
            if _DIR.match(entry.name):
                ProgramPins(entry).remove()
