"""Shared programs in user space: shape grouping, bit allocation and reuse, mask attribution
(the maps a program gets for its bindings), through the reconciler with a fake loader."""

from __future__ import annotations

from typing import Any

from tests.unit.agent_fakes import UID_A, UID_B, FakeCgroups, FakeLoader, fake_build_plan, pod
from tracekeeper_agent.ports import FilterEntries, PodEntry
from tracekeeper_agent.programs.constants import MAX_BINDINGS, MAX_CGROUP_PATH, Flag
from tracekeeper_agent.programs.sharing import (
    Binding,
    BitTable,
    IdentitySlots,
    SlotKey,
    bits_of,
    node_tables,
    program_maps,
)
from tracekeeper_agent.reconcile.reconciler import Reconciler
from tracekeeper_api.protocol import NodeState


def test_bits_are_the_lowest_free_and_reused_only_once_released() -> None:
    table = BitTable()
    assert [table.take(f"p{i}") for i in range(3)] == [0, 1, 2]
    table.release(1)
    assert table.take("p3") == 1
    for i in range(4, MAX_BINDINGS + 1):
        table.take(f"p{i}")
    assert table.full and table.take("p65") is None


def test_identity_slots_are_kept_and_freed_slots_reused_last() -> None:
    slots = IdentitySlots(capacity=4)
    assert slots.assign([500, 600]) == {500: 1, 600: 2}
    # 500's slot is not reused while fresh ones are left (a claim may still name it).
    assert slots.assign([600, 700]) == {600: 2, 700: 3}
    assert slots.assign([600, 700, "pod-a"]) == {600: 2, 700: 3, "pod-a": 4}
    assert slots.assign([700, "pod-a", 800]) == {700: 3, "pod-a": 4, 800: 1}  # oldest freed
    assert slots.assign([700, "pod-a", 800, 900]) == {700: 3, "pod-a": 4, 800: 1, 900: 2}


def test_node_tables_put_pending_pods_whole_or_not_at_all() -> None:
    a = PodEntry("a", None, ("/k/pod-a-1", "/k/pod-a-2"))
    b = PodEntry("b", None, ("/k/pod-b-1", "/k/pod-b-2"))
    long = PodEntry("c", None, ("/" + "x" * MAX_CGROUP_PATH,))
    known = PodEntry("d", 42)
    entries = [
        FilterEntries(cgroups=frozenset({500}), pods=frozenset({a, known})),
        FilterEntries(pods=frozenset({b, long})),
    ]
    slots: dict[SlotKey, int] = {500: 1, "a": 2, "b": 3, "c": 4, "d": 5}
    tables = node_tables(entries, slots, capacity=3)
    assert tables.identity == {500: 1, 42: 5}
    # a fits; b's two paths do not fit in what is left; c's path is longer than the
    # program reads: both counted, neither half in.
    assert tables.pending == {"/k/pod-a-1": 2, "/k/pod-a-2": 2}
    assert (tables.pending_pods, tables.left_out_pods) == (1, 2)
    maps = program_maps([Binding(0, entries[0]), Binding(1, entries[1])], slots)
    assert maps.slot_masks == {1: 1, 2: 1, 5: 1, 3: 2, 4: 2}
    assert maps.flags & Flag.CGROUP


def test_bits_of_a_mask() -> None:
    assert list(bits_of(0)) == []
    assert list(bits_of(0b1010_0001)) == [0, 5, 7]
    assert list(bits_of(1 << 63)) == [63]


def test_each_binding_is_set_only_on_its_own_targets() -> None:
    slots = {500: 1, 600: 2}
    maps = program_maps(
        [
            Binding(0, FilterEntries(cgroups=frozenset({500}))),
            Binding(1, FilterEntries(cgroups=frozenset({500, 600}), comms=frozenset({"cat"}))),
            Binding(2, FilterEntries(pids=frozenset({42})), follow_children=True, sampling=3),
            Binding(3, FilterEntries(), host_wide=True, rate_limit=10),
        ],
        slots,
    )
    assert maps.slot_masks == {1: 0b11, 2: 0b10}
    assert maps.comms == {"cat": 0b10}
    assert maps.no_comm_mask == 0b1101  # every comm counts for those without processNames
    assert maps.pids == {42: 0b100} and maps.follow_mask == 0b100
    assert maps.host_mask == 0b1000
    assert maps.flags == Flag.CGROUP | Flag.COMM | Flag.PID | Flag.FOLLOW
    assert (maps.bindings[2].sampling, maps.bindings[3].rate_limit) == (3, 10)


def test_unused_filter_kinds_are_off() -> None:
    maps = program_maps([Binding(0, FilterEntries(cgroups=frozenset({500})))], {500: 1})
    assert maps.flags == Flag.CGROUP and maps.host_mask == 0


# --- through the reconciler: probes of one shape share one program --------------------------


