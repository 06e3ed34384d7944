"""Agent footprint: RSS and compile time with 1, 10 and 20 distinct probes loaded, with 1 and
20 probes of one shape (one shared program), and what a reload of an identical spec costs.

Each configuration runs in a fresh process (`--child N`): the real agent (cli.running_agent,
served over HTTP) gets a state of N count probes, each on a different syscalls tracepoint
(so N distinct programs), pushed in one PUT. Then the same state is pushed again (identical
specs: the agent keeps the programs, map updates only), and the first probe's plan is loaded
once more with BccLoader, which is what a reload of an identical spec costs with BCC's Python
API: it compiles the C text every time (docs/DESIGN.md, amendments: compile cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import Table, bench_loader, bpftool_progs, cgroup_sandbox, met, require_root
from tracekeeper_agent.bpf.compiler_memory import COMPILER_LIBRARIES, QUIET_SECONDS
from tracekeeper_agent.bpf.identity import PinnedIdentities
from tracekeeper_agent.bpf.loader import BccLoader, BccProgram
from tracekeeper_agent.host.tracefs import DEFAULT_TRACEFS
from tracekeeper_agent.ports import ProgramPlan
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.served_agent import FakePod, kubepods_qos, served_agent

CONFIGS = ((0, False), (1, False), (10, False), (20, False), (20, True))
"""(probes, all of one shape): distinct shapes are distinct programs; one shape is one."""
RSS_GOAL_MIB = 150
KERNEL_GOAL = 1.5
"""20 probes of one shape: kernel memory within this factor of one probe's."""
SYSCALLS = [
    "getppid",
    "getpid",
    "gettid",
    "getuid",
    "getgid",
    "geteuid",
    "getegid",
    "openat",
    "read",
    "write",
    "close",
    "lseek",
    "mmap",
    "munmap",
    "brk",
    "ioctl",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "access",
    "pipe",
    "dup",
    "nanosleep",
    "getcwd",
]


class TimingLoader:
    """BccLoader that records how long each compile + load + attach took."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._loader = BccLoader()

    def load(self, plan: ProgramPlan) -> BccProgram:
        started = time.perf_counter()
        try:
            return self._loader.load(plan)
        finally:
            self.seconds.append(time.perf_counter() - started)

    @property
    def identities(self) -> PinnedIdentities:
        return self._loader.identities

    def drop_leftovers(self) -> int:
        return self._loader.drop_leftovers()

    def close(self) -> None:
        self._loader.close()


def tracepoints(n: int) -> list[str]:
    base = next((p for p in DEFAULT_TRACEFS if (p / "events").is_dir()), DEFAULT_TRACEFS[0])
    present = [s for s in SYSCALLS if (base / "events/syscalls" / f"sys_enter_{s}").is_dir()]
    if len(present) < n:
        raise RuntimeError(f"only {len(present)} of the wanted syscall tracepoints exist")
    return [f"syscalls:sys_enter_{s}" for s in present[:n]]


def probes(n: int, pod: FakePod, one_shape: bool = False) -> list[dict[str, Any]]:
    points = tracepoints(1) * n if one_shape else tracepoints(n)
    return [
        {
            "id": f"bench/probe-{i}",
            "specHash": f"{i:016x}",
            "spec": {"tracepoint": tp, "output": {"by": ["pod"]}},
            "targets": {"pods": [pod.target()]},
        }
        for i, tp in enumerate(points)
    ]


def status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m[1]) if m else 0


def kernel_bytes(prog_ids: set[int]) -> int:
    """memlock bytes of these programs and of every map they use (bpftool's accounting)."""
    progs: list[dict[str, Any]] = [p for p in bpftool_progs() if p.get("id") in prog_ids]
    map_ids = {int(m) for p in progs for m in p.get("map_ids", [])}
    out = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True)
    maps: list[dict[str, Any]] = json.loads(out.stdout or "[]")
    used = [m for m in maps if m.get("id") in map_ids]
    return sum(int(o.get("bytes_memlock", 0)) for o in [*progs, *used])


def compiler_sharers() -> int:
    """Other processes with LLVM/clang mapped: MADV_PAGEOUT leaves the pages they share."""
    count = 0
    for maps in Path("/proc").glob("[0-9]*/maps"):
        if maps.parent.name == str(os.getpid()):
            continue
        try:
            text = maps.read_text()
        except OSError:  # gone, or a kernel thread
            continue
        count += any(lib in text for lib in COMPILER_LIBRARIES)
    return count


@dataclass
class Footprint:
    probes: int
    one_shape: bool
    rss_before_agent_kib: int
    rss_agent_kib: int
    rss_loaded_kib: int
    rss_settled_kib: int
    sharers: int
    """Other processes mapping the compiler libraries when the settled RSS was read."""
    peak_rss_kib: int
    apply_seconds: float
    load_seconds: list[float]
    kernel_bytes: int
    repush_seconds: float
    repush_same_ids: bool
    reload_seconds: float


