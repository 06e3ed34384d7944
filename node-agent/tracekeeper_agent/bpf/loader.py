"""The real ProgramLoader: BCC compiles the plan's C text, attaches it, and the
LoadedProgram reads and writes its maps."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from bcc import BPF  # the only place bcc is imported (see the import-linter contract)

from tracekeeper_agent.bpf.compiler_memory import QuietRelease
from tracekeeper_agent.bpf.fd_maps import FdMap, LayoutMismatch, raw_layout
from tracekeeper_agent.bpf.identity import PinnedIdentities, default_pin
from tracekeeper_agent.bpf.links import attach_raw_tracepoint, attach_tracepoint
from tracekeeper_agent.bpf.maps import write_diff, write_values
from tracekeeper_agent.bpf.pinned_programs import OpenedPins, PinStore, ProgramPins
from tracekeeper_agent.bpf.ringbuf import RingReader
from tracekeeper_agent.bpf.stderr_capture import capture_fd2
from tracekeeper_agent.host.bpf_ids import prog_id
from tracekeeper_agent.host.bpf_stats import map_usage, prog_usage
from tracekeeper_agent.host.event_records import TASK_COMM_LEN, EventBatch, record_layout
from tracekeeper_agent.ports import (
    BindingConfig,
    CountSample,
    HistogramSample,
    KernelCounters,
    LoadFailure,
    ObjectUsage,
    ProgramMaps,
    ProgramPlan,
    RawEvent,
    SampleKey,
)
from tracekeeper_agent.programs.constants import NCOUNTERS, Counter
from tracekeeper_agent.programs.map_layouts import LAYOUTS
from tracekeeper_api.protocol import ProbeState
from tracekeeper_api.reasons import OutcomeReason
from tracekeeper_api.text import truncate_message

log = logging.getLogger(__name__)

_CFLAGS = ["-Wno-macro-redefined", "-Wno-unused-function"]


def _map_fds(bpf: Any) -> tuple[int, ...]:
    """Every map the module created or opened (the pinned identity table too), also those
    Python never touched: BCC's own table list, not its lazily filled `tables`. Fixed once
    the module is loaded."""
    lib = _bcc_lib()
    count = lib.bpf_num_tables(bpf.module)
    return tuple(lib.bpf_table_fd_id(bpf.module, i) for i in range(count))


@functools.cache
def _bcc_lib() -> Any:
    """libbcc with the signatures of the calls BCC's Python side does not declare."""
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_fd_id.restype = ctypes.c_int
    lib.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


def _failure_reason(text: str) -> OutcomeReason:
    if re.search(r"Unable to find kernel headers|linux/kconfig.h.*not found", text):
        return "KernelHeadersMissing"
    if re.search(r"error:|Failed to compile", text):
        return "CompileFailed"
    return "AttachFailed"


