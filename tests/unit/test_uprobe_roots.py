"""Uprobe binaries across the targeted containers' roots: one attachment per file, roots
without the binary skipped."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracekeeper_agent.ports import LoadFailure, TargetRoot
from tracekeeper_agent.programs.kinds.uprobe import resolve_all

# A file with exported functions (Debian strips binaries' .symtab; libc's .dynsym stays).
LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
BINARY = "/lib/libc.so.6"
SYMBOL = "getpid"


@pytest.fixture
def roots(tmp_path: Path) -> Iterator[dict[str, TargetRoot]]:
    """Three roots: a and b hold the same file (a hard link: one inode; the st_dev that
    overlayfs gives each container's mount is the node tier's to show), c holds none."""
    if not LIBC.exists():
        pytest.skip(f"no {LIBC} here")
    opened = {}
    for name in "abc":
        (tmp_path / name / "lib").mkdir(parents=True)
    shutil.copy(LIBC.resolve(), tmp_path / "a" / BINARY.lstrip("/"))
    os.link(tmp_path / "a" / BINARY.lstrip("/"), tmp_path / "b" / BINARY.lstrip("/"))
    for name in "abc":
        opened[name] = TargetRoot(os.open(tmp_path / name, os.O_RDONLY | os.O_DIRECTORY), name)
    yield opened
    for root in opened.values():
        os.close(root.fd)


def test_one_file_in_two_roots_is_attached_once(roots: dict[str, TargetRoot]) -> None:
    files = resolve_all(BINARY, SYMBOL, (roots["a"], roots["b"]))
    assert len(files) == 1
    for f in files:
        f.close()


def test_a_root_without_the_binary_is_skipped(roots: dict[str, TargetRoot]) -> None:
    files = resolve_all(BINARY, SYMBOL, (roots["c"], roots["a"]))
    assert len(files) == 1
    for f in files:
        f.close()


def test_no_root_with_the_binary_fails_the_probe(roots: dict[str, TargetRoot]) -> None:
    with pytest.raises(LoadFailure, match=r"uprobe /lib/libc.so.6:getpid"):
        resolve_all(BINARY, SYMBOL, (roots["c"],))
