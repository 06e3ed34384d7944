"""The key and value types of the prelude's maps (c_prelude.h), for reading and writing
them by fd. An adopted program (pinned by a previous agent, bpf/pinned_programs.py) is not
compiled, so BCC never parses its C; these types are checked against BCC's own parse of
every program it compiles (bpf/loader.py), so the two cannot drift apart unseen."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from tracekeeper_agent.host.event_records import TASK_COMM_LEN


class Config(ctypes.Structure):
    _fields_ = (
        ("gen", ctypes.c_ulonglong),
        ("host_mask", ctypes.c_ulonglong),
        ("no_comm_mask", ctypes.c_ulonglong),
        ("follow_mask", ctypes.c_ulonglong),
        ("flags", ctypes.c_ulonglong),
    )


class Binding(ctypes.Structure):
    _fields_ = (("sampling", ctypes.c_uint), ("rate_limit", ctypes.c_uint))


class Comm(ctypes.Structure):
    _fields_ = (("name", ctypes.c_char * TASK_COMM_LEN),)


class Key(ctypes.Structure):
    _fields_ = (
        ("cgroup", ctypes.c_ulonglong),
        ("pid", ctypes.c_uint),
        ("slot", ctypes.c_uint),
        ("binding", ctypes.c_uint),
        ("pad", ctypes.c_uint),
        ("comm", ctypes.c_char * TASK_COMM_LEN),
    )


class Bucket(ctypes.Structure):
    _fields_ = (("window_start", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong))


@dataclass(frozen=True)
class Layout:
    key: Any
    value: Any
    per_cpu: bool = False
    array: bool = False
    """An array map: its keys all exist, an entry is cleared by writing zeros."""


LAYOUTS: dict[str, Layout] = {
    "tk_counters": Layout(ctypes.c_int, ctypes.c_ulonglong, per_cpu=True, array=True),
    "tk_config": Layout(ctypes.c_int, Config, array=True),
    "tk_bindings": Layout(ctypes.c_int, Binding, array=True),
    "tk_slot_masks": Layout(ctypes.c_int, ctypes.c_ulonglong, array=True),
    "tk_pids": Layout(ctypes.c_uint, ctypes.c_ulonglong),
    "tk_child_pids": Layout(ctypes.c_uint, ctypes.c_ulonglong),
    "tk_comms": Layout(Comm, ctypes.c_ulonglong),
    "tk_values": Layout(Key, ctypes.c_ulonglong, per_cpu=True),
    "tk_rate": Layout(ctypes.c_int, Bucket, array=True),
}
"""The maps the agent reads or writes, by name. A program's other maps (its verdict cache,
latency start times, the ring) are only cleared (by their sizes) or mapped (the ring)."""
