"""USDT notes and arguments: parsing, the C that reads them, what changes a program."""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_program_builder import KERNEL, assignment
from tracekeeper_agent.host.elf_symbols import NotAnElf
from tracekeeper_agent.host.kernel_features import FeatureCheck
from tracekeeper_agent.host.rootfs import open_root
from tracekeeper_agent.host.usdt_notes import (
    Constant,
    LoadSegment,
    Memory,
    Register,
    UsdtArg,
    UsdtNote,
    UsdtProbeNotFound,
    parse_arg,
    parse_note,
    sites_of,
)
from tracekeeper_agent.ports import LoadFailure, TargetRoot
from tracekeeper_agent.programs.builder import Planner, build_plan
from tracekeeper_agent.programs.kinds import BuildContext
from tracekeeper_agent.programs.kinds.usdt import captured_args, read_arg
from tracekeeper_api.protocol import ProbeTargets

ARGS: list[tuple[str, UsdtArg]] = [
    ("-4@%eax", UsdtArg(4, True, Register("ax"), "-4@%eax")),
    ("8@%rdi", UsdtArg(8, False, Register("di"), "8@%rdi")),
    ("1@%r8b", UsdtArg(1, False, Register("r8"), "1@%r8b")),
    ("-2@%si", UsdtArg(2, True, Register("si"), "-2@%si")),
    ("-8@-24(%rbp)", UsdtArg(8, True, Memory("bp", -24), "-8@-24(%rbp)")),
    ("4@112(%rsp)", UsdtArg(4, False, Memory("sp", 112), "4@112(%rsp)")),
    ("8@(%rax)", UsdtArg(8, False, Memory("ax", 0), "8@(%rax)")),
    ("8@0x10(%rax,%rbx,8)", UsdtArg(8, False, Memory("ax", 16, "bx", 8), "8@0x10(%rax,%rbx,8)")),
    ("-2@$-3", UsdtArg(2, True, Constant(-3), "-2@$-3")),
    ("4@$0x10", UsdtArg(4, False, Constant(16), "4@$0x10")),
    # Not readable from pt_regs: a symbol (rip-relative), a vector register, bits 8-15, a
    # segment; a float's size; no size at all.
    ("8@counter(%rip)", UsdtArg(8, False, None, "8@counter(%rip)")),
    ("8@8(%rip)", UsdtArg(8, False, None, "8@8(%rip)")),
    ("8@%xmm0", UsdtArg(8, False, None, "8@%xmm0")),
    ("1@%ah", UsdtArg(1, False, None, "1@%ah")),
    ("8@%fs:40", UsdtArg(8, False, None, "8@%fs:40")),
    ("8f@%xmm1", UsdtArg(8, False, None, "8f@%xmm1")),
    ("%eax", UsdtArg(8, False, None, "%eax")),
]


@pytest.mark.parametrize(("text", "expected"), ARGS, ids=[a[0] for a in ARGS])
def test_arguments_parse_to_what_bpf_can_read(text: str, expected: UsdtArg) -> None:
    assert parse_arg(text) == expected


def test_operands_of_other_machines_are_not_captured() -> None:
    assert parse_arg("-4@x0", "EM_AARCH64") == UsdtArg(4, True, None, "-4@x0")


def test_reading_an_argument_extends_it_by_its_size_and_sign() -> None:
    assert read_arg(parse_arg("-4@%eax")) == "(s64)(s32)ctx->ax"
    assert read_arg(parse_arg("1@%dl")) == "(u64)(u8)ctx->dx"
    assert read_arg(parse_arg("-2@$-3")) == "(s64)(s16)-3LL"
    assert (
        read_arg(parse_arg("-8@-24(%rbp)")) == "(s64)tk_usdt_read_s64((void *)(ctx->bp + (-24LL)))"
    )
    assert read_arg(parse_arg("4@8(%rax,%rcx,4)")) == (
        "(u64)tk_usdt_read_u32((void *)(ctx->ax + (8LL) + ctx->cx * 4))"
    )


def test_captured_are_the_arguments_every_site_can_read() -> None:
    site_a = tuple(parse_arg(a) for a in ("-4@%eax", "8@%rdi", "8@sym(%rip)", "-4@%ecx"))
    site_b = tuple(parse_arg(a) for a in ("-4@-4(%rbp)", "-8@%rsi", "8@%rdx"))
    assert captured_args([site_a]) == [(0, "int"), (1, "uint"), (3, "int")]
    # arg1 is unsigned at one site: unsigned; arg2 unreadable at one; arg3 at one site only.
    assert captured_args([site_a, site_b]) == [(0, "int"), (1, "uint")]
    assert captured_args([]) == []


# --- notes ---------------------------------------------------------------------------------

# A PIE's segments: code at 0x1000 (file offset 0x1000), data at 0x3dd0 (file 0x2dd0).
SEGMENTS = [LoadSegment(0x1000, 0x200, 0x1000, 0x200), LoadSegment(0x3DD0, 0x300, 0x2DD0, 0x250)]


def desc(pc: int, base: int, semaphore: int, provider: str, name: str, args: str) -> bytes:
    return struct.pack("<QQQ", pc, base, semaphore) + f"{provider}\0{name}\0{args}\0".encode()