async def measure(n: int, one_shape: bool) -> Footprint:
    rss_before = status_kib("VmRSS")
    with cgroup_sandbox("tk-bench-footprint") as top:
        pod = FakePod.new(kubepods_qos(top), "p")
        pod.container_dir.mkdir(parents=True)
        loader = TimingLoader()
        async with served_agent(detect_root(), loader=loader) as served:
            rss_agent = status_kib("VmRSS")
            state = probes(n, pod, one_shape)
            started = time.perf_counter()
            report = await served.put_state(1, state)
            apply_seconds = time.perf_counter() - started
            rss_loaded = status_kib("VmRSS")
            ids = {i for p in report["probes"] for i in p["programIds"]}
            started = time.perf_counter()
            again = await served.put_state(2, state)
            repush = time.perf_counter() - started
            same = {i for p in again["probes"] for i in p["programIds"]} == ids
            peak = status_kib("VmHWM")
            await asyncio.sleep(QUIET_SECONDS + 1)  # compiles over: the compiler handed back
            rss_settled = status_kib("VmRSS")
            sharers = compiler_sharers()
            reload = 0.0
            active = served.agent.reconciler.active_probes()
            if active:
                started = time.perf_counter()
                bench_loader().load(active[0].plan).close()
                reload = time.perf_counter() - started
            memlock = kernel_bytes(ids)
    return Footprint(
        probes=n,
        one_shape=one_shape,
        rss_before_agent_kib=rss_before,
        rss_agent_kib=rss_agent,
        rss_loaded_kib=rss_loaded,
        rss_settled_kib=rss_settled,
        sharers=sharers,
        peak_rss_kib=peak,
        apply_seconds=apply_seconds,
        load_seconds=loader.seconds,
        kernel_bytes=memlock,
        repush_seconds=repush,
        repush_same_ids=same,
        reload_seconds=reload,
    )


def child(n: int, one_shape: bool) -> None:
    print(json.dumps(asdict(asyncio.run(measure(n, one_shape)))))


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def run() -> Table:
    results = []
    for n, one_shape in CONFIGS:
        shape = ["--one-shape"] if one_shape else []
        out = subprocess.run(
            [sys.executable, "-m", "bench.footprint", "--child", str(n), *shape],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(Footprint(**json.loads(out.stdout.strip().splitlines()[-1])))
    base = results[0]
    table = Table(
        "agent footprint: N count probes loaded in one push (a fresh agent process each)",
        [
            "probes",
            "shapes (programs)",
            "RSS MiB, Loaded",
            "RSS MiB, settled",
            "settled, added MiB",
            "peak RSS MiB",
            "push -> Loaded s",
            "compile+attach ms/probe (mean, max)",
            "kernel memlock MiB",
            "identical re-push ms",
            "BCC reload, identical plan ms",
        ],
    )
    for r in results:
        loads = r.load_seconds
        per = f"{statistics.mean(loads) * 1e3:.0f}, {max(loads) * 1e3:.0f}" if loads else ""
        table.add(
            r.probes,
            (1 if r.one_shape else r.probes) if r.probes else 0,
            mib(r.rss_loaded_kib),
            mib(r.rss_settled_kib),
            mib(r.rss_settled_kib - base.rss_settled_kib),
            mib(r.peak_rss_kib),
            f"{r.apply_seconds:.2f}",
            per,
            f"{r.kernel_bytes / 2**20:.1f}" if r.probes else "",
            f"{r.repush_seconds * 1e3:.1f}" + ("" if r.repush_same_ids else " (ids CHANGED)"),
            f"{r.reload_seconds * 1e3:.0f}" if r.probes else "",
        )
    one = next(r for r in results if r.probes == 1)
    shared = next(r for r in results if r.one_shape)
    ratio = shared.kernel_bytes / max(one.kernel_bytes, 1)
    rss = shared.rss_settled_kib / 1024
    table.notes += [
        f"goal, 20 probes of one shape: agent RSS (settled) <= {RSS_GOAL_MIB} MiB: {rss:.0f} MiB "
        f"{met(rss <= RSS_GOAL_MIB)}; kernel memory <= {KERNEL_GOAL}x one probe's: "
        f"{ratio:.2f}x {met(ratio <= KERNEL_GOAL)}",
        f"RSS of the agent process (the benchmark's HTTP client lives in it too); before the "
        f"agent started: {mib(base.rss_before_agent_kib)} MiB (Python, aiohttp, pydantic, "
        f"bcc imported), with the agent running and no probe: {mib(base.rss_agent_kib)} MiB",
        "Loaded: RSS when the push returns; the compile has just paged LLVM/clang in",
        f"settled: {QUIET_SECONDS + 1:.0f} s later, after the agent handed the compiler's memory "
        "back (malloc_trim, MADV_PAGEOUT of the compiler libraries: bpf/compiler_memory.py); "
        "peak: VmHWM before the benchmark's own reload",
        "settled, added: over the 0-probe agent's settled RSS",
        "other processes mapping LLVM/clang when the settled RSS was read (the kernel pages out "
        "only pages this process alone maps): " + ", ".join(str(r.sharers) for r in results),
        "identical re-push: the same specs at a new revision; the agent keeps every program "
        "(program ids unchanged), so nothing compiles",
        "BCC reload, identical plan: BccLoader.load of an already loaded probe's plan; BCC's "
        "Python API compiles the C text every time (no compile cache: docs/DESIGN.md)",
        "kernel memlock: bpftool's bytes_memlock of the programs and all their maps (the cgroup "
        "filter, verdict cache and count maps are preallocated at their maximum sizes)",
    ]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one-shape", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_root()
    if args.child is not None:
        child(args.child, args.one_shape)
        return
    run().print()


if __name__ == "__main__":
    main()
