"""Facts the C prelude and the agent share, written once here and rendered into the
#define header of every program (no number is spelled in c_prelude.h and Python both)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

from tracekeeper_agent.host.event_records import TASK_COMM_LEN
from tracekeeper_api.shapes import BINDINGS_PER_PROGRAM

MAX_BINDINGS = BINDINGS_PER_PROGRAM
"""Bindings (probes) one program serves: the bits of a u64 mask. A 65th binding of a shape
opens a second program of that shape."""
MAX_PROGRAMS_PER_SHAPE = 64
"""Programs of one shape on a node: the kernel's BPF_TRACE_MAX_PROGS per tracepoint."""
MAX_IDENTITIES = 16384
"""Node-wide identity table: cgroup ids of targeted pods and containers (-> pod slot)."""
MAX_SLOTS = MAX_IDENTITIES + 1
"""Pod slots (slot 0: none); a program's slot -> binding mask array has one entry each."""
MAX_PIDS = 8192
"""Host pids the agent names (privileged probes; preallocated in every program)."""
MAX_CHILD_PIDS = 65536
"""Children of followed pids the kernel adds (only in programs that follow children)."""
MAX_COMMS = 4096
MAX_KEYS = 10240
"""Count/histogram keys of one program (all its bindings), LRU."""
MAX_CGROUP_LEVEL = 16
VERDICT_ENTRIES = 16384
RING_PAGES = 512
"""2 MiB of ring buffer per events program."""
MAX_PENDING_PATHS = 2048
"""Pending table (programs/cgroup_claims.c): cgroup paths targeted pods will get, 3 per
pending pod and kubepods directory; the paths past it are left out and reported."""
MAX_CGROUP_PATH = 256
"""Bytes of a pending path from the v2 root (leading slash, no NUL): a kubepods pod path is
under 150 even below a custom --cgroup-root; a longer one is left out and reported."""
assert MAX_CGROUP_PATH & (MAX_CGROUP_PATH - 1) == 0, "cgroup_claims.c masks indices with it"
CGROUP2_HIERARCHY = 0
"""cgroup_mkdir's `root`, the hierarchy id: the v2 (default) hierarchy is 0 (/proc/PID/cgroup's
`0::` line); v1 controllers of a hybrid host have their own and are ignored."""
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
"""FNV-1a 64 of a path: the pending table's key (the value holds the path, compared whole)."""


class ClaimCounter(IntEnum):
    """Per-CPU counters of the cgroup claims program (tk_claim_counters)."""

    MKDIRS = 0
    """cgroup2 directories made (every mkdir on the node pays the path hash)."""
    CLAIMED = 1
    """Of those, a pending pod's: its identity entry written at mkdir."""
    IDENTITY_FULL = 2
    """Claims the identity table had no room for (the inotify path retries them)."""
    REMOVED = 3
    """Identity entries deleted at rmdir."""


NCLAIM_COUNTERS = len(ClaimCounter)


class Counter(IntEnum):
    """Per-binding kernel counters: index binding * NCOUNTERS + counter of tk_counters."""

    MATCHED = 0
    SAMPLED_OUT = 1
    RATE_LIMITED = 2
    RING_FULL = 3
    NEW_KEYS = 4


NCOUNTERS = len(Counter)


class Flag(IntFlag):
    """Runtime flags of a program (tk_config.flags): a filter kind no binding uses costs
    nothing, without recompiling when the first binding starts using it."""

    CGROUP = 1
    PID = 2
    COMM = 4
    FOLLOW = 8
    """Some binding follows the children of its pids (the fork handler's work)."""


def c_defines() -> str:
    """The #define lines every program starts with."""
    values: dict[str, int] = {
        "TK_MAX_BINDINGS": MAX_BINDINGS,
        "TK_MAX_IDENTITIES": MAX_IDENTITIES,
        "TK_MAX_SLOTS": MAX_SLOTS,
        "TK_MAX_PIDS": MAX_PIDS,
        "TK_MAX_CHILD_PIDS": MAX_CHILD_PIDS,
        "TK_MAX_COMMS": MAX_COMMS,
        "TK_MAX_KEYS": MAX_KEYS,
        "TK_MAX_LEVEL": MAX_CGROUP_LEVEL,
        "TK_VERDICT_ENTRIES": VERDICT_ENTRIES,
        "TK_RING_PAGES": RING_PAGES,
        "TK_NCOUNTERS": NCOUNTERS,
        "TK_MAX_PENDING": MAX_PENDING_PATHS,
        "TK_MAX_CGROUP_PATH": MAX_CGROUP_PATH,
        "TK_CGROUP2_HIERARCHY": CGROUP2_HIERARCHY,
        "TK_FNV_OFFSET": FNV_OFFSET,
        "TK_FNV_PRIME": FNV_PRIME,
        "TK_NCLAIM_COUNTERS": NCLAIM_COUNTERS,
        # The kernel's TASK_COMM_LEN (linux/sched.h), which the prelude does not include:
        # parsing it was half of every compile (0.35 of 0.7 s).
        "TK_COMM_LEN": TASK_COMM_LEN,
    }
    values.update({f"TK_{c.name}": c.value for c in Counter})
    values.update({f"TK_FLAG_{f.name}": f.value for f in Flag if f.name})
    values.update({f"TK_CLAIM_{c.name}": c.value for c in ClaimCounter})
    return "".join(f"#define {k} {_c_int(v)}\n" for k, v in values.items())


def _c_int(value: int) -> str:
    # A decimal literal past INT64_MAX has no C type; u64 constants are spelled as such.
    return f"{value:#x}ULL" if value > 0x7FFFFFFF else str(value)
