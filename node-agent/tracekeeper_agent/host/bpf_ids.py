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
    return _int_field(fdinfo(fd, proc=proc), fd, "prog_id")


def fdinfo(fd: int, *, proc: Path = Path("/proc")) -> dict[str, str]:
    """The `key: value` lines of /proc/self/fdinfo/<fd>: for a BPF object, its id, type,
    memlock and (programs) run statistics."""
    path = proc / "self" / "fdinfo" / str(fd)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotABpfObject(f"fd {fd} is not open") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value.strip()
    return fields


def _int_field(fields: dict[str, str], fd: int, key: str) -> int:
    try:
        return int(fields[key])
    except KeyError:
        raise NotABpfObject(f"fd {fd} has no {key} (not a BPF {key.split('_')[0]}?)") from None
