"""Address fields: a tenant's events probe may not capture them (NotPermitted naming the field).

The formats are the kernel's own (tests/unit/tracefs, copied from a 6.18 kernel):
kmem:kmalloc has a `const void * ptr` (a pointer) and an `unsigned long call_site` that
only its print fmt (`%pS`) shows to be an address; syscalls:sys_enter_openat's
`const char * filename` is a user pointer read as a string (allowed);
sched:sched_process_exec's filename is a `__data_loc char[]` (allowed)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.unit.test_program_builder import CTX, TRACEFS
from tracekeeper_agent.host.tracefs import (
    FieldKind,
    parse_format,
    read_format,
    tenant_field_refusal,
)
from tracekeeper_agent.ports import LoadFailure
from tracekeeper_agent.programs.builder import build_plan
from tracekeeper_api.protocol import ProbeAssignment

PRIVILEGED = dataclasses.replace(CTX, privileged=True)


def events(tracepoint: str, *fields: str, ns: str = "team-a") -> ProbeAssignment:
    spec: dict[str, Any] = {
        "tracepoint": tracepoint,
        "output": {"kind": "events", "fields": list(fields)},
    }
    return ProbeAssignment.model_validate({"id": f"{ns}/probe", "specHash": "0" * 16, "spec": spec})


def refusal(tracepoint: str, name: str) -> str | None:
    fmt = read_format(tracepoint, tracefs=TRACEFS)
    f = fmt.field(name)
    assert f is not None
    return tenant_field_refusal(fmt, f)


def test_kmalloc_addresses_are_known_from_the_type_and_from_the_print_fmt() -> None:
    fmt = read_format("kmem:kmalloc", tracefs=TRACEFS)
    ptr, call_site = fmt.field("ptr"), fmt.field("call_site")
    assert ptr is not None and ptr.kind is FieldKind.POINTER
    # Declared an integer: only `(void *)REC->call_site` under %pS says it is an address.
    assert call_site is not None and call_site.kind is FieldKind.INTEGER
    assert fmt.printed_as_addresses == {"call_site", "ptr"}


@pytest.mark.parametrize(
    ("tracepoint", "name", "why"),
    [
        ("kmem:kmalloc", "ptr", "is a pointer: captured as a number it is a kernel address"),
        ("kmem:kmalloc", "call_site", "holds an address"),
    ],
)
def test_address_fields_are_refused_for_tenants(tracepoint: str, name: str, why: str) -> None:
    message = refusal(tracepoint, name)
    assert message is not None and why in message
    assert f"field {name!r} of {tracepoint}" in message
    with pytest.raises(LoadFailure) as exc:
        build_plan(events(tracepoint, "bytes_req", name), CTX)
    assert (exc.value.state, exc.value.reason) == ("Failed", "NotPermitted")
    assert f"field {name!r} of {tracepoint}" in exc.value.message
    # A privileged namespace's probe captures it (as the number it is).
    plan = build_plan(events(tracepoint, name, ns="tracekeeper-system"), PRIVILEGED)
    assert [(f.name, f.kind) for f in plan.event_fields] == [(name, "uint")]


@pytest.mark.parametrize(
    ("tracepoint", "name"),
    [
        ("syscalls:sys_enter_openat", "filename"),  # const char *: read as a user string
        ("syscalls:sys_enter_openat", "dfd"),
        ("sched:sched_process_exec", "filename"),  # __data_loc char[]
        ("sched:sched_process_exec", "pid"),
        ("kmem:kmalloc", "bytes_req"),
    ],
)
def test_integers_and_strings_stay_allowed_for_tenants(tracepoint: str, name: str) -> None:
    assert refusal(tracepoint, name) is None


def test_a_tenant_still_captures_openat_filenames_as_user_strings() -> None:
    plan = build_plan(events("syscalls:sys_enter_openat", "filename", "flags"), CTX)
    assert [(f.name, f.kind) for f in plan.event_fields] == [
        ("filename", "str"),
        ("flags", "int"),
    ]
    assert "bpf_probe_read_user_str(e->f_filename" in plan.source


SYSCALL_POINTER = """\
name: sys_enter_newstat
ID: 9
format:
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:const char * filename;\toffset:16;\tsize:8;\tsigned:0;
\tfield:struct stat * statbuf;\toffset:24;\tsize:8;\tsigned:0;

print fmt: "filename: 0x%08lx, statbuf: 0x%08lx", ((unsigned long)(REC->filename)), \
((unsigned long)(REC->statbuf))
"""

KERNEL_STRING_POINTER = """\
name: oddity
ID: 10
format:
\tfield:const char * name;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * data;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long fn;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned long len;\toffset:32;\tsize:8;\tsigned:0;

print fmt: "name=%s data=%p fn=%ps len=%*lu %%p %pI4", REC->name, REC->data, \
(void *)REC->fn, 4, REC->len, REC->data
"""


def test_pointer_kinds_outside_the_fixtures() -> None:
    stat = parse_format(SYSCALL_POINTER, category="syscalls")
    fields = {f.name: f for f in stat.fields}
    assert tenant_field_refusal(stat, fields["filename"]) is None
    message = tenant_field_refusal(stat, fields["statbuf"])
    assert message is not None and "an address in the task" in message
    odd = parse_format(KERNEL_STRING_POINTER, category="x")
    fields = {f.name: f for f in odd.fields}
    # %*lu takes the width from an argument; %% is no conversion; %pI4 formats what it
    # points to (not an address): only data (%p) and fn (%ps) are printed as addresses.
    assert odd.printed_as_addresses == {"data", "fn"}
    assert "pointer into kernel memory" in (tenant_field_refusal(odd, fields["name"]) or "")
    assert tenant_field_refusal(odd, fields["fn"]) is not None
    assert tenant_field_refusal(odd, fields["len"]) is None
