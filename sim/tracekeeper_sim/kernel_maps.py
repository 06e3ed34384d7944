"""What an agent's programs hold, read from the kernel with bpftool (not from the agent's
report): the node-wide identity table and each program's per-slot binding masks.

The agent's report is used only to find the programs (their ids); the contents are the
kernel's. Key and value bytes are decoded as the C prelude declares them (little endian:
x86-64 and arm64), so no BTF is needed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IDENTITY_MAP = "tk_identity"
SLOT_MASKS_MAP = "tk_slot_masks"


def _bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _number(raw: list[str]) -> int:
    return int.from_bytes(bytes(int(b, 16) for b in raw), "little")


def prog_map_ids(prog_id: int) -> list[int]:
    shown: dict[str, Any] = _bpftool("prog", "show", "id", str(prog_id))
    return [int(m) for m in shown.get("map_ids", [])]


def map_named(prog_id: int, name: str) -> int:
    """The id of the map `name` that program `prog_id` uses."""
    for map_id in prog_map_ids(prog_id):
        if _bpftool("map", "show", "id", str(map_id)).get("name") == name:
            return map_id
    raise LookupError(f"program {prog_id} uses no map named {name}")


def _entries(*which: str) -> dict[int, int]:
    """`bpftool map dump` of the map `which` names (`id N`, `pinned PATH`), decoded."""
    return {_number(e["key"]): _number(e["value"]) for e in _bpftool("map", "dump", *which)}


def dump(map_id: int) -> dict[int, int]:
    """A map of integer keys and values (hash or array), as the kernel holds it."""
    return _entries("id", str(map_id))


def dump_pinned(pin: Path) -> dict[int, int]:
    """The same for a map pinned at `pin` (the node's identity table, which no program of
    the caller may hold). Raises CalledProcessError when nothing is pinned there."""
    return _entries("pinned", str(pin))


def pinned_map_id(pin: Path) -> int:
    """The id of the map pinned at `pin` (CalledProcessError when there is none)."""
    return int(_bpftool("map", "show", "pinned", str(pin))["id"])


@dataclass(frozen=True)
class ProgramMasks:
    program_ids: tuple[int, ...]
    """The program's BPF ids (a syscall probe has an enter and an exit program)."""
    masks: Mapping[int, int]
    """pod slot -> binding mask, non-zero entries only."""


@dataclass(frozen=True)
class NodeMaps:
    identity: Mapping[int, int]
    """cgroup id -> pod slot."""
    programs: tuple[ProgramMasks, ...]

    def bindings_of(self, cgroup_id: int) -> dict[tuple[int, ...], int]:
        """program ids -> how many of the program's bindings the cgroup's pod has."""
        slot = self.identity.get(cgroup_id)
        if slot is None:
            return {}
        counts = {p.program_ids: p.masks.get(slot, 0).bit_count() for p in self.programs}
        return {ids: n for ids, n in counts.items() if n}


def node_maps(identity_program: int, programs: Iterable[tuple[int, ...]]) -> NodeMaps:
    """`identity_program`: any program holding the identity table (the claims program);
    `programs`: each shared program's ids, the first of which holds its slot masks."""
    identity = dump(map_named(identity_program, IDENTITY_MAP))
    read = []
    for ids in sorted(set(programs)):
        masks = dump(map_named(ids[0], SLOT_MASKS_MAP))
        read.append(ProgramMasks(ids, {slot: m for slot, m in masks.items() if m}))
    return NodeMaps(identity, tuple(read))