def test_a_note_gives_file_offsets_of_the_site_and_the_semaphore() -> None:
    note = parse_note(
        desc(0x1068, 0x2004, 0x4018, "tk_test", "tick", "-4@%eax -8@%rdx"),
        "<",
        0x2004,
        SEGMENTS,
        "EM_X86_64",
        "/app/t",
    )
    assert (note.provider, note.name, note.offset, note.semaphore_offset) == (
        "tk_test",
        "tick",
        0x1068,
        0x3018,
    )
    assert [a.operand for a in note.args] == [Register("ax"), Register("dx")]


def test_a_prelinked_file_moves_the_site_by_its_base() -> None:
    # Linked with .stapsdt.base at 0x2000, now at 0x2004: the code moved by 4 as well.
    note = parse_note(
        desc(0x1064, 0x2000, 0, "p", "n", ""), "<", 0x2004, SEGMENTS, "EM_X86_64", "f"
    )
    assert (note.offset, note.semaphore_offset, note.args) == (0x1068, 0, ())


def test_a_site_outside_the_loaded_segments_is_refused() -> None:
    with pytest.raises(NotAnElf, match=r"USDT p:n in f: address 0x9000 is in no loaded segment"):
        parse_note(desc(0x9000, 0, 0, "p", "n", ""), "<", 0, SEGMENTS, "EM_X86_64", "f")


def note(probe: str) -> UsdtNote:
    provider, name = probe.split(":")
    return UsdtNote(provider, name, 0x1000, 0, ())


def test_a_missing_probe_is_named_with_the_probes_there_bounded() -> None:
    notes = [note(f"app:probe{i:02}") for i in range(15)] + [note("app:probe00")]
    assert len(sites_of(notes, "app", "probe00", "/app/bin")) == 2  # one note per site
    with pytest.raises(UsdtProbeNotFound) as exc:
        sites_of(notes, "app", "nope", "/app/bin")
    listed = ", ".join(f"app:probe{i:02}" for i in range(10))
    assert str(exc.value) == (
        f"USDT probe app:nope not found in /app/bin; its probes are: {listed}, and 5 more"
    )
    with pytest.raises(UsdtProbeNotFound, match=r"/app/bin has no USDT probes"):
        sites_of([], "app", "nope", "/app/bin")


# --- plans ---------------------------------------------------------------------------------

PYTHON = Path("/usr/bin/python3")  # Debian's is built with SDT probes (semaphores too)


def python_usdt(name: str, **output: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"usdt": {"binary": str(PYTHON), "provider": "python", "name": name}}
    return {**spec, "output": output} if output else spec


@pytest.fixture
def host_ctx() -> Any:
    fd = open_root("/")
    yield BuildContext(kernel=KERNEL, roots=(TargetRoot(fd, "host"),))
    os.close(fd)


def test_python_function_entry_plans_with_its_semaphore_and_arguments(host_ctx: Any) -> None:
    plan = build_plan(assignment(python_usdt("function__entry", kind="events")), host_ctx)
    try:
        assert plan.attachments and {a.kind for a in plan.attachments} == {"usdt"}
        assert all(
            a.ref_ctr_offset > 0 and a.target == "python:function__entry" for a in plan.attachments
        )
        assert all(a.display == str(PYTHON) for a in plan.attachments)
        # filename, funcname (pointers, as numbers), lineno (int).
        assert [(f.name, f.kind) for f in plan.event_fields] == [
            ("arg0", "uint"),
            ("arg1", "uint"),
            ("arg2", "int"),
        ]
        assert "e->f_arg2 = (s64)(s32)" in plan.source
        assert len(plan.held) == 1
    finally:
        plan.held.release()


def test_counts_read_no_arguments(host_ctx: Any) -> None:
    plan = build_plan(assignment(python_usdt("function__entry")), host_ctx)
    plan.held.release()
    assert "f_arg" not in plan.source and plan.event_fields == ()


def test_a_missing_probe_fails_the_plan(host_ctx: Any) -> None:
    with pytest.raises(LoadFailure) as exc:
        build_plan(assignment(python_usdt("no_such_probe")), host_ctx)
    assert (exc.value.state, exc.value.reason) == ("Failed", "AttachFailed")
    assert "USDT probe python:no_such_probe not found in /usr/bin/python3; its probes are:" in (
        exc.value.message
    )
    assert "python:function__entry" in exc.value.message


def test_no_uprobes_no_usdt() -> None:
    kernel = dataclasses.replace(KERNEL, uprobes=FeatureCheck(False, "CONFIG_UPROBES is not set"))
    with pytest.raises(LoadFailure) as exc:
        build_plan(assignment(python_usdt("function__entry")), BuildContext(kernel=kernel))
    assert exc.value.state == "Unsupported"
    assert "has no uprobes (CONFIG_UPROBES is not set), which USDT probes" in exc.value.message


def test_the_file_found_is_an_input_of_the_plan(tmp_path: Path) -> None:
    """Sites and argument layouts come from the file: another file (a new image) plans
    again, and probes on different files never share a program."""
    for name in ("a", "b"):
        (tmp_path / name / "usr/bin").mkdir(parents=True)
        shutil.copy(PYTHON, tmp_path / name / "usr/bin/python3")
    which = {"root": "a"}

    def roots_of(_: ProbeTargets) -> list[TargetRoot]:
        return [TargetRoot(open_root(tmp_path / which["root"]), which["root"])]

    planner = Planner(roots_of)
    a = assignment(python_usdt("function__entry"))
    first = planner.inputs(a)
    assert planner.inputs(a) == first
    which["root"] = "b"
    assert planner.inputs(a) != first
