"""tracefs on this machine: the formats the program builder validates against."""

from __future__ import annotations

import pytest

from tracekeeper_agent.host.tracefs import (
    FieldKind,
    TracepointField,
    TracepointNotFound,
    find_tracefs,
    parse_format,
    read_format,
    tracepoint_exists,
)
from tracekeeper_agent.ports import LoadFailure
from tracekeeper_agent.programs.builder import Planner, build_plan
from tracekeeper_api.protocol import ProbeAssignment


def int_type(f: TracepointField) -> str | None:
    """The fixed-width type of an integer field as stored (s32, u64...), else None."""
    if f.kind is not FieldKind.INTEGER:
        return None
    return f"{'s' if f.signed else 'u'}{f.size * 8}"


pytestmark = pytest.mark.kernel


def test_openat_filename_is_a_user_string_pointer() -> None:
    fmt = read_format("syscalls:sys_enter_openat")
    assert fmt.user_pointers
    filename = fmt.field("filename")
    assert filename is not None
    assert (filename.kind, filename.size) == (FieldKind.STRING_POINTER, 8)
    assert [f.name for f in fmt.payload_fields] == [
        "__syscall_nr",
        "dfd",
        "filename",
        "flags",
        "mode",
    ]
    flags = fmt.field("flags")
    assert flags is not None
    assert flags.kind is FieldKind.INTEGER


def test_exec_filename_is_a_data_loc_string() -> None:
    fmt = read_format("sched:sched_process_exec")
    assert not fmt.user_pointers
    filename = fmt.field("filename")
    assert filename is not None
    assert (filename.kind, filename.size) == (FieldKind.DATA_LOC_STRING, 4)
    pid = fmt.field("pid")
    assert pid is not None
    assert int_type(pid) == "s32"


def test_every_format_on_this_kernel_parses() -> None:
    events = find_tracefs() / "events"
    formats = sorted(events.glob("*/*/format"))
    assert len(formats) > 1000
    for path in formats:
        fmt = parse_format(path.read_text(), category=path.parent.parent.name)
        assert fmt.name == path.parent.name
        assert fmt.fields, path


def test_exists() -> None:
    assert tracepoint_exists("sched:sched_switch")
    assert not tracepoint_exists("sched:no_such_event")
    with pytest.raises(TracepointNotFound, match="no tracepoint nope:nope"):
        read_format("nope:nope")


def _kmalloc_events(ns: str, field: str) -> ProbeAssignment:
    return ProbeAssignment.model_validate({
        "id": f"{ns}/allocs", "specHash": "0" * 16,
        "spec": {"tracepoint": "kmem:kmalloc", "output": {"kind": "events", "fields": [field]}},
    })  # fmt: skip


@pytest.mark.parametrize("field", ["ptr", "call_site"])
def test_this_kernels_kmalloc_addresses_are_not_permitted_for_tenants(field: str) -> None:
    # The agent's own planner: privileged is decided by the probe's namespace.
    planner = Planner(privileged_namespaces=frozenset({"tracekeeper-system"}))
    with pytest.raises(LoadFailure) as exc:
        planner.build(_kmalloc_events("team-a", field))
    assert exc.value.reason == "NotPermitted" and f"field {field!r} of kmem:kmalloc" in (
        exc.value.message
    )
    plan = planner.build(_kmalloc_events("tracekeeper-system", field))
    assert [f.name for f in plan.event_fields] == [field]
    # Standalone mode (no context, the host's root user's own file) may capture it too.
    assert [f.name for f in build_plan(_kmalloc_events("team-a", field)).event_fields] == [field]
