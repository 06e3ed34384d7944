"""Cost per probe (issue 17): what the agent reports a probe costs (GET /v1/state, the same
figures as its metrics and status.cost), checked against the kernel's own figures read with
bpftool, and what keeping BPF run-time statistics on costs a traced call.

The real agent (running_agent, served over HTTP) gets count, histogram or events probes on
syscalls:sys_enter_getppid (events and counts) or the getppid syscall's latency
(histogram), each targeting the pod whose container cgroup bench/tk_loop.c calls getppid()
in; N probes of one shape share one program, each reporting its share. 'agent ns/run' is
the sum of the probes' run time over the sum of their runs; 'bpftool ns/run' is
run_time_ns / run_cnt of the same programs; the memory columns compare the probes' shares
with bytes_memlock of the programs and the maps they use.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Table,
    bpftool_memlock,
    cgroup_sandbox,
    met,
    prog_run_stats,
    require_root,
    run_loop,
)
from tracekeeper_agent.host.bpf_stats import SAMPLE_ON, SAMPLE_PERIOD, StatsMode
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.kubelet import create_cgroup
from tracekeeper_sim.served_agent import AUTH, FakePod, kubepods_qos, served_agent

CALLS = 1_000_000
CONFIGS = (("count", 1), ("histogram", 1), ("events", 1), ("count", 10))
AGREEMENT = 0.02
"""The agent's figures within this fraction of bpftool's (the program runs a little
between the two readings)."""
STATS_REPS = 5


def spec(kind: str) -> dict[str, Any]:
    if kind == "histogram":
        return {"syscall": {"name": "getppid", "latency": True}, "output": {"kind": "histogram"}}
    output: dict[str, Any] = {"kind": kind}
    if kind == "count":
        output["by"] = ["pod"]
    else:
        output["rateLimit"] = 100_000
    return {"tracepoint": "syscalls:sys_enter_getppid", "output": output}


def probes(kind: str, n: int, pod: FakePod) -> list[dict[str, Any]]:
    return [
        {
            "id": f"team-{i}/{kind}",
            "specHash": f"{i:016x}",
            "spec": spec(kind),
            "targets": {"pods": [pod.target(f"team-{i}")]},
        }
        for i in range(n)
    ]


@dataclass(frozen=True)
class Row:
    kind: str
    n: int
    agent_ns: float
    kernel_ns: float
    agent_bytes: int
    kernel_bytes: int

    @property
    def agrees(self) -> bool:
        """ns within AGREEMENT; bytes exact but for the rounding of each of n shares."""
        ns_ok = abs(self.agent_ns - self.kernel_ns) <= AGREEMENT * self.kernel_ns
        return ns_ok and abs(self.agent_bytes - self.kernel_bytes) <= self.n


async def measure(kind: str, n: int, pod: FakePod) -> Row:
    async with served_agent(detect_root(), run_time_stats="on") as served:
        report = await served.put_state(1, probes(kind, n, pod))
        program_ids = sorted({i for p in report["probes"] for i in p["programIds"]})
        await asyncio.to_thread(run_loop, "-c", pod.container_dir, "-n", CALLS)
        async with served.session.get(f"{served.url}/v1/state", headers=AUTH) as resp:
            costs = [p["cost"] for p in (await resp.json())["probes"]]
        runs, run_ns = prog_run_stats(program_ids)
        kernel_bytes = bpftool_memlock(program_ids)
    return Row(
        kind,
        n,
        agent_ns=sum(c["runTimeNs"] for c in costs) / max(sum(c["runs"] for c in costs), 1),
        kernel_ns=run_ns / max(runs, 1),
        agent_bytes=sum(c["kernelMemoryBytes"] for c in costs),
        kernel_bytes=kernel_bytes,
    )


async def loop_ns(pod: FakePod, *, stats: StatsMode) -> float:
    """ns per getppid() call with one count probe hitting, stats on or off (median of the
    runs' p10 chunks)."""
    async with served_agent(detect_root(), run_time_stats=stats) as served:
        await served.put_state(1, probes("count", 1, pod))
        runs = [
            await asyncio.to_thread(
                run_loop, "-c", pod.container_dir, "-a", 0, "-w", 200_000, "-n", CALLS
            )
            for _ in range(STATS_REPS)
        ]
    return statistics.median(r.chunk_p10 or r.ns_per_call for r in runs)


async def run(top: Path) -> list[Table]:
    pod = FakePod.new(kubepods_qos(top), "loop")
    create_cgroup(pod.container_dir)
    rows = [await measure(kind, n, pod) for kind, n in CONFIGS]
    table = Table(
        f"cost per probe as the agent reports it vs the kernel's figures ({CALLS:,} getppid "
        "calls in the probes' pod)",
        [
            "probes",
            "output",
            "agent ns/run",
            "bpftool ns/run",
            "kernel bytes per probe",
            "agent: sum of shares",
            "bpftool: programs + maps",
            "agree",
        ],
    )
    for r in rows:
        table.add(
            r.n,
            r.kind,
            f"{r.agent_ns:.1f}",
            f"{r.kernel_ns:.1f}",
            f"{r.agent_bytes // r.n:,}",
            f"{r.agent_bytes:,}",
            f"{r.kernel_bytes:,}",
            met(r.agrees),
        )
    one, ten = rows[0], rows[-1]
    table.notes += [
        f"goal: ns/run within {AGREEMENT:.0%} of bpftool's and memory equal to it, every row: "
        f"{met(all(r.agrees for r in rows))}",
        f"10 probes of one shape: {ten.agent_bytes // ten.n:,} bytes each, "
        f"{(ten.agent_bytes / ten.n) / one.agent_bytes:.2f}x one probe alone (one program, "
        "split ten ways)",
    ]
    on = await loop_ns(pod, stats="on")
    off = await loop_ns(pod, stats="off")
    duty = SAMPLE_ON / SAMPLE_PERIOD
    sampled = off + duty * (on - off)
    stats = Table(
        "what run-time statistics cost a traced call (one count probe hitting; ns per "
        f"getppid() call, median of {STATS_REPS} runs' p10 chunks)",
        ["statistics off", "on", "added", "ratio", "sampled (default)", "ratio"],
    )
    stats.add(
        f"{off:.0f}",
        f"{on:.0f}",
        f"{on - off:+.0f}",
        f"{on / off:.2f}x",
        f"{sampled:.0f}",
        f"{sampled / off:.2f}x",
    )
    stats.notes += [
        "on: the agent holds a BPF_ENABLE_STATS fd; every BPF program on the node pays it, "
        "not only tracekeeper's",
        f"sampled: on {SAMPLE_ON:g} s of every {SAMPLE_PERIOD:g} s (serve --run-time-stats "
        "sampled|on|off); its figure is the mean over the cycle (off + duty x added), "
        "computed from the two measured columns",
    ]
    return [table, stats]


def main() -> None:
    require_root()
    with cgroup_sandbox("tk-bench-cost") as top:
        for table in asyncio.run(run(top)):
            table.print()


if __name__ == "__main__":
    main()
