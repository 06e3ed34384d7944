"""The kernel's own accounting of BPF objects: memory (fdinfo's `memlock`, what bpftool
prints as bytes_memlock) and, while run-time statistics are on, each program's run time
and count (`run_time_ns`, `run_cnt`).

Run-time statistics are switched on by holding the fd that BPF_ENABLE_STATS returns: on
while any process holds one, off when the last is closed (a crashed agent leaves nothing
on), instead of writing the node-wide `kernel.bpf_stats_enabled` sysctl. They cost every
BPF program on the node two clock reads per run, which is why they are sampled.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path
from typing import Literal

from tracekeeper_agent.host.bpf_ids import NotABpfObject, fdinfo
from tracekeeper_agent.ports import ObjectUsage

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


def enable_run_time_stats() -> int:
    """An fd that keeps BPF run-time statistics on until it is closed (OSError: this
    kernel or process cannot, e.g. EPERM without CAP_SYS_ADMIN, EINVAL before 5.8)."""
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        raise OSError(f"no bpf(2) syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()  # union bpf_attr, zeroed; enable_stats.type first
    attr[0] = _BPF_STATS_RUN_TIME
    fd = int(libc.syscall(number, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    return fd


def prog_usage(fd: int, *, proc: Path = Path("/proc")) -> ObjectUsage:
    f = fdinfo(fd, proc=proc)
    if "prog_id" not in f:
        raise NotABpfObject(f"fd {fd} is not a BPF program")
    return ObjectUsage(
        kind="prog",
        id=int(f["prog_id"]),
        memlock=int(f.get("memlock", "0")),
        # Absent before 5.1; 0 while statistics are off.
        run_time_ns=int(f.get("run_time_ns", "0")),
        run_count=int(f.get("run_cnt", "0")),
    )


def map_usage(fd: int, *, proc: Path = Path("/proc")) -> ObjectUsage:
    f = fdinfo(fd, proc=proc)
    if "map_id" not in f:
        raise NotABpfObject(f"fd {fd} is not a BPF map")
    return ObjectUsage(kind="map", id=int(f["map_id"]), memlock=int(f.get("memlock", "0")))


StatsMode = Literal["sampled", "on", "off"]
SAMPLE_PERIOD = 10.0
SAMPLE_ON = 1.0
"""sampled: statistics on for SAMPLE_ON seconds of every SAMPLE_PERIOD. Measured here (bench/
probe_cost) they add ~120 ns to every run of every BPF program on the node (two clock
reads under a VM's clock source), so they are held on a tenth of the time by default: ns
per run stays exact (the kernel counts runs and time only while on), the node pays 10%."""


class RunTimeStats:
    """BPF run-time statistics held on always, for a share of the time (`switch` is
    called by the agent's duty cycle), or never."""

    def __init__(self, mode: StatsMode) -> None:
        self.mode: StatsMode = mode
        self._fd: int | None = None
        self.error: str | None = None
        """Why they cannot be switched on (the first attempt's error)."""
        if mode != "off":
            try:
                self.switch(True)
            except OSError as exc:
                self.mode, self.error = "off", str(exc)

    @property
    def on(self) -> bool:
        return self._fd is not None

    def switch(self, on: bool) -> None:
        if on and self._fd is None and self.mode != "off":
            self._fd = enable_run_time_stats()
        elif not on and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.switch(False)