class BccProgram:
    """A loaded shape program (implements ports.LoadedProgram): its maps written from
    ProgramMaps, its outputs read back per binding. Compiled here (`compiled`: BCC's
    tables) or adopted from a previous agent's pins (`adopted`: the same maps by fd)."""

    def __init__(
        self,
        plan: ProgramPlan,
        tables: dict[bytes, Any],
        prog_fds: list[int],
        map_fds: tuple[int, ...],
        *,
        bpf: Any = None,
        links: list[int] | None = None,
        owned: OpenedPins | None = None,
    ) -> None:
        self.plan = plan
        self._tables = tables
        self._bpf = bpf
        """BCC's object when compiled here (None: adopted)."""
        self._links = links or []
        """Link fds of attachments made here (pinned programs): closing them detaches."""
        self._owned = owned
        self._pins: ProgramPins | None = None
        self._prog_fds = prog_fds
        self._ring_open = False
        self._pending: list[RawEvent] = []
        self._reader: RingReader | None = None
        self._program_ids = tuple(sorted(prog_id(fd) for fd in prog_fds))
        self._map_fds = map_fds
        self._maps = ProgramMaps()
        """What the agent wrote (the maps only it writes are never read back)."""
        self._gen = 0
        self.adopted = bpf is None

    @classmethod
    def compiled(cls, bpf: Any, plan: ProgramPlan, links: list[int]) -> BccProgram:
        tables = {}
        for name in (*LAYOUTS, "tk_events"):
            try:
                tables[name.encode()] = bpf[name.encode()]
            except KeyError:
                continue
        _check_layouts(tables)
        prog_fds = [f.fd for f in bpf.funcs.values()]
        return cls(plan, tables, prog_fds, _map_fds(bpf), bpf=bpf, links=links)

    @classmethod
    def adopted_from(cls, plan: ProgramPlan, opened: OpenedPins, identity_fd: int) -> BccProgram:
        """A previous agent's program of this plan, its maps reset to a fresh load's: bits
        are given again, so nothing of the old bindings may stay (counts, masks, pids)."""
        tables: dict[bytes, Any] = {}
        cleared: list[FdMap] = []
        try:
            for name, fd in opened.maps.items():
                layout = LAYOUTS.get(name)
                if layout is not None:
                    tables[name.encode()] = table = FdMap(os.dup(fd), layout, name)
                    cleared.append(table)
                elif name == "tk_events":
                    tables[b"tk_events"] = _Ring(fd)
                elif name != "tk_verdicts":  # invalidated by the generation instead
                    cleared.append(FdMap(os.dup(fd), raw_layout(fd), name))
            old_gen = int(tables[b"tk_config"][ctypes.c_int(0)].gen)
            for table in cleared:
                table.clear()
        except BaseException:
            for t in tables.values():
                if isinstance(t, FdMap):
                    t.close()
            raise
        finally:
            for table in cleared:
                if table.name.encode() not in tables:
                    table.close()
        map_fds = (*opened.maps.values(), identity_fd)
        program = cls(plan, tables, list(opened.progs.values()), map_fds, owned=opened)
        program._gen = old_gen  # cached verdicts of every older generation are stale
        program.invalidate()
        if b"tk_events" in tables:  # the previous agent's records: its bindings' bits
            program._reader = RingReader(opened.maps["tk_events"], record_layout(plan.event_fields))
            program._reader.discard()
        return program

    def keep_pinned(self, pins: ProgramPins) -> None:
        """Pinned: a SIGKILL leaves it attached for the next agent; close() unpins."""
        self._pins = pins

    @property
    def program_ids(self) -> tuple[int, ...]:
        return self._program_ids

    def update_maps(self, maps: ProgramMaps) -> None:
        old, b = self._maps, self._tables
        slots = dict.fromkeys(old.slot_masks.keys() - maps.slot_masks.keys(), 0)
        slots.update((s, m) for s, m in maps.slot_masks.items() if old.slot_masks.get(s) != m)
        write_values(b[b"tk_slot_masks"], slots, key_of=ctypes.c_int)
        write_diff(b[b"tk_pids"], old.pids, maps.pids, key_of=ctypes.c_uint)
        comms = b[b"tk_comms"]
        write_diff(
            comms,
            old.comms,
            maps.comms,
            key_of=lambda name: comms.Key(name.encode()[: TASK_COMM_LEN - 1]),
        )
        if old.follow_mask & ~maps.follow_mask and self._has(b"tk_child_pids"):
            self._drop_children(maps.follow_mask)
        configs = b[b"tk_bindings"]
        for bit in old.bindings.keys() | maps.bindings.keys():
            cfg = maps.bindings.get(bit, BindingConfig())
            if old.bindings.get(bit, BindingConfig()) != cfg:
                configs[ctypes.c_int(bit)] = configs.Leaf(cfg.sampling, cfg.rate_limit)
        self._maps = maps
        self.invalidate()

    def _drop_children(self, follow: int) -> None:
        """Children inherited for bindings that no longer follow them: their bits go."""
        children = self._tables[b"tk_child_pids"]
        for k, v in list(children.items()):
            kept = int(v.value) & follow
            if kept:
                children[k] = ctypes.c_ulonglong(kept)
            else:
                del children[k]

    def invalidate(self) -> None:
        """Write the config with a new generation: every cached verdict is recomputed."""
        m = self._maps
        self._gen += 1
        config = self._tables[b"tk_config"]
        config[ctypes.c_int(0)] = config.Leaf(
            self._gen, m.host_mask, m.no_comm_mask, m.follow_mask, m.flags
        )

    def clear_binding(self, bit: int) -> None:
        b = self._tables
        if self._has(b"tk_values"):
            values = b[b"tk_values"]
            mine = [k for k in values if int(k.binding) == bit]
            for k in mine:
                with contextlib.suppress(KeyError):
                    del values[k]
        counters = b[b"tk_counters"]
        for c in Counter:
            counters[ctypes.c_int(bit * NCOUNTERS + c)] = counters.Leaf()
        if self._has(b"tk_rate"):
            rate = b[b"tk_rate"]
            rate[ctypes.c_int(bit)] = rate.Leaf()

    def _key(self, k: Any) -> SampleKey:
        by = self.plan.by
        return SampleKey(
            cgroup_id=int(k.cgroup) if {"pod", "container"} & set(by) else None,
            pid=int(k.pid) if "pid" in by else None,
            comm=bytes(k.comm).split(b"\0", 1)[0].decode(errors="replace")
            if "comm" in by
            else None,
        )

    def _values(self, bit: int) -> list[tuple[Any, int]]:
        if not self._has(b"tk_values"):
            return []
        table = self._tables[b"tk_values"]
        return [(k, sum(int(x) for x in v)) for k, v in table.items() if int(k.binding) == bit]

    def _has(self, name: bytes) -> bool:
        return name in self._tables

    def read_counts(self, bit: int) -> list[CountSample]:
        if self.plan.output_kind == "histogram":
            return []
        totals: dict[SampleKey, int] = defaultdict(int)
        for k, total in self._values(bit):
            totals[self._key(k)] += total
        return [CountSample(key, value) for key, value in totals.items()]

    def read_histograms(self, bit: int) -> list[HistogramSample]:
        if self.plan.output_kind != "histogram":
            return []
        buckets: dict[SampleKey, dict[int, int]] = defaultdict(dict)
        for k, total in self._values(bit):
            slots = buckets[self._key(k)]
            slots[int(k.slot)] = slots.get(int(k.slot), 0) + total
        return [HistogramSample(key, slots) for key, slots in buckets.items()]

    def read_counters(self, bit: int) -> KernelCounters:
        per_cpu = self._tables[b"tk_counters"]
        base = bit * NCOUNTERS
        sums = {c: sum(int(x) for x in per_cpu[ctypes.c_int(base + c)]) for c in Counter}
        return KernelCounters(
            matched=sums[Counter.MATCHED],
            sampled_out=sums[Counter.SAMPLED_OUT],
            rate_limited=sums[Counter.RATE_LIMITED],
            ring_full=sums[Counter.RING_FULL],
            lru_new_keys=sums[Counter.NEW_KEYS],
        )

    def live_keys(self, bit: int) -> int:
        if not self._has(b"tk_values"):
            return 0
        return sum(1 for k in self._tables[b"tk_values"] if int(k.binding) == bit)

    def kernel_objects(self) -> list[ObjectUsage]:
        progs = [prog_usage(fd) for fd in self._prog_fds]
        return progs + [map_usage(fd) for fd in self._map_fds]

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> int:
        e = self._tables[b"tk_events"].event(data)
        fields: dict[str, int | str] = {}
        for f in self.plan.event_fields:
            raw = getattr(e, f"f_{f.name}")
            fields[f.name] = raw.decode(errors="replace") if f.kind == "str" else int(raw)
        self._pending.append(
            RawEvent(
                ts_ns=int(e.ts),
                pid=int(e.pid),
                tid=int(e.tid),
                cgroup_id=int(e.cgroup),
                comm=e.comm.decode(errors="replace"),
                fields=fields,
                bindings=int(e.bindings),
            )
        )
        return 0

    def poll_events(self, timeout_ms: int) -> list[RawEvent]:
        if self.plan.output_kind != "events":
            return []
        if self._bpf is None:  # adopted: no BCC decoder, the batches' own
            return self.poll_batch(timeout_ms, 1 << 20).to_raw()
        if self._reader is not None:
            raise RuntimeError("the ring is read in batches (poll_batch) already")
        if not self._ring_open:
            self._bpf[b"tk_events"].open_ring_buffer(self._on_event)
            self._ring_open = True
        self._bpf.ring_buffer_poll(timeout_ms)
        batch, self._pending = self._pending, []
        return batch

    def poll_batch(self, timeout_ms: int, max_records: int) -> EventBatch:
        if self.plan.output_kind != "events":
            return EventBatch(np.zeros(0, record_layout(()).dtype), record_layout(()))
        if self._reader is None:
            if self._ring_open:
                raise RuntimeError("the ring is read per record (poll_events) already")
            table = self._tables[b"tk_events"]
            layout = record_layout(self.plan.event_fields)
            if self._bpf is not None:
                # BCC's view of struct tk_event (from the compiled source) must be ours.
                bcc_size = ctypes.sizeof(_event_class(table))
                if bcc_size != layout.size:
                    raise RuntimeError(
                        f"struct tk_event is {bcc_size} bytes, the record layout {layout.size}"
                    )
            self._reader = RingReader(table.map_fd, layout)
        return self._reader.poll(timeout_ms, max_records)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._pins is not None:
            self._pins.remove()
        for link in self._links:
            with contextlib.suppress(OSError):
                os.close(link)
        for table in self._tables.values():
            if isinstance(table, FdMap):
                table.close()
        if self._owned is not None:
            self._owned.close()
        if self._bpf is not None:
            discard(self._bpf)


