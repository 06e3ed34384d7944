"""Constrained string types: one pattern serves the Python check and the CRD schema.

Each type validates with a message that says what is allowed (pydantic's default
"should match pattern" is unreadable for users), and exports the same pattern and
length bound into the generated OpenAPI schema so that the apiserver enforces it too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, Field


def _schema(pattern: str, max_length: int, min_length: int = 1) -> Any:
    return Field(
        min_length=min_length, max_length=max_length, json_schema_extra={"pattern": pattern}
    )


def _check(pattern: str, allowed: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"{value[:80]!r} is not valid: {allowed}")
        return value

    func: Callable[[str], str] = check
    return AfterValidator(func)


_TRACEPOINT = r"^[a-z0-9_]{1,64}:[a-z0-9_]{1,96}$"
TracepointName = Annotated[
    str,
    _schema(_TRACEPOINT, 161),
    _check(
        _TRACEPOINT,
        "use category:name as listed under /sys/kernel/tracing/events, lowercase letters, "
        "digits and '_' (e.g. syscalls:sys_enter_openat)",
    ),
]

_IDENT = r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$"
KernelIdentifier = Annotated[
    str,
    _schema(_IDENT, 128),
    _check(_IDENT, "use a C identifier: letters, digits, '_' and '.', not starting with a digit"),
]

_SYSCALL = r"^[a-z0-9_]{1,64}$"
SyscallName = Annotated[
    str,
    _schema(_SYSCALL, 64),
    _check(_SYSCALL, "use the syscall's name without prefix, lowercase (e.g. read, openat)"),
]

_FIELD = r"^[a-z_][a-z0-9_]{0,63}$"
FieldName = Annotated[
    str,
    _schema(_FIELD, 64),
    _check(
        _FIELD, "use a field name from the tracepoint's tracefs format: lowercase, digits and '_'"
    ),
]

# An absolute path (resolved inside the target container's root) or a library name
# such as "c" or "libssl.so.3"; never a relative path, so never "..".
_PATH_PART = r"[A-Za-z0-9_+@-][A-Za-z0-9_+.@-]*"  # no leading '.', so no '..' either
_BINARY = rf"^(/({_PATH_PART}/)*{_PATH_PART}|[A-Za-z0-9_+-][A-Za-z0-9_+.-]*)$"
BinaryRef = Annotated[
    str,
    _schema(_BINARY, 512),
    _check(
        _BINARY,
        "use an absolute path (/usr/sbin/nginx) or a library name (c, libssl.so.3); "
        "no relative paths, '..', or spaces",
    ),
]

# USDT binaries: an absolute path only (the notes are in the executable or library file
# itself; a library name would be a second way to say which file).
_ABSOLUTE_BINARY = rf"^/({_PATH_PART}/)*{_PATH_PART}$"
AbsoluteBinaryPath = Annotated[
    str,
    _schema(_ABSOLUTE_BINARY, 512),
    _check(
        _ABSOLUTE_BINARY,
        "use an absolute path inside the container (/usr/bin/python3); no '..' or spaces",
    ),
]

_C_IDENT = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
CIdentifier = Annotated[
    str,
    _schema(_C_IDENT, 64),
    _check(_C_IDENT, "use a C identifier: letters, digits and '_', not starting with a digit"),
]

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DnsLabel = Annotated[
    str,
    _schema(_DNS_LABEL, 63),
    _check(_DNS_LABEL, "use a DNS-1123 label: lowercase letters, digits and '-'"),
]

_OBJECT_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
ObjectName = Annotated[
    str,
    _schema(_OBJECT_NAME, 253),
    _check(_OBJECT_NAME, "use a DNS-1123 subdomain: lowercase letters, digits, '-' and '.'"),
]

_COMM = r"^[^/]{1,15}$"
ProcessName = Annotated[
    str,
    _schema(_COMM, 15),
    _check(_COMM, "use a process name (comm) of 1 to 15 characters without '/'"),
]

_CGROUP_PATH = r"^(/[A-Za-z0-9_:@-][A-Za-z0-9_:.@-]*)+$"
CgroupPath = Annotated[
    str,
    _schema(_CGROUP_PATH, 1024),
    _check(
        _CGROUP_PATH,
        "use an absolute path below the cgroup v2 root (e.g. /system.slice/nginx.service), no '..'",
    ),
]

_LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LabelKey = Annotated[
    str, _schema(_LABEL_KEY, 317), _check(_LABEL_KEY, "use a Kubernetes label key: [prefix/]name")
]

_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
LabelValue = Annotated[
    str,
    _schema(_LABEL_VALUE, 63, min_length=0),
    _check(_LABEL_VALUE, "use a Kubernetes label value: letters, digits, '-', '_' and '.'"),
]