def probe(name: str, ns: str = "team-a", uid: str = UID_A, **spec: Any) -> dict[str, Any]:
    return {
        "id": f"{ns}/{name}",
        "specHash": f"{abs(hash((name, repr(spec)))):016x}"[:16],
        "spec": {"tracepoint": "syscalls:sys_enter_openat", **spec},
        "targets": {"pods": [{**pod(uid), "namespace": ns}]},
    }


def state(revision: int, *probes: dict[str, Any]) -> NodeState:
    return NodeState.model_validate({"node": "node-1", "revision": revision, "probes": probes})


def make() -> tuple[Reconciler, FakeLoader]:
    loader = FakeLoader()
    reconciler = Reconciler(
        node="node-1",
        loader=loader,
        build_plan=fake_build_plan,
        cgroups=FakeCgroups(pods={UID_A: 500, UID_B: 600}),
        privileged_namespaces=None,
    )
    return reconciler, loader


async def test_probes_of_one_shape_share_a_program_and_keep_their_own_pods() -> None:
    reconciler, loader = make()
    report = await reconciler.apply(
        state(1, probe("opens"), probe("opens", ns="team-b", uid=UID_B))
    )
    a, b = report.probes
    assert loader.loads == 1 and a.program_ids == b.program_ids
    assert (a.shared_by, b.shared_by) == (2, 2) and a.shape == b.shape
    (program,) = loader.programs
    table = loader.identities.table
    assert program.maps.slot_masks == {table[500]: 0b01, table[600]: 0b10}
    assert program.entries_of(0).cgroups == {500} and program.entries_of(1).cgroups == {600}


async def test_other_shapes_get_other_programs() -> None:
    reconciler, loader = make()
    report = await reconciler.apply(
        state(1, probe("a"), probe("b", output={"kind": "events"}), probe("c"))
    )
    assert loader.loads == 2
    assert [p.shared_by for p in report.probes] == [2, 1, 2]


async def test_adding_removing_and_map_edits_never_reload() -> None:
    reconciler, loader = make()
    first = await reconciler.apply(state(1, probe("a")))
    ids = first.probes[0].program_ids
    edits = [
        [probe("a"), probe("b")],
        [probe("b")],
        [probe("b", sampling=10)],
        [{**probe("b", sampling=10), "targets": {"pods": [pod()], "processNames": ["nginx"]}}],
        [probe("b", output={"kind": "count", "by": ["pod"]}), probe("c")],
    ]
    for revision, probes in enumerate(edits, start=2):
        report = await reconciler.apply(state(revision, *probes))
        assert {tuple(p.program_ids) for p in report.probes} == {tuple(ids)}
    assert loader.loads == 1 and loader.closes == 0
    (program,) = loader.programs
    assert program.cleared == [0]  # a's keys went before its bit could serve c
    assert program.maps.bindings[1].sampling == 1  # b's sampling back to all


async def test_a_removed_bit_is_cleared_before_it_serves_another_probe() -> None:
    reconciler, loader = make()
    await reconciler.apply(state(1, probe("a"), probe("b")))
    await reconciler.apply(state(2, probe("b"), probe("c")))
    (program,) = loader.programs
    assert program.cleared == [0]
    assert program.entries_of(0).cgroups == {500}  # c took bit 0, after the clear
    ops = [op for op, _, _ in loader.log]
    assert ops.count("load") == 1


async def test_a_65th_probe_opens_a_second_program_of_the_shape() -> None:
    reconciler, loader = make()
    report = await reconciler.apply(state(1, *[probe(f"p{i}") for i in range(65)]))
    assert loader.loads == 2
    assert sorted({p.shared_by for p in report.probes}) == [1, 64]
    assert {p.state for p in report.probes} == {"Loaded"}


async def test_a_shape_change_moves_the_binding_new_first() -> None:
    reconciler, loader = make()
    await reconciler.apply(state(1, probe("a"), probe("b")))
    await reconciler.apply(state(2, probe("a", output={"kind": "events"}), probe("b")))
    old, new = loader.programs
    assert not old.closed and new.entries_of(0).cgroups == {500}
    log = [(op, shape) for op, shape, _ in loader.log]
    # The new program is loaded and filled before the old binding's bit is cleared.
    old_removed = max(i for i, e in enumerate(log) if e == ("update", old.plan.shape))
    assert log.index(("load", new.plan.shape)) < old_removed
    assert log.index(("update", new.plan.shape)) < old_removed
    assert old.cleared == [0] and old.entries_of(1).cgroups == {500}


async def test_the_last_binding_closes_the_program() -> None:
    reconciler, loader = make()
    await reconciler.apply(state(1, probe("a"), probe("b")))
    await reconciler.apply(state(2))
    assert loader.closes == 1 and reconciler.programs() == 0
    assert loader.identities.table == {}
