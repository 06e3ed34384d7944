"""Reliability section `chaos` (issue 18): faults on the agent with real BPF programs
(reliability.agent_chaos) and on the control plane with the real apiserver, etcd and
operator (reliability.control_chaos). Each scenario's checks must hold (a failure is a
row and a non-zero exit); resume times are compared with the 2 s goal, never asserted.

    .venv/bin/python -m reliability.chaos [--only NAME ...]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.common import Table, met, require_root

from reliability import agent_chaos, control_chaos
from reliability.agent_chaos import RESUME_GOAL_SECONDS, Figures
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.local_cluster import LocalCluster, build_binaries
from tracekeeper_sim.world import World

AGENT: dict[str, Callable[[Path, Path], Figures]] = {s.__name__: s for s in agent_chaos.ALL}
CONTROL: dict[str, Callable[[World], Figures]] = {s.__name__: s for s in control_chaos.ALL}


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def attempt(name: str, run: Callable[[], Figures]) -> tuple[Figures, str]:
    try:
        figures = run()
        return figures, "ok"
    except AssertionError as exc:  # ChaosFailure and the harness's timeouts
        traceback.print_exc()
        return Figures(name), f"FAILED: {str(exc).splitlines()[0][:80]}"


def run_all(names: list[str]) -> Iterator[tuple[Figures, str]]:
    """The agent's scenarios, each in a directory of its own; then the control plane's, in
    one cluster and world (started only if one is asked for)."""
    for name in (n for n in names if n in AGENT):
        with tempfile.TemporaryDirectory(prefix=f"tk-chaos-{name}-") as workdir:
            yield attempt(name, functools.partial(AGENT[name], Path(workdir), detect_root()))
    control = [n for n in names if n in CONTROL]
    if not control:
        return
    with (
        tempfile.TemporaryDirectory(prefix="tk-chaos-cluster-") as workdir,
        LocalCluster(build_binaries(echo=False), Path(workdir) / "cluster") as cluster,
        control_chaos.control_world(cluster, Path(workdir) / "world") as world,
    ):
        for name in control:
            yield attempt(name, functools.partial(CONTROL[name], world))


def main() -> int:
    known = [*AGENT, *CONTROL]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", nargs="+", choices=known, default=None)
    args = parser.parse_args()
    require_root()
    table = Table(
        "chaos: faults, time to trace again, BPF programs (bpftool prog show)",
        ["scenario", "resume s", "of which ready s", "compiles", "adopted",
         f"resume <= {RESUME_GOAL_SECONDS:.0f} s", "progs before", "progs after",
         "agent holds", "leaked", "checks"],
    )  # fmt: skip
    failed = 0
    for figures, verdict in run_all(args.only or known):
        failed += verdict != "ok"
        adopted = figures.adopted if figures.compiles else "-"
        goal = "-" if figures.resume_met is None else met(figures.resume_met)
        table.add(
            figures.scenario, seconds(figures.resume_seconds), seconds(figures.ready_seconds),
            figures.compiles or "-", adopted, goal, figures.programs_before, figures.programs_after,
            figures.agent_programs or "-", figures.leaked, verdict,
        )  # fmt: skip
        table.notes += [f"{figures.scenario}: {note}" for note in figures.notes]
    table.notes.append(
        "resume: the restart (or the fault's end) to the state applied and a hit counted; "
        "ready: the restarted process's start to /readyz (its persisted state applied)"
    )
    table.notes.append(
        "compiles: of the restart, the node's claims program included; adopted: programs "
        "the killed agent left pinned that the restart took over instead of compiling"
    )
    table.notes.append(
        "agent holds: the programs the agent's fds hold at the end (its probes' and the "
        "node's 2 cgroup claims programs), checked equal to what it reports; leaked: "
        "programs and maps a dead agent held that the kernel still lists"
    )
    table.print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
