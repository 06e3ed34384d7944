"""Run every reliability section (`make reliability`): the machine's details, then each
section's tables, then a summary.

Each section is a module reliability/<name>.py with a main() that prints its tables and
exits non-zero when a check fails; it runs here in its own process, one after another (they
share the CPUs). The differential (models vs the real apiserver) is a pytest module of the
e2e tier, the API fuzz two of the unit tier; both run here at the full size with a random
seed. A new section is added to SECTIONS.

    .venv/bin/python -m reliability.run [--only NAME ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bench.common import Table, machine_details, require_root

DIFFERENTIAL = "differential"
API_FUZZ = "api_fuzz"
"""The agent's and the output API's HTTP inputs fuzzed (unit-tier modules, at full size)."""

CHURN = "churn"
"""10,000 pod events against the real apiserver, operator and agents; maps read from the kernel."""

CHAOS = "chaos"
"""Faults on the agent (real BPF programs) and the control plane (reliability/chaos.py)."""

SECTIONS: tuple[str, ...] = (DIFFERENTIAL, API_FUZZ, CHURN, CHAOS)
PYTEST_SECTIONS = {
    DIFFERENTIAL: ["tests/e2e/test_model_vs_apiserver.py"],
    API_FUZZ: ["tests/unit/test_agent_api_fuzz.py", "tests/unit/test_output_api_fuzz.py"],
}


def command(name: str) -> list[str]:
    if name in PYTEST_SECTIONS:
        # The fuzz: a failing case prints its request, not the captured logs of every case.
        quiet = ["-p", "no:logging"] if name == API_FUZZ else []
        return [sys.executable, "-m", "pytest", *PYTEST_SECTIONS[name], "-q", "-s", *quiet]
    return [sys.executable, "-m", f"reliability.{name}"]


def environment(name: str) -> dict[str, str]:
    env = dict(os.environ)
    if name == DIFFERENTIAL:
        env.setdefault("TK_DIFFERENTIAL_EXAMPLES", "10000")
        env.setdefault("TK_DIFFERENTIAL_SEED", "random")
    if name == API_FUZZ:
        # Per endpoint: 1,000 cases per GET route, 3,000 PUT /v1/state, 4,000 output API.
        env.setdefault("TK_FUZZ_EXAMPLES", "1000")
        env.setdefault("TK_FUZZ_SEED", "random")
    return env


def run_one(name: str, sinks: list[TextIO]) -> tuple[int, float]:
    started = time.monotonic()
    proc = subprocess.Popen(
        command(name),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment(name),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        for sink in sinks:
            sink.write(line)
            sink.flush()
    return proc.wait(), time.monotonic() - started


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None)
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

    summary = Table("reliability sections run", ["section", "exit", "seconds"])
    failed = 0
    for name in args.only or SECTIONS:
        code, seconds = run_one(name, sinks)
        failed += code != 0
        summary.add(name, code, f"{seconds:.0f}")
    for sink in sinks:
        sink.write(summary.render() + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
