"""The compiler's memory handed back to the node while the agent has nothing to compile.

BCC links LLVM and clang into the agent: importing bcc maps them, and a compile pages in
~80 MiB of their code and data and leaves ~27 MiB of freed heap in glibc's arenas. None of
that is needed between compiles, which are rare after start (a new shape, not a new probe:
docs/DESIGN.md, "The compiler's memory"). After a quiet window the agent returns the freed
heap (`malloc_trim`) and asks the kernel to reclaim the compiler libraries' pages
(`MADV_PAGEOUT`, Linux 5.4+): clean pages are dropped, written ones are kept (swapped
only if the node has swap), so nothing is lost; the next compile faults back what it uses.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

COMPILER_LIBRARIES = ("libLLVM", "libclang")
"""Shared objects (by file-name prefix) that only a compile executes."""
QUIET_SECONDS = 3.0
"""No compile for this long: a push's burst of compiles (~1 s each) is over."""
_MADV_PAGEOUT = 21

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


@dataclass(frozen=True)
class Released:
    mapped_bytes: int
    """Bytes of compiler-library mappings advised out."""
    failed: int
    """Mappings the kernel refused (EINVAL before 5.4, EPERM on a file we may not write)."""


def compiler_mappings(maps: Path = Path("/proc/self/maps")) -> Iterator[tuple[int, int]]:
    """(start, length) of every mapping of a compiler library in this process."""
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not Path(fields[5]).name.startswith(COMPILER_LIBRARIES):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        yield start, end - start


def release_compiler_memory() -> Released:
    trim = getattr(_libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
    advised = failed = 0
    for start, length in compiler_mappings():
        if _libc.madvise(start, length, _MADV_PAGEOUT) == 0:
            advised += length
        else:
            failed += 1
    if failed:
        log.debug("MADV_PAGEOUT refused on %d compiler mappings", failed)
    return Released(advised, failed)


class QuietRelease:
    """Calls `release` once no compile has started for `quiet` seconds (each `compiled()`
    restarts the wait). Safe to race with a compile: paging out never loses data."""

    def __init__(
        self,
        release: Callable[[], object] = release_compiler_memory,
        quiet: float = QUIET_SECONDS,
    ) -> None:
        self._release = release
        self._quiet = quiet
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def compiled(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self._quiet, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
        try:
            self._release()
        except OSError:
            log.exception("releasing the compiler's memory")

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