class _Ring:
    """An adopted program's ring buffer: only its fd is needed (bpf/ringbuf.py maps it)."""

    def __init__(self, fd: int) -> None:
        self.map_fd = fd


def _check_layouts(tables: dict[bytes, Any]) -> None:
    """BCC's parse of the compiled C must be what map_layouts says (adoption uses it)."""
    for name, table in tables.items():
        layout = LAYOUTS.get(name.decode())
        if layout is None:
            continue
        value = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: one CPU's value
        ours = (ctypes.sizeof(layout.key), ctypes.sizeof(layout.value))
        theirs = (ctypes.sizeof(table.Key), ctypes.sizeof(value))
        if ours != theirs:
            raise RuntimeError(
                f"map {name.decode()}: BCC has key/value {theirs} bytes, map_layouts {ours}"
            )


class BccLoader:
    """Compiles and attaches plans (implements kernel.ProgramLoader). The reconciler
    serializes calls, which the fd-2 capture relies on.

    Nothing a load creates outlives a failed load: BCC registers every BPF object with
    atexit (so a half-built one stays alive, attached, until the process exits), and the
    constructor can fail after loading and attaching some functions (TRACEPOINT_PROBE
    auto-attach). The object is created before __init__ runs, so that it can be cleaned
    up whatever step fails.

    With `programs_pin` (an agent's, one per node), tracepoint programs are attached by
    pinned links and kept pinned there: a previous agent's are adopted by the loads of
    the same source (bpf/pinned_programs.py), and the identity table they use is kept."""

    def __init__(
        self,
        identity_pin: Path | None = None,
        quiet_release: QuietRelease | None = None,
        *,
        programs_pin: Path | None = None,
    ) -> None:
        self._pin = identity_pin or default_pin()
        self._quiet_release = quiet_release or QuietRelease()
        """Hands the compiler's memory back once compiles stop (bpf/compiler_memory.py)."""
        self._store = PinStore(programs_pin) if programs_pin is not None else None
        # Before any program declares the table, and from one thread: the reconciler reads
        # it from the event loop (reports) and the compile worker (loads) alike.
        self._identities: PinnedIdentities | None = self._open_identities()
        self._quiet_release.compiled()  # importing bcc and the claims program paged it in
        self.adopted = 0
        """Programs taken over from a previous agent (not compiled)."""

    def _open_identities(self) -> PinnedIdentities:
        store = self._store
        if store is None or not store.leftovers:
            return PinnedIdentities(self._pin)
        try:  # the leftovers read the old table: keep it (emptied), or they cannot be used
            return PinnedIdentities(self._pin, keep=True)
        except Exception as exc:
            log.warning("the pinned identity table cannot be kept (%s): not adopting", exc)
            store.drop_all()
            return PinnedIdentities(self._pin)

    def drop_leftovers(self) -> int:
        """Detach what a previous agent left pinned and no load took (after the restore)."""
        return self._store.drop_leftovers() if self._store is not None else 0

    @property
    def identities(self) -> PinnedIdentities:
        """The node's identity table and its cgroup claims program (one per loader)."""
        if self._identities is None:
            raise RuntimeError("the loader is closed")
        return self._identities

    def close(self) -> None:
        self._quiet_release.close()
        self.drop_leftovers()
        if self._store is not None:
            with contextlib.suppress(OSError):  # still holding pins: a program is not closed
                self._store.root.rmdir()
        if self._identities is not None:
            self._identities.close()
            self._identities = None

    def load(self, plan: ProgramPlan) -> BccProgram:
        try:
            return self._load(plan)
        finally:
            plan.held.release()  # the kernel holds what was attached; our fds can go
            self._quiet_release.compiled()

    def _load(self, plan: ProgramPlan) -> BccProgram:
        pinned = self._store is not None and _pinnable(plan)
        if pinned and (adopted := self._adopt(plan)) is not None:
            return adopted
        pin = self.identities.pin
        cflags = [*_CFLAGS, f'-DTK_IDENTITY_PIN="{pin}"']
        bpf = BPF.__new__(BPF)
        if pinned:  # attached below by links, which can be pinned
            bpf._trace_autoload = lambda: None
        with capture_fd2() as out:
            try:
                bpf.__init__(text=plan.source.encode(), cflags=cflags)
            except Exception as exc:
                error: Exception | None = exc
            else:
                error = None
        if error is not None:
            discard(bpf)
            text = scrub(f"{out.text}\n{error}".strip(), plan)
            reason = _failure_reason(text)
            state: ProbeState = (
                "KernelHeadersMissing" if reason == "KernelHeadersMissing" else "Failed"
            )
            raise LoadFailure(state, reason, truncate_message(explain(_clean(text))))
        links: list[int] = []
        try:
            with capture_fd2() as out:
                self._attach(bpf, plan)
                if pinned:
                    links = _attach_links(bpf)
            program = BccProgram.compiled(bpf, plan, links)
        except BaseException as exc:  # also a cancellation or an id read that failed
            for link in links:
                os.close(link)
            discard(bpf)
            if not isinstance(exc, Exception):
                raise
            text = scrub(_clean(f"{out.text}\n{exc}".strip()), plan)
            raise LoadFailure("Failed", "AttachFailed", truncate_message(explain(text))) from exc
        if pinned:
            self._pin_program(bpf, program, links)
        return program

    def _adopt(self, plan: ProgramPlan) -> BccProgram | None:
        assert self._store is not None
        pins = self._store.take(plan.source_hash)
        if pins is None:
            return None
        try:
            opened = pins.open()
        except OSError as exc:
            log.warning("cannot adopt %s (%s): compiling", pins.directory.name, exc)
            pins.remove()
            return None
        try:
            program = BccProgram.adopted_from(plan, opened, self.identities.map_fd)
        except (OSError, LayoutMismatch, KeyError) as exc:
            opened.close()
            log.warning("cannot adopt %s (%s): compiling", pins.directory.name, exc)
            pins.remove()
            return None
        program.keep_pinned(pins)
        self.adopted += 1
        log.info("adopted the pinned program %s (%s)", pins.directory.name, plan.shape)
        return program

    def _pin_program(self, bpf: Any, program: BccProgram, links: list[int]) -> None:
        """Pin a program attached by links; unpinned it works all the same (logged)."""
        assert self._store is not None
        pins = self._store.new(program.plan.source_hash)
        progs = {name.decode(): f.fd for name, f in bpf.funcs.items()}
        maps = {name: fd for name, fd in _table_fds(bpf).items() if name != "tk_identity"}
        try:
            pins.pin(progs, links, maps)
        except OSError as exc:
            log.warning(
                "could not pin %s (%s): it will not outlive this agent", program.plan.shape, exc
            )
            return
        program.keep_pinned(pins)

    @staticmethod
    def _attach(bpf: Any, plan: ProgramPlan) -> None:
        for a in plan.attachments:
            if a.kind in ("uprobe", "uretprobe"):
                # BCC resolves the symbol to its file offset; we attach (see _attach_at).
                path, offset = BPF._check_path_symbol(
                    a.binary.encode(), a.target.encode(), None, -1
                )
                ret = a.kind == "uretprobe"
                _attach_at(bpf, a.fn_name, path.decode(), offset, 0, retprobe=ret)
            elif a.kind == "usdt":
                _attach_at(bpf, a.fn_name, a.binary, a.offset, a.ref_ctr_offset)
            elif a.kind == "kprobe":
                bpf.attach_kprobe(event=a.target.encode(), fn_name=a.fn_name.encode())
            elif a.kind == "kretprobe":
                bpf.attach_kretprobe(event=a.target.encode(), fn_name=a.fn_name.encode())
            # "auto": BCC attached TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE on construction


