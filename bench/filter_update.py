"""Live filter update vs reload.

A real count program (program_builder.build_plan + BccLoader, tracepoint
syscalls:sys_enter_getppid, pod targets: the cgroup filter) is loaded once; then 1, 100 and
10 000 cgroup entries are applied as the reconciler does for a probe alone in its program:
the node-wide identity table (one BPF_MAP_UPDATE_BATCH of what changed), then the program's
maps (slot masks, config with a new generation); and with the per-element fallback the same
code takes when the kernel refuses batch operations (forced here by handing maps.write_diff
a table whose batch calls fail). 'insert' fills an
empty map; 'replace' swaps every entry for another set (N deletes + N inserts). The
alternative to a live update is a reload: build_plan + compile + load + attach.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import functools
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from bench.common import (
    Spread,
    Table,
    bench_loader,
    fill_alone,
    met,
    ms,
    profile_table,
    require_root,
)
from tracekeeper_agent.bpf.loader import BccProgram
from tracekeeper_agent.bpf.maps import write_diff
from tracekeeper_agent.ports import FilterEntries
from tracekeeper_agent.programs.builder import build_plan
from tracekeeper_agent.programs.constants import MAX_IDENTITIES
from tracekeeper_agent.programs.sharing import Binding, program_maps
from tracekeeper_api.protocol import ProbeAssignment

SIZES = (1, 100, 10_000)
GOAL_ENTRIES = 10_000
GOAL_SECONDS = 0.020
GOAL_RATIO = 100.0


class BatchRefusingTable:
    """A BCC table whose batch operations fail, as on kernels without them: write_diff then
    writes element by element. Everything else goes to the real table."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self.Key = table.Key
        self.Leaf = table.Leaf

    def items(self) -> Any:
        return self._table.items()

    def items_update_batch(self, *_: object) -> None:
        raise OSError("batch operations refused (bench: forcing the per-element path)")

    def items_delete_batch(self, *_: object) -> None:
        raise OSError("batch operations refused (bench: forcing the per-element path)")

    def __setitem__(self, key: Any, value: Any) -> None:
        self._table[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._table[key]


def batch_update(program: BccProgram, entries: FilterEntries) -> None:
    fill_alone(program, entries)


def per_element_update(program: BccProgram, entries: FilterEntries) -> None:
    """The identity table's writes with batch operations refused, then the program's maps."""
    identities = bench_loader().identities
    slots = {cgid: slot for slot, cgid in enumerate(sorted(entries.cgroups), start=1)}
    # The bench reaches into the identity table on purpose: its real table, batches refused.
    table = BatchRefusingTable(identities._table)
    write_diff(table, identities._written, slots, key_of=ctypes.c_ulonglong)
    identities._written = slots
    binding = Binding(0, entries)
    program.update_maps(program_maps([binding], slots))


def assignment() -> ProbeAssignment:
    return ProbeAssignment.model_validate(
        {
            "id": "bench/filter",
            "specHash": "f" * 16,
            "spec": {"tracepoint": "syscalls:sys_enter_getppid", "output": {"by": ["pod"]}},
            "targets": {"pods": [{"uid": str(uuid.uuid4()), "namespace": "bench", "name": "p"}]},
        }
    )


def entry_sets(n: int, rng: random.Random) -> Iterator[FilterEntries]:
    """Endless distinct sets of n cgroup ids (ids need not exist to be map keys)."""
    while True:
        yield FilterEntries(cgroups=frozenset(rng.getrandbits(63) | 1 for _ in range(n)))


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def map_size(program: BccProgram) -> int:
    return len(bench_loader().identities._table)


def profile_updates(program: BccProgram, sets: Iterator[FilterEntries]) -> list[Table]:
    """cProfile of one batch insert and one batch replace of GOAL_ENTRIES entries."""
    tables = []
    batch_update(program, FilterEntries())
    for what in ("insert", "replace"):
        entries = next(sets)
        profile = cProfile.Profile()
        profile.enable()
        batch_update(program, entries)
        profile.disable()
        tables.append(
            profile_table(
                f"profile: map update, batch {what} of {GOAL_ENTRIES:,} entries",
                profile,
                top=8,
                per=("entry", GOAL_ENTRIES),
            )
        )
    return tables


def run(reps: int, reloads: int) -> list[Table]:
    rng = random.Random(7)
    loader = bench_loader()
    reload_times = []
    for _ in range(reloads):
        started = time.perf_counter()
        plan = build_plan(assignment())
        fresh = loader.load(plan)
        reload_times.append(time.perf_counter() - started)
        fresh.close()
    reload = Spread.of(reload_times)

    program = loader.load(build_plan(assignment()))
    ids = program.program_ids
    empty = FilterEntries()
    rows: list[tuple[int, dict[str, Spread]]] = []
    checks: list[str] = []
    try:
        for n in SIZES:
            sets = entry_sets(n, rng)
            results: dict[str, list[float]] = {}
            appliers: list[tuple[str, Callable[[FilterEntries], None]]] = [
                ("batch", functools.partial(batch_update, program)),
                ("per-element", functools.partial(per_element_update, program)),
            ]
            for name, apply in appliers:
                inserts, replaces = [], []
                for _ in range(reps):
                    batch_update(program, empty)
                    first, second = next(sets), next(sets)
                    inserts.append(timed(functools.partial(apply, first)))
                    replaces.append(timed(functools.partial(apply, second)))
                    if map_size(program) != n:
                        checks.append(f"{name} {n}: map holds {map_size(program)}")
                results[f"{name} insert"] = inserts
                results[f"{name} replace"] = replaces
            rows.append((n, {k: Spread.of(v) for k, v in results.items()}))
        profiles = profile_updates(program, entry_sets(GOAL_ENTRIES, rng))
        batch_update(program, empty)
        unchanged = program.program_ids == ids
    finally:
        program.close()

    table = Table(
        f"live filter update vs reload (median of {reps}; reload: median of {reloads})",
        [
            "entries",
            "batch insert ms",
            "batch replace ms",
            "per-elem insert ms",
            "per-elem replace ms",
            "reload ms",
            "reload / batch insert",
            "goal",
            "met?",
        ],
    )
    for n, s in rows:
        batch = s["batch insert"].median
        ratio = reload.median / batch
        goal = ok = ""
        if n == GOAL_ENTRIES:
            goal = f"<= {ms(GOAL_SECONDS, 0)} ms, >= {GOAL_RATIO:.0f}x"
            ok = met(batch <= GOAL_SECONDS and ratio >= GOAL_RATIO)
        table.add(
            f"{n:,}",
            ms(s["batch insert"].median, 3),
            ms(s["batch replace"].median, 3),
            ms(s["per-element insert"].median, 3),
            ms(s["per-element replace"].median, 3),
            ms(reload.median, 1),
            f"{ratio:,.0f}x",
            goal,
            ok,
        )
    table.notes += [
        "update = read the map's current entries, delete the stale ones, write the "
        "changed ones, bump the generation; 'replace' swaps all N entries for N others",
        f"reload = build_plan + BCC compile + load + attach of the same probe "
        f"(min {ms(reload.low, 0)}, max {ms(reload.high, 0)} ms); the agent would also fill "
        "the new program's map and close the old one",
        f"program ids unchanged across all {reps * len(SIZES) * 4} updates: "
        f"{'yes' if unchanged else 'NO'}; map size checked after every update: "
        f"{'all as expected' if not checks else '; '.join(checks)}",
        f"the identity table holds at most {MAX_IDENTITIES:,} cgroups (MAX_IDENTITIES)",
    ]
    return [table, *profiles]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--reloads", type=int, default=5)
    args = parser.parse_args()
    require_root()
    for table in run(args.reps, args.reloads):
        table.print()


if __name__ == "__main__":
    main()
