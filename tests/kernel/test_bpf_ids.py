"""Program ids, memory and run statistics from fdinfo agree with bpftool's view from outside
the process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tracekeeper_agent.host.bpf_ids import NotABpfObject, prog_id
from tracekeeper_agent.host.bpf_stats import RunTimeStats, map_usage, prog_usage

pytestmark = pytest.mark.kernel


def bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_ids_match_bpftool() -> None:
    from bcc import BPF

    bpf = BPF(text=b"BPF_HASH(tk_ids_map, u32, u32); int tk_ids_prog(void *ctx) { return 0; }")
    try:
        fn = bpf.load_func(b"tk_ids_prog", BPF.SOCKET_FILTER)
        pid = prog_id(fn.fd)
        assert bpftool("prog", "show", "id", str(pid))["name"] == "tk_ids_prog"
    finally:
        bpf.cleanup()


def test_plain_fd_is_not_bpf() -> None:
    with open("/dev/null") as f, pytest.raises(NotABpfObject):
        prog_id(f.fileno())


def test_run_time_stats_count_only_while_switched_on() -> None:
    from bcc import BPF

    bpf = BPF(text=b"TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }")
    stats = RunTimeStats("on")
    try:
        (fn,) = bpf.funcs.values()
        assert stats.on and stats.error is None
        for _ in range(100):
            os.getppid()
        on = prog_usage(fn.fd)
        assert on.run_count >= 100 and on.run_time_ns > 0 and on.memlock > 0
        stats.switch(False)
        for _ in range(100):
            os.getppid()
        # Another process may hold statistics on (a benchmark): then they still count.
        if not _held_elsewhere():
            assert prog_usage(fn.fd).run_count == on.run_count
    finally:
        stats.close()
        bpf.cleanup()


def _held_elsewhere() -> bool:
    return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() != "0"


def test_maps_report_their_memory_and_ids() -> None:
    from bcc import BPF

    bpf = BPF(text=b"BPF_HASH(tk_mem_map, u32, u64, 1024); int f(void *ctx) { return 0; }")
    try:
        table = bpf[b"tk_mem_map"]
        usage = map_usage(table.map_fd)
        shown = bpftool("map", "show", "id", str(usage.id))
        assert usage.memlock == int(shown["bytes_memlock"]) > 0
        with pytest.raises(NotABpfObject):
            prog_usage(table.map_fd)
    finally:
        bpf.cleanup()