def _pinnable(plan: ProgramPlan) -> bool:
    """Only tracepoints are attached by links here (uprobes and raw programs as BCC does)."""
    return all(a.kind == "auto" and a.fn_name != "*" for a in plan.attachments)


def _attach_links(bpf: Any) -> list[int]:
    """What BCC's autoload attaches (TRACEPOINT_PROBE, RAW_TRACEPOINT_PROBE), by links."""
    lib = _bcc_lib()
    links: list[int] = []
    try:
        for i in range(lib.bpf_num_functions(bpf.module)):
            name = lib.bpf_function_name(bpf.module, i)
            if name.startswith(b"tracepoint__"):
                fn = bpf.load_func(name, BPF.TRACEPOINT)
                category, _, event = name[len(b"tracepoint__") :].decode().partition("__")
                links.append(attach_tracepoint(fn.fd, category, event))
            elif name.startswith(b"raw_tracepoint__"):
                fn = bpf.load_func(name, BPF.RAW_TRACEPOINT)
                links.append(
                    attach_raw_tracepoint(fn.fd, name[len(b"raw_tracepoint__") :].decode())
                )
    except BaseException:
        for link in links:
            os.close(link)
        raise
    return links


def _table_fds(bpf: Any) -> dict[str, int]:
    """Every table of the module by name (BCC's list, not its lazily filled `tables`)."""
    lib = _bcc_lib()
    return {
        lib.bpf_table_name(bpf.module, i).decode(): lib.bpf_table_fd_id(bpf.module, i)
        for i in range(lib.bpf_num_tables(bpf.module))
    }


