"""The churn soak at full size (`make reliability`, section `churn`): 10,000 pod events over
10 namespaces and 4 nodes with TraceFilter edits interleaved, against the real apiserver,
the operator and real agents; then every node's maps are read from the kernel and compared
with the desired state (sim/tracekeeper_sim/churn.py). The e2e tier runs it at 400 events.

    .venv/bin/python -m reliability.churn [--events N] [--seed S]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.common import Table, require_root

from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.churn import FULL_SIZE, Churn, ChurnReport, soak
from tracekeeper_sim.local_cluster import LocalCluster, build_binaries
from tracekeeper_sim.world import World

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_GOAL_MS = 10.0


def run(events: int, seed: int) -> tuple[ChurnReport, set[str], Churn]:
    """The soak, then what the kernel still lists of the agents' programs and maps."""
    bin_dir = build_binaries(echo=False)
    with tempfile.TemporaryDirectory(prefix="tk-churn-") as tmp:
        workdir = Path(tmp)
        with LocalCluster(bin_dir, workdir / "cluster") as cluster:
            cluster.apply_crds(ROOT / "crds")
            world = World(cluster, workdir, detect_root())
            churn = Churn(world, replace(FULL_SIZE, events=events), seed)
            try:
                world.start_operator()
                report = soak(churn)
            finally:
                world.close()
            return report, churn.leftovers(), churn


def table(report: ChurnReport, leaked: set[str], churn: Churn, seed: int) -> tuple[Table, bool]:
    size = churn.size
    t = Table(f"churn soak (seed {seed})", ["figure", "value", "goal", "met"])
    ok = report.converged_after is not None and not report.mismatches
    t.add("nodes x namespaces x probes", f"{size.nodes} x {size.namespaces} x 2", "", "")
    t.add(
        "pod events (creates + deletes)",
        report.pod_events,
        ">= 10,000",
        _met(report.pod_events >= 10_000),
    )
    t.add("TraceFilter edits", report.filter_edits, "", "")
    t.add("events per second", f"{report.pod_events / max(report.seconds, 1e-9):.1f}", "", "")
    conv = "never" if report.converged_after is None else f"{report.converged_after:.2f} s"
    t.add(
        "maps as desired after the last event", conv, "", _met(report.converged_after is not None)
    )
    t.add(
        "final map mismatches (from the kernel)",
        len(report.mismatches),
        "0",
        _met(not report.mismatches),
    )
    t.add(
        "program ids changed (no spec changed)",
        len(report.programs_changed),
        "0",
        _met(not report.programs_changed),
    )
    t.add(
        "programs + maps left after the agents stopped",
        len(leaked),
        "0",
        _met(not leaked),
    )
    ms = report.operator_cpu_ms_per_event
    t.add(
        "operator CPU per pod event, at this size",
        f"{ms:.1f} ms",
        f"<= {OPERATOR_GOAL_MS:.0f} ms",
        _met(ms <= OPERATOR_GOAL_MS),
    )
    for proc, before in report.rss_before.items():
        after = report.rss_after.get(proc, 0)
        t.add(
            f"RSS {proc}",
            f"{before / 1024:.0f} -> {after / 1024:.0f} MiB ({after / max(before, 1):.2f}x)",
            "",
            "",
        )
    t.notes += [f"mismatch: {m}" for m in report.mismatches[:10]]
    t.notes += [f"program changed: {c}" for c in report.programs_changed[:10]]
    t.notes += [f"left after the agents stopped: {x}" for x in sorted(leaked)[:10]]
    t.notes.append(
        "operator CPU is its user + system time over the churn divided by the pod events "
        "(status writes, Events and pushes included); the soak's own API calls are not in it. "
        "The goal's size, 5,000 pods x 500 probes, is bench/operator_events'"
    )
    return t, ok and not leaked and not report.programs_changed


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=FULL_SIZE.events)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    require_root()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    report, leaked, churn = run(args.events, seed)
    t, ok = table(report, leaked, churn, seed)
    t.print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
