"""A probe's cost: the kernel's accounting split among the bindings, summed on status."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from tests.unit.output_fakes import FakeProgram, ListBoard, make_probe
from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.outputs.cost import CostLedger, ProgramUsage, split_usage
from tracekeeper_agent.ports import KernelCounters, ObjectUsage
from tracekeeper_api.output import NodeDetail, ProbeNodes
from tracekeeper_api.output_text import bytes_text, cost_text, nodes_text
from tracekeeper_api.protocol import ProbeCost
from tracekeeper_api.status import ProbeCostStatus
from tracekeeper_operator.costs import refreshed_cost, summed_cost
from tracekeeper_operator.status_folding import NodeOutcome

IDENTITY = ObjectUsage("map", 99, 900)
"""The node-wide identity table: every program holds it."""


def test_each_object_is_split_among_the_bindings_of_every_program_holding_it() -> None:
    shared = ProgramUsage(
        [ObjectUsage("prog", 1, 1000, 600, 6), ObjectUsage("map", 10, 2000), IDENTITY],
        ["p1", "p2"],
    )
    alone = ProgramUsage([ObjectUsage("prog", 2, 500, 300, 3), IDENTITY], ["p3"])
    shares = split_usage([shared, alone], {})
    assert shares.memory == {"p1": 500 + 1000 + 300, "p2": 500 + 1000 + 300, "p3": 500 + 300}
    assert sum(shares.memory.values()) == 1000 + 2000 + 900 + 500  # nothing lost or doubled
    assert shares.run_ns == {"p1": 300, "p2": 300, "p3": 300}
    assert shares.runs == {"p1": 3, "p2": 3, "p3": 3}
    assert shares.seen == {1: (600, 6), 2: (300, 3)}


def test_run_time_is_split_since_the_previous_reading_and_restarts_after_a_reset() -> None:
    prog = [ObjectUsage("prog", 1, 0, 1500, 15)]
    assert split_usage([ProgramUsage(prog, ["a"])], {1: (1000, 10)}).run_ns == {"a": 500}
    # Counts below what was seen: statistics were switched off and on again.
    assert split_usage([ProgramUsage(prog, ["a"])], {1: (9000, 90)}).run_ns == {"a": 1500}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _on(program: FakeProgram, probe_id: str, bit: int) -> ActiveProbe:
    return dataclasses.replace(make_probe(probe_id, program), bit=bit)


def test_a_probe_totals_only_grow_when_another_joins_its_program() -> None:
    program = FakeProgram()
    probes = [_on(program, "team-a/p1", 0)]
    ledger = CostLedger(ListBoard(lambda: probes), clock=Clock())
    program.objects = [ObjectUsage("prog", 7, 4000, 1000, 10)]
    assert ledger.read()["team-a/p1"].run_time_ns == 1000
    probes.append(_on(program, "team-b/p2", 1))  # a second tenant's probe of the same shape
    program.objects = [ObjectUsage("prog", 7, 4000, 2000, 20)]
    costs = ledger.read()
    assert costs["team-a/p1"].run_time_ns == 1500  # it had the first 1000 ns alone
    assert costs["team-b/p2"].run_time_ns == 500
    assert costs["team-a/p1"].kernel_memory_bytes == costs["team-b/p2"].kernel_memory_bytes == 2000
    probes.pop(0)
    program.objects = [ObjectUsage("prog", 7, 4000, 2400, 24)]
    assert ledger.read() == {"team-b/p2": ProbeCost(
        run_time_ns=900, runs=9, kernel_memory_bytes=4000)}  # fmt: skip


def test_rates_are_taken_over_a_window_not_from_one_reading() -> None:
    clock = Clock()
    program = FakeProgram(counters=KernelCounters(matched=0))
    probes = [_on(program, "team-a/p1", 0)]
    ledger = CostLedger(ListBoard(lambda: probes), clock=clock, window=10.0)
    program.objects = [ObjectUsage("prog", 7, 4000, 0, 0)]
    first = ledger.read()["team-a/p1"]
    assert first.ns_per_run is None and first.matched_per_second is None
    clock.now += 4.0  # too soon: no rates yet
    program.objects = [ObjectUsage("prog", 7, 4000, 100_000, 1000)]
    assert ledger.read()["team-a/p1"].ns_per_run is None
    clock.now += 6.0
    program.counters = KernelCounters(matched=50)
    program.objects = [ObjectUsage("prog", 7, 4000, 250_000, 2000)]
    cost = ledger.read()["team-a/p1"]
    assert cost.ns_per_run == 125.0
    assert cost.matched_per_second == 5.0
    assert cost.events_per_second == 0.0
    clock.now += 1.0  # within the next window: the last rates stay
    assert ledger.read()["team-a/p1"].ns_per_run == 125.0


def test_a_closed_program_is_left_out_of_the_reading() -> None:
    class Closed(FakeProgram):
        def kernel_objects(self) -> list[ObjectUsage]:
            raise ValueError("closed")

    probes = [_on(Closed(), "team-a/gone", 0), _on(FakeProgram(), "team-a/kept", 0)]
    assert list(CostLedger(ListBoard(lambda: probes)).read()) == ["team-a/kept"]


# --- on status -----------------------------------------------------------------------------

T0 = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def _loaded(node: str, cost: ProbeCost | None) -> NodeOutcome:
    return NodeOutcome(node, "Loaded", "Loaded", cost=cost)


def test_status_sums_the_nodes_and_takes_the_mean_over_every_run() -> None:
    outcomes = [
        _loaded(
            "n1",
            ProbeCost(run_time_ns=3000, runs=10, kernel_memory_bytes=100, matched_per_second=2.0),
        ),
        _loaded("n2", ProbeCost(run_time_ns=1000, runs=30, kernel_memory_bytes=50)),
        _loaded("n3", None),  # an agent that predates costs
        NodeOutcome("n4", "Failed", "AttachFailed"),
    ]
    assert summed_cost(outcomes, T0) == ProbeCostStatus(
        ns_per_call=100.0,
        kernel_memory_bytes=150,
        matched_per_second=2.0,
        nodes=2,
        updated_at="2026-12-02T12:00:00Z",
    )
    assert summed_cost([_loaded("n1", ProbeCost())], T0).ns_per_call is None  # type: ignore[union-attr]
    assert summed_cost([NodeOutcome("n1", "Pending", "NodesPending")], T0) is None


def test_status_cost_is_refreshed_once_per_interval() -> None:
    first = [_loaded("n1", ProbeCost(run_time_ns=100, runs=1, kernel_memory_bytes=10))]
    stored = refreshed_cost(first, None, T0, 60.0)
    assert stored is not None and stored.ns_per_call == 100.0
    later = [_loaded("n1", ProbeCost(run_time_ns=300, runs=2, kernel_memory_bytes=10))]
    assert refreshed_cost(later, stored, T0 + timedelta(seconds=59), 60.0) is stored
    fresh = refreshed_cost(later, stored, T0 + timedelta(seconds=60), 60.0)
    assert fresh is not None and fresh.ns_per_call == 150.0
    # A node more: summed anew at once (the sum follows the placement).
    two = [*later, _loaded("n2", ProbeCost(run_time_ns=100, runs=1, kernel_memory_bytes=5))]
    grown = refreshed_cost(two, stored, T0 + timedelta(seconds=1), 60.0)
    assert grown is not None and grown.nodes == 2 and grown.kernel_memory_bytes == 15
    # Loaded nowhere any more: no cost, at once.
    assert refreshed_cost([], stored, T0 + timedelta(seconds=1), 60.0) is None


def test_the_plugin_prints_the_cost_in_one_line_and_per_node() -> None:
    cost = ProbeCostStatus(
        ns_per_call=253.6,
        kernel_memory_bytes=10_662_688,
        matched_per_second=3.2,
        nodes=2,
        updated_at="2026-12-02T17:40:12Z",
    )
    assert cost_text(cost) == (
        "COST: 254 ns per call, 10.2 MiB kernel memory, 3.2 matched/s "
        "(over 2 nodes, read at 2026-12-02T17:40:12Z)\n"
    )
    unknown = cost.model_copy(update={"ns_per_call": None, "matched_per_second": None})
    assert "ns per call unknown" in cost_text(unknown)
    assert [bytes_text(n) for n in (512, 1536, 5 << 20)] == ["512 B", "1.5 KiB", "5.0 MiB"]
    nodes = ProbeNodes(
        probe="shop/opens",
        nodes=[
            NodeDetail(
                node="n1", state="Loaded", cost=ProbeCost(ns_per_run=99.6, kernel_memory_bytes=2048)
            ),
            NodeDetail(node="n2", state="Pending"),
        ],
    )
    lines = nodes_text(nodes).splitlines()
    assert lines[0].split()[-4:] == ["NS/CALL", "KERNEL", "MEM", "KERNEL"]
    assert "100" in lines[1].split() and "2.0 KiB" in lines[1]
    assert lines[2].split()[-3:] == ["-", "-", "-"]
