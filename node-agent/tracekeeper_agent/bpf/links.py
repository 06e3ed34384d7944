"""BPF links and bpffs pins, through libbpf (the library libbcc itself is built on).

BCC attaches a tracepoint program with a perf event and PERF_EVENT_IOC_SET_BPF: the
attachment lives exactly as long as the agent's fd. A BPF link over the same perf event
(BPF_LINK_CREATE, attach type BPF_PERF_EVENT, kernel >= 5.15) can be pinned in bpffs, so
that the attachment outlives a crashed agent and its successor adopts it instead of
compiling again (bpf/pinned_programs.py). A raw tracepoint's attachment is a link already.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

from tracekeeper_agent.host.tracefs import tracepoint_dir

BPF_PERF_EVENT = 41
"""enum bpf_attach_type's BPF_PERF_EVENT (linux/bpf.h)."""
PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
NR_PERF_EVENT_OPEN = 298  # x86-64


class _PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to config1 (PERF_ATTR_SIZE_VER0, 64 bytes): the kernel
    takes the size it is given, zero beyond. As BCC opens a tracepoint's event."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
    )


class LinkError(OSError):
    """A libbpf call failed (the message names the call and the kernel's errno)."""


@functools.cache
def _libbpf() -> Any:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_link_create.restype = ctypes.c_int
    lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_raw_tracepoint_open.restype = ctypes.c_int
    lib.bpf_raw_tracepoint_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.bpf_obj_pin.restype = ctypes.c_int
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    return lib


@functools.cache
def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _checked(result: int, what: str) -> int:
    if result < 0:  # libbpf 1.x returns -errno
        err = -result if result != -1 else ctypes.get_errno()
        raise LinkError(err, f"{what}: {os.strerror(err)}")
    return result


def tracepoint_id(category: str, name: str) -> int:
    return int((tracepoint_dir(f"{category}:{name}") / "id").read_text())


def attach_tracepoint(prog_fd: int, category: str, name: str) -> int:
    """A link fd attaching the program to the tracepoint (every CPU, every process)."""
    attr = _PerfEventAttr(
        type=PERF_TYPE_TRACEPOINT,
        size=ctypes.sizeof(_PerfEventAttr),
        config=tracepoint_id(category, name),
        sample_period=1,
        sample_type=PERF_SAMPLE_RAW,
        wakeup_events=1,
    )
    libc = _libc()
    # pid -1, cpu 0: a tracepoint's program runs on every CPU, whichever event holds it.
    perf_fd = libc.syscall(NR_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if perf_fd < 0:
        err = ctypes.get_errno()
        raise LinkError(
            err, f"perf_event_open for tracepoint {category}:{name}: {os.strerror(err)}"
        )
    try:
        create = _libbpf().bpf_link_create(prog_fd, perf_fd, BPF_PERF_EVENT, None)
        return _checked(create, f"BPF_LINK_CREATE on tracepoint {category}:{name}")
    finally:
        os.close(perf_fd)  # the link holds the perf event


def attach_raw_tracepoint(prog_fd: int, name: str) -> int:
    fd = _libbpf().bpf_raw_tracepoint_open(name.encode(), prog_fd)
    return _checked(fd, f"BPF_RAW_TRACEPOINT_OPEN {name}")


def pin(fd: int, path: Path) -> None:
    _checked(_libbpf().bpf_obj_pin(fd, os.fsencode(path)), f"pinning {path}")


def open_pinned(path: Path) -> int:
    """A new fd for the object pinned at `path` (FileNotFoundError if none)."""
    fd = _libbpf().bpf_obj_get(os.fsencode(path))
    if fd < 0:
        err = -fd if fd != -1 else ctypes.get_errno()
        if err == 2:
            raise FileNotFoundError(err, f"no BPF object pinned at {path}")
        _checked(fd, f"opening {path}")
    return int(fd)