def _uprobe_attacher() -> Any:
    """libbcc's bpf_attach_uprobe with its whole C signature. BCC's Python binding declares
    six of its seven arguments (it never passes `ref_ctr_offset`, so the callee reads
    whatever the stack holds there); a function pointer of our own says all seven."""
    from bcc.libbcc import lib

    attach = lib["bpf_attach_uprobe"]  # a new pointer: BCC's lib.bpf_attach_uprobe is untouched
    attach.restype = ctypes.c_int
    attach.argtypes = [
        ctypes.c_int,  # program fd
        ctypes.c_int,  # BPF_PROBE_ENTRY (0) or BPF_PROBE_RETURN (1)
        ctypes.c_char_p,  # event name
        ctypes.c_char_p,  # binary path
        ctypes.c_uint64,  # file offset
        ctypes.c_int,  # pid (-1: every process)
        ctypes.c_uint32,  # ref_ctr_offset (0: none)
    ]
    return attach


_ATTACH_UPROBE: Any = None


def _attach_at(
    bpf: Any, fn_name: str, path: str, offset: int, ref_ctr_offset: int, *, retprobe: bool = False
) -> None:
    """A uprobe (or uretprobe) at a file offset of `path` in every process; with a USDT
    semaphore for the kernel to count listeners in, or 0 for none. Every uprobe goes
    through here, so none gets what the stack held as its ref_ctr_offset. Kept in BCC's
    uprobe table (under BCC's own event names), so cleanup() detaches it like BCC's."""
    global _ATTACH_UPROBE
    if _ATTACH_UPROBE is None:
        _ATTACH_UPROBE = _uprobe_attacher()
    fn = bpf.load_func(fn_name.encode(), BPF.KPROBE)
    ev_name = bpf._get_uprobe_evname(b"r" if retprobe else b"p", path.encode(), offset, -1)
    bpf._check_probe_quota(1)
    fd = _ATTACH_UPROBE(fn.fd, int(retprobe), ev_name, path.encode(), offset, -1, ref_ctr_offset)
    if fd < 0:
        kind = "uretprobe" if retprobe else "uprobe"
        semaphore = f", semaphore at {ref_ctr_offset:#x}" if ref_ctr_offset else ""
        raise OSError(f"attaching a {kind} at offset {offset:#x} of {path}{semaphore} failed")
    bpf._add_uprobe_fd(ev_name, fd)


