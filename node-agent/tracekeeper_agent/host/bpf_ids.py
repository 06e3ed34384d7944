"""Kernel ids of BPF objects held by fd: what `bpftool prog show` prints.

The reconciler compares program ids to prove that a filter update did not reload the
program. Takes an fd so that this module needs no bcc (BCC keeps it in `b.funcs[n].fd`).
"""

from __future__ import annotations

from pathlib import Path


class NotABpfObject(ValueError):
    pass


def prog_id(fd: int, *, proc: Path = Path("/proc")) -> int:
    """The kernel's id of the BPF program behind `fd` in this process."""
    return _fdinfo_value(fd, "prog_id", proc)


def _fdinfo_value(fd: int, key: str, proc: Path) -> int:
    path = proc / "self" / "fdinfo" / str(fd)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotABpfObject(f"fd {fd} is not open") from None
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name == key:
            return int(value.strip())
    raise NotABpfObject(f"fd {fd} has no {key} (not a BPF {key.split('_')[0]}?)")
