"""Real libc: the symbol we find is where the dynamic linker put it, and BCC can use the
path we resolve, also through a /proc/<pid>/root."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from tracekeeper_agent.elf_symbols import (
    BinaryNotFound,
    SymbolNotFound,
    container_root,
    find_binary,
    resolve_uprobe,
)

pytestmark = pytest.mark.kernel


def libc_base(path: Path) -> int:
    """Load address of `path` in this process (its mapping at file offset 0)."""
    real = os.path.realpath(path)
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and os.path.realpath(fields[5]) == real and int(fields[2], 16) == 0:
            return int(fields[0].split("-")[0], 16)
    raise AssertionError(f"{path} is not mapped")


@pytest.mark.parametrize("name", ["c", "libc.so.6"])
def test_getpid_in_libc(name: str) -> None:
    target = resolve_uprobe(name, "getpid")
    assert target.path.name == "libc.so.6"
    libc = ctypes.CDLL(str(target.path))
    runtime = ctypes.cast(libc.getpid, ctypes.c_void_p).value
    assert runtime == libc_base(target.path) + target.symbol.value


def test_through_our_own_proc_root_bcc_attaches_and_fires() -> None:
    from bcc import BPF

    root = container_root(os.getpid())
    target = resolve_uprobe("c", "getpid", root=root)
    assert str(target.path).startswith(f"/proc/{os.getpid()}/root/")
    program = b"""
    BPF_ARRAY(hits, u64, 1);
    int probe(void *ctx) {
        if ((bpf_get_current_pid_tgid() >> 32) != TGID) return 0;
        int zero = 0;
        u64 *n = hits.lookup(&zero);
        if (n) __sync_fetch_and_add(n, 1);
        return 0;
    }
    """
    bpf = BPF(text=program, cflags=[f"-DTGID={os.getpid()}"])
    try:
        bpf.attach_uprobe(name=str(target.path).encode(), sym=b"getpid", fn_name=b"probe")
        libc = ctypes.CDLL(str(target.path))
        for _ in range(5):
            libc.getpid()
        assert bpf[b"hits"][ctypes.c_int(0)].value >= 5
    finally:
        bpf.cleanup()


def test_errors_on_the_real_system() -> None:
    with pytest.raises(SymbolNotFound, match=r"imported by .*python"):
        resolve_uprobe("/usr/bin/python3", "getpid")
    with pytest.raises(BinaryNotFound, match=r"searched /etc/ld\.so\.cache"):
        find_binary("tracekeeper-no-such-lib")
    assert find_binary("/bin/sh").name in ("dash", "bash", "sh")
