"""Real libc: the symbol we find is where the dynamic linker put it, and BCC can use the
path we resolve, also through a /proc/<pid>/root."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracekeeper_agent.host.elf_symbols import (
    BinaryNotFound,
    SymbolNotFound,
    find_binary,
    resolve_uprobe,
)
from tracekeeper_agent.host.rootfs import open_process_root, open_root
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.kubelet import pid_cgroup

pytestmark = pytest.mark.kernel


def libc_base(path: Path) -> int:
    """Load address of `path` in this process (its mapping at file offset 0)."""
    real = os.path.realpath(path)
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and os.path.realpath(fields[5]) == real and int(fields[2], 16) == 0:
            return int(fields[0].split("-")[0], 16)
    raise AssertionError(f"{path} is not mapped")


@pytest.fixture
def host_root() -> Iterator[int]:
    fd = open_root("/")
    yield fd
    os.close(fd)


@pytest.mark.parametrize("name", ["c", "libc.so.6"])
def test_getpid_in_libc(name: str, host_root: int) -> None:
    target = resolve_uprobe(name, "getpid", host_root)
    try:
        path = Path(os.readlink(target.file.proc_path))
        assert path.name == "libc.so.6"
        libc = ctypes.CDLL(str(path))
        runtime = ctypes.cast(libc.getpid, ctypes.c_void_p).value
        assert runtime == libc_base(path) + target.symbol.value
    finally:
        target.close()


def test_through_our_own_proc_root_bcc_attaches_through_the_fd_and_fires() -> None:
    from bcc import BPF

    cgroup = detect_root() / str(pid_cgroup()).lstrip("/")
    root = open_process_root(os.getpid(), cgroup)
    assert root is not None
    try:
        target = resolve_uprobe("c", "getpid", root)
    finally:
        os.close(root)
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
        bpf.attach_uprobe(name=target.file.proc_path.encode(), sym=b"getpid", fn_name=b"probe")
        libc = ctypes.CDLL("libc.so.6")
        for _ in range(5):
            libc.getpid()
        assert bpf[b"hits"][ctypes.c_int(0)].value >= 5
    finally:
        bpf.cleanup()
        target.close()


def test_errors_on_the_real_system(host_root: int) -> None:
    with pytest.raises(SymbolNotFound, match=r"imported by /usr/bin/python3"):
        resolve_uprobe("/usr/bin/python3", "getpid", host_root)
    with pytest.raises(BinaryNotFound, match=r"searched /etc/ld\.so\.cache"):
        find_binary("tracekeeper-no-such-lib", host_root)
    sh = find_binary("/bin/sh", host_root)
    os.close(sh.fd)