def _event_class(table: Any) -> Any:
    from bcc.table import _get_event_class  # BCC's parser of the event struct

    return _get_event_class(table)


def discard(bpf: Any) -> None:
    """Detach and free a BPF object, complete or not, and drop BCC's atexit reference to
    it (which would otherwise keep every closed program's object until exit)."""
    try:
        if hasattr(bpf, "module"):  # __init__ got as far as compiling
            bpf.cleanup()
    finally:
        atexit.unregister(bpf.cleanup)


_FD_PATH = re.compile(r"/proc/self/fd/\d+")


def scrub(text: str, plan: ProgramPlan) -> str:
    """BCC names the file it was given: the agent's /proc/self/fd path. Say the binary as
    the probe names it instead (messages never carry paths the tenant did not write)."""
    names = {a.binary: a.display for a in plan.attachments if a.display}
    for path, display in names.items():
        text = text.replace(path, display)
    return _FD_PATH.sub("the binary", text)


def _clean(text: str) -> str:
    """Drop the echo of our own source that BCC prints around clang errors."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("In file included")]
    return "\n".join(lines)


# The kernel's errors for limits users can hit, said in their terms (appended: messages
# are truncated from the front, so the explanation survives).
_EXPLANATIONS = (
    (
        re.compile(r"PERF_EVENT_IOC_SET_BPF\): Argument list too long"),
        "the kernel allows at most 64 BPF programs on one tracepoint (BPF_TRACE_MAX_PROGS): "
        "64 shapes of 64 probes each, or fewer when other tools on this node use some",
    ),
)


def explain(text: str) -> str:
    for pattern, why in _EXPLANATIONS:
        if pattern.search(text):
            return f"{text}\n{why}"
    return text
