"""Kernel tier for the batch ring reader: records read from a real BPF ring buffer through
its mmap (poll_batch) decode and encode exactly as through BCC's per-record callback
(poll_events), for every field kind: strings, signed and unsigned integers, the latency
pair of a syscall probe."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.conftest import bind, run_in_cgroup
from tests.kernel.test_probe_kinds import PY, assignment, load
from tracekeeper_agent.bpf.loader import BccProgram
from tracekeeper_agent.host.event_records import EventBatch
from tracekeeper_agent.outputs.event_encoding import BatchEncoder
from tracekeeper_agent.outputs.events import encode, enrich
from tracekeeper_agent.ports import FilterEntries, PodIdentity, RawEvent
from tracekeeper_agent.targets.cgroups import cgroup_id
from tracekeeper_sim.kubelet import create_cgroup

pytestmark = pytest.mark.kernel


class OnePod:
    def __init__(self, cgroup: int) -> None:
        self.cgroup = cgroup

    def identify(self, cgroup: int) -> PodIdentity | None:
        return PodIdentity("t", "p", "c1") if cgroup == self.cgroup else None


@pytest.fixture
def container(cgroup_sandbox: Path) -> Path:
    create_cgroup(cgroup_sandbox / "p")
    create_cgroup(cgroup_sandbox / "p" / "c1")
    return cgroup_sandbox / "p" / "c1"


def both_paths(
    loaded: list[BccProgram], container: Path, spec: dict[str, Any], code: str
) -> tuple[list[RawEvent], EventBatch]:
    """The workload's records read from the real ring in one batch through the mmap, and
    each of the same records decoded by today's per-record path (BCC's struct of the
    compiled source, BccProgram._on_event: what ring_buffer_poll's callback runs)."""
    program = load(loaded, assignment(spec))
    bind(program, FilterEntries(cgroups=frozenset({cgroup_id(container.parent)})))
    run_in_cgroup(container, PY, "-S", "-c", code)
    batch = program.poll_batch(500, 100_000)
    for record in batch.records:
        raw = record.tobytes()
        program._on_event(None, ctypes.create_string_buffer(raw, len(raw)), len(raw))
    events, program._pending = program._pending, []
    assert program.poll_batch(0, 100_000).records.size == 0  # the batch took them all
    return events, batch


def assert_same(events: list[RawEvent], batch: EventBatch, cgroup: int) -> None:
    assert events, "the workload produced no event"
    assert batch.to_raw() == events
    offset = 1_700_000_000_000_000_000
    attributor = OnePod(cgroup)
    lines = BatchEncoder("t/probe", batch.layout, attributor).encode(batch.records, offset)
    assert lines.decode() == "".join(
        encode(enrich("t/probe", e, attributor, offset)) for e in events
    )


def test_strings_and_integers_decode_as_the_per_record_path(
    loaded: list[BccProgram], container: Path
) -> None:
    spec = {
        "tracepoint": "syscalls:sys_enter_openat",
        "output": {"kind": "events", "fields": ["filename", "flags", "dfd", "mode"]},
    }
    names = ["/tmp/tk-ring-é", '/tmp/tk-"quoted"\\', "/tmp/" + "x" * 300, ""]
    code = "import os\n" + "".join(
        f"try: os.open({n!r}, os.O_RDONLY)\nexcept OSError: pass\n" for n in names * 50
    )
    events, batch = both_paths(loaded, container, spec, code)
    assert_same(events, batch, cgroup_id(container))
    filenames = {e.fields["filename"] for e in events}
    assert {"/tmp/tk-ring-é", '/tmp/tk-"quoted"\\'} <= filenames
    assert any(e.fields["dfd"] == -100 for e in events)  # a negative signed field


def test_the_latency_pair_decodes_as_the_per_record_path(
    loaded: list[BccProgram], container: Path
) -> None:
    spec = {"syscall": {"name": "getppid", "latency": True}, "output": {"kind": "events"}}
    code = "import os\nfor _ in range(3000): os.getppid()"
    events, batch = both_paths(loaded, container, spec, code)
    assert len(events) == 3000
    assert all(int(e.fields["latency_ns"]) > 0 for e in events)
    assert_same(events, batch, cgroup_id(container))
