"""Tracepoints as tracefs describes them: existence, typed `format` fields, syscalls.

The program builder validates a TraceProbe's captured fields against the running kernel
with these, and picks how to read each one: a `const char *` of a syscall tracepoint is a
user pointer (bpf_probe_read_user_str), a `__data_loc char[]` is a string stored in the
record itself (BCC's TP_DATA_LOC_READ_STR), a `char comm[16]` is inline.

For tenants' probes it also says which fields are addresses (tenant_field_refusal): a
pointer captured as a number, or an integer the kernel itself prints as a pointer (`%p`,
`%pS`: kmem:kmalloc's `unsigned long call_site`), leaks a kernel address.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

DEFAULT_TRACEFS: tuple[Path, ...] = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# Names come from users' TraceProbes and become paths: no separators, no dots.
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_FIELD_LINE = re.compile(
    r"^\s*field:(?P<decl>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"(?:\s*signed:(?P<signed>\d+);)?"
)
_DECL = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?:\[(?P<len>[^\]]*)\])?$")
_QUALIFIERS = frozenset({"const", "volatile"})
# printf conversions of a `print fmt` line, to pair them with its arguments. `%p` followed
# by one of these prints an address (the others format what it points to: %pI4, %pM...).
_CONVERSION = re.compile(r"%(?:%|[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?(?:hh|h|ll|l|z|j|t|L)?([A-Za-z]))")
_ADDRESS_EXTENSIONS = frozenset("SsBFfKx")
_REC_FIELD = re.compile(r"REC->([A-Za-z_]\w*)")


class TracefsError(Exception):
    pass


class TracefsNotFound(TracefsError):
    pass


class TracepointNotFound(TracefsError):
    pass


class FieldKind(StrEnum):
    INTEGER = "integer"  # any scalar of size 1/2/4/8 (int, u64, pid_t, enums, ...)
    POINTER = "pointer"
    STRING_POINTER = "string_pointer"  # char *: user memory for syscalls, else kernel
    CHAR_ARRAY = "char_array"  # inline fixed string, e.g. char comm[16]
    ARRAY = "array"  # inline array of anything else
    DATA_LOC_STRING = "data_loc_string"  # __data_loc char[]: offset/length word
    DATA_LOC_ARRAY = "data_loc_array"
    OTHER = "other"  # embedded structs and the like


@dataclass(frozen=True, slots=True)
class TracepointField:
    name: str
    c_type: str  # as declared, without the name or array suffix: "const char *"
    offset: int
    size: int  # bytes in the record; syscall args are 8 whatever c_type says
    signed: bool
    array_len: int | None  # None: not an array; 0: flexible or unknown length
    kind: FieldKind
    relative_loc: bool = False  # __rel_loc: offset relative to the field's end

    @property
    def is_common(self) -> bool:
        """common_* header fields: not part of the tracepoint's own payload."""
        return self.name.startswith("common_")


@dataclass(frozen=True, slots=True)
class TracepointFormat:
    category: str
    name: str
    id: int
    fields: tuple[TracepointField, ...]
    printed_as_addresses: frozenset[str] = frozenset()
    """Fields the kernel's own `print fmt` shows as pointers (%p, %pS...), whatever their
    declared type."""

    @property
    def tracepoint(self) -> str:
        return f"{self.category}:{self.name}"

    @property
    def payload_fields(self) -> tuple[TracepointField, ...]:
        return tuple(f for f in self.fields if not f.is_common)

    @property
    def user_pointers(self) -> bool:
        """Pointer fields point to user memory (syscall arguments), not kernel memory."""
        return self.category == "syscalls"

    def field(self, name: str) -> TracepointField | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


def find_tracefs(candidates: Sequence[Path] = DEFAULT_TRACEFS) -> Path:
    """The first candidate with an `events` directory (i.e. tracefs is mounted there)."""
    for path in candidates:
        if (path / "events").is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise TracefsNotFound(f"tracefs is not mounted at any of: {tried}")


def available_tracepoints(*, tracefs: Path | None = None) -> list[str]:
    """Every tracepoint of this kernel, category:name (tracefs' available_events)."""
    text = ((tracefs or find_tracefs()) / "available_events").read_text()
    return [line.strip() for line in text.splitlines() if ":" in line]


def split_tracepoint(tracepoint: str) -> tuple[str, str]:
    """'category:name' -> (category, name), refusing anything that is not a plain name."""
    category, sep, name = tracepoint.partition(":")
    if not sep or not _NAME.match(category) or not _NAME.match(name):
        raise TracefsError(f"tracepoint {tracepoint!r} is not category:name")
    return category, name


def tracepoint_dir(tracepoint: str, *, tracefs: Path | None = None) -> Path:
    category, name = split_tracepoint(tracepoint)
    return (tracefs or find_tracefs()) / "events" / category / name


def tracepoint_exists(tracepoint: str, *, tracefs: Path | None = None) -> bool:
    return (tracepoint_dir(tracepoint, tracefs=tracefs) / "format").is_file()


def read_format(tracepoint: str, *, tracefs: Path | None = None) -> TracepointFormat:
    path = tracepoint_dir(tracepoint, tracefs=tracefs) / "format"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TracepointNotFound(f"no tracepoint {tracepoint} in this kernel ({path})") from None
    return parse_format(text, category=tracepoint.partition(":")[0])


