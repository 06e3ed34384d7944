"""Run every benchmark (`make bench`): the machine's details, then each benchmark's tables.

Each benchmark is a module bench/<name>.py with a main() that prints its tables; it runs
here in its own process, one after another (they share the CPUs they measure). A new one
is added to BENCHMARKS.

    .venv/bin/python -m bench.run [--only NAME ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bench.common import Table, machine_details, require_root

BENCHMARKS = (
    "kernel_cost",
    "shared_programs",
    "filter_update",
    "container_start",
    "event_throughput",
    "footprint",
    "probe_cost",
    "operator_events",
    "control_plane",
)


def load_average() -> str:
    """1, 5 and 15 minute load averages: other work on the machine shows here."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_one(name: str, sinks: list[TextIO]) -> tuple[int, float]:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"bench.{name}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        for sink in sinks:
            sink.write(line)
            sink.flush()
    return proc.wait(), time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    args = parser.parse_args()
    require_root()
    sinks: list[TextIO] = [sys.stdout]
    if args.out is not None:
        sinks.append(args.out.open("w", encoding="utf-8"))

    machine = Table("machine", ["fact", "value"])
    machine.add("date (UTC)", datetime.now(UTC).strftime("%Y-%m-%d %H:%M"))
    machine.add("load average at start", load_average())
    for fact, value in machine_details():
        machine.add(fact, value)
    for sink in sinks:
        sink.write(machine.render() + "\n\n")

    summary = Table("benchmarks run", ["benchmark", "exit", "seconds", "load average after"])
    failed = 0
    for name in args.only or BENCHMARKS:
        code, seconds = run_one(name, sinks)
        failed += code != 0
        summary.add(name, code, f"{seconds:.0f}", load_average())
    for sink in sinks:
        sink.write(summary.render() + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
