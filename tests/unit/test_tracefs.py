from __future__ import annotations

from pathlib import Path

import pytest

from tracekeeper_agent.host.tracefs import (
    FieldKind,
    TracefsError,
    TracefsNotFound,
    TracepointField,
    TracepointNotFound,
    find_tracefs,
    parse_format,
    read_format,
    split_tracepoint,
    tracepoint_exists,
)


def is_string(f: TracepointField) -> bool:
    return f.kind in (FieldKind.STRING_POINTER, FieldKind.CHAR_ARRAY, FieldKind.DATA_LOC_STRING)


def int_type(f: TracepointField) -> str | None:
    """The fixed-width type of an integer field as stored (s32, u64...), else None."""
    if f.kind is not FieldKind.INTEGER:
        return None
    return f"{'s' if f.signed else 'u'}{f.size * 8}"


# As this machine's kernel (6.18) prints them.
OPENAT = """\
name: sys_enter_openat
ID: 782
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int dfd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:const char * filename;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:umode_t mode;\toffset:40;\tsize:8;\tsigned:0;

print fmt: "dfd: 0x%08lx, filename: 0x%08lx", ((unsigned long)(REC->dfd)), \
((unsigned long)(REC->filename))
"""

EXEC = """\
name: sched_process_exec
ID: 365
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;

print fmt: "filename=%s pid=%d old_pid=%d", __get_str(filename), REC->pid, REC->old_pid
"""

# Shapes seen elsewhere: inline arrays, a pointer to pointers, __rel_loc, an embedded
# struct, a flexible array, and an old kernel's lines without "signed:".
ODDITIES = """\
name: oddities
ID: 7
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:unsigned long args[6];\toffset:24;\tsize:48;\tsigned:0;
\tfield:const char *const * argv;\toffset:72;\tsize:8;\tsigned:0;
\tfield:void * skbaddr;\toffset:80;\tsize:8;\tsigned:0;
\tfield:__rel_loc char[] msg;\toffset:88;\tsize:4;\tsigned:0;
\tfield:__data_loc u64[] addrs;\toffset:92;\tsize:4;\tsigned:0;
\tfield:struct in6_addr saddr;\toffset:96;\tsize:16;\tsigned:0;
\tfield:char buf[];\toffset:112;\tsize:0;\tsigned:0;
\tfield:unsigned char addr[6];\toffset:112;\tsize:6;\tsigned:0;
\tfield:long id;\toffset:120;\tsize:8;

print fmt: "whatever"
"""


def test_parse_openat() -> None:
    fmt = parse_format(OPENAT, category="syscalls")
    assert (fmt.tracepoint, fmt.id) == ("syscalls:sys_enter_openat", 782)
    assert fmt.user_pointers
    assert [f.name for f in fmt.payload_fields] == [
        "__syscall_nr",
        "dfd",
        "filename",
        "flags",
        "mode",
    ]
    filename = fmt.field("filename")
    assert filename is not None
    assert (filename.c_type, filename.offset, filename.size) == ("const char *", 24, 8)
    assert filename.kind is FieldKind.STRING_POINTER
    assert is_string(filename)
    dfd = fmt.field("dfd")
    assert dfd is not None
    # Declared int, stored as 8 bytes: the stored width is what a reader must use.
    assert (dfd.c_type, dfd.kind, int_type(dfd)) == ("int", FieldKind.INTEGER, "u64")
    pid = fmt.field("common_pid")
    assert pid is not None
    assert pid.is_common
    assert int_type(pid) == "s32"
    assert fmt.field("nope") is None


def test_parse_exec_data_loc() -> None:
    fmt = parse_format(EXEC, category="sched")
    assert not fmt.user_pointers
    filename = fmt.field("filename")
    assert filename is not None
    assert filename.kind is FieldKind.DATA_LOC_STRING
    assert (filename.c_type, filename.size, filename.relative_loc) == (
        "__data_loc char[]",
        4,
        False,
    )
    assert int_type(filename) is None
    pid = fmt.field("pid")
    assert pid is not None
    assert (pid.c_type, pid.signed, pid.kind) == ("pid_t", True, FieldKind.INTEGER)


def test_parse_oddities() -> None:
    fields = {f.name: f for f in parse_format(ODDITIES, category="x").fields}
    assert (fields["comm"].kind, fields["comm"].array_len) == (FieldKind.CHAR_ARRAY, 16)
    assert is_string(fields["comm"])
    assert (fields["args"].kind, fields["args"].array_len, fields["args"].c_type) == (
        FieldKind.ARRAY,
        6,
        "unsigned long",
    )
    assert fields["argv"].kind is FieldKind.POINTER
    assert fields["skbaddr"].kind is FieldKind.POINTER
    assert fields["msg"].kind is FieldKind.DATA_LOC_STRING
    assert fields["msg"].relative_loc
    assert fields["addrs"].kind is FieldKind.DATA_LOC_ARRAY
    assert fields["saddr"].kind is FieldKind.OTHER
    assert (fields["buf"].kind, fields["buf"].array_len) == (FieldKind.CHAR_ARRAY, 0)
    assert fields["addr"].kind is FieldKind.ARRAY  # unsigned char: bytes, not text
    assert (fields["id"].kind, fields["id"].signed) == (FieldKind.INTEGER, False)


def test_parse_rejects_garbage() -> None:
    with pytest.raises(TracefsError):
        parse_format("hello\n", category="x")
    with pytest.raises(TracefsError, match="cannot parse"):
        parse_format(
            "name: x\nID: 1\n\tfield:int 3;\toffset:0;\tsize:4;\tsigned:1;\n", category="x"
        )


@pytest.mark.parametrize(
    "bad", ["sched", "sched:", ":x", "../../etc:passwd", "sched:../x", "a b:c", "a:b:c"]
)
def test_split_tracepoint_refuses_paths(bad: str) -> None:
    with pytest.raises(TracefsError):
        split_tracepoint(bad)


@pytest.fixture
def fake_tracefs(tmp_path: Path) -> Path:
    events = tmp_path / "tracing" / "events"
    for category, name, text in [
        ("syscalls", "sys_enter_openat", OPENAT),
        ("syscalls", "sys_exit_openat", OPENAT.replace("sys_enter", "sys_exit")),
        ("syscalls", "sys_enter_exit_group", OPENAT),
        ("syscalls", "sys_exit_io_uring_enter", OPENAT),
        ("sched", "sched_process_exec", EXEC),
    ]:
        (events / category / name).mkdir(parents=True)
        (events / category / name / "format").write_text(text)
    (events / "syscalls" / "enable").write_text("0\n")
    return tmp_path / "tracing"


def test_find_tracefs(fake_tracefs: Path, tmp_path: Path) -> None:
    assert find_tracefs((tmp_path / "missing", fake_tracefs)) == fake_tracefs
    with pytest.raises(TracefsNotFound, match="missing"):
        find_tracefs((tmp_path / "missing",))


def test_exists_and_read(fake_tracefs: Path) -> None:
    assert tracepoint_exists("sched:sched_process_exec", tracefs=fake_tracefs)
    assert not tracepoint_exists("sched:sched_switch", tracefs=fake_tracefs)
    fmt = read_format("sched:sched_process_exec", tracefs=fake_tracefs)
    assert fmt.category == "sched"
    with pytest.raises(TracepointNotFound, match="sched:sched_switch"):
        read_format("sched:sched_switch", tracefs=fake_tracefs)