def parse_format(text: str, *, category: str) -> TracepointFormat:
    """Parse a tracefs `format` file (which does not name its category)."""
    header: dict[str, str] = {}
    fields: list[TracepointField] = []
    addresses: frozenset[str] = frozenset()
    for line in text.splitlines():
        if line.startswith("print fmt:"):
            addresses = _printed_as_addresses(line.removeprefix("print fmt:"))
        elif m := _FIELD_LINE.match(line):
            fields.append(_parse_field(m))
        elif ":" in line and not line.startswith((" ", "\t", "print fmt")):
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
    name = header.get("name")
    if not name or "ID" not in header:
        raise TracefsError("not a tracepoint format file (no name/ID header)")
    return TracepointFormat(category, name, int(header["ID"]), tuple(fields), addresses)


def _printed_as_addresses(print_fmt: str) -> frozenset[str]:
    """Fields whose argument in the print fmt meets an address conversion (%p, %pS...).
    Unparseable text yields nothing: the declared types still catch real pointers."""
    text = print_fmt.strip()
    if not text.startswith('"'):
        return frozenset()
    end = _string_end(text, 0)
    if end < 0:
        return frozenset()
    fmt, args = text[1:end], _split_args(text[end + 1 :].strip().removeprefix(","))
    found: set[str] = set()
    index = 0
    for m in _CONVERSION.finditer(fmt):
        if m[0] == "%%":
            continue
        index += (m[1] == "*") + (m[2] == "*")  # a '*' width or precision takes an argument
        if index >= len(args):
            break
        if m[3] == "p":
            extension = fmt[m.end() : m.end() + 1]
            if (not extension or not extension.isalpha() or extension in _ADDRESS_EXTENSIONS) and (
                names := _REC_FIELD.findall(args[index])
            ):
                found.update(names if len(names) == 1 else ())
        index += 1
    return frozenset(found)


def _string_end(text: str, start: int) -> int:
    """Index of the quote closing the C string literal that opens at `start`, or -1."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


def _split_args(text: str) -> list[str]:
    """The comma-separated arguments after the format string, split at depth 0."""
    args: list[str] = []
    depth, i = 0, 0
    current: list[str] = []
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _string_end(text, i)
            if end < 0:
                return args
            current.append(text[i : end + 1])
            i = end + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
        else:
            current.append(c)
        i += 1
    args.append("".join(current).strip())
    return args


def _parse_field(m: re.Match[str]) -> TracepointField:
    decl = m["decl"].strip()
    d = _DECL.match(decl)
    if d is None:
        raise TracefsError(f"cannot parse tracepoint field declaration {decl!r}")
    c_type, name = d["type"].strip(), d["name"]
    array_len = None if d["len"] is None else _array_len(d["len"])
    offset, size = int(m["offset"]), int(m["size"])
    signed = m["signed"] == "1"
    relative = c_type.startswith("__rel_loc ")
    if c_type.startswith(("__data_loc ", "__rel_loc ")):
        element = c_type.split(" ", 1)[1].removesuffix("[]").strip()
        kind = FieldKind.DATA_LOC_STRING if _is_char(element) else FieldKind.DATA_LOC_ARRAY
    elif array_len is not None:
        kind = FieldKind.CHAR_ARRAY if _is_char(c_type) else FieldKind.ARRAY
    elif "*" in c_type:
        base = c_type.rsplit("*", 1)[0]
        pointer_to_char = c_type.count("*") == 1 and _is_char(base)
        kind = FieldKind.STRING_POINTER if pointer_to_char else FieldKind.POINTER
    elif c_type.startswith(("struct ", "union ")) or size not in (1, 2, 4, 8):
        kind = FieldKind.OTHER
    else:
        kind = FieldKind.INTEGER
    return TracepointField(name, c_type, offset, size, signed, array_len, kind, relative)


def _array_len(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


def _is_char(c_type: str) -> bool:
    words = [w for w in c_type.replace("*", " ").split() if w not in _QUALIFIERS]
    return words == ["char"]


def tenant_field_refusal(fmt: TracepointFormat, f: TracepointField) -> str | None:
    """Why a tenant's probe may not capture this field (an address), or None.

    Refused: pointers captured as numbers (a kernel address; a syscall's user pointer too,
    simpler to state), kernel `char *` read through the pointer (kernel memory at whatever
    address the record holds), and integers the kernel prints as pointers (call_site).
    Allowed: integers, inline strings, __data_loc strings, and a syscall's `const char *`
    read as a user string (openat's filename: the calling task's own memory)."""
    what = f"field {f.name!r} of {fmt.tracepoint} ({f.c_type})"
    if f.kind is FieldKind.POINTER:
        where = "an address in the task" if fmt.user_pointers else "a kernel address"
        return f"{what} is a pointer: captured as a number it is {where}"
    if f.kind is FieldKind.STRING_POINTER and not fmt.user_pointers:
        return f"{what} is a pointer into kernel memory"
    if f.name in fmt.printed_as_addresses:
        return f"{what} holds an address (the kernel prints it as a pointer)"
    return None
