"""What the benchmarks share: plain-text tables, statistics, a cgroup sandbox, the C syscall
generator (bench/tk_loop.c, compiled at bench time), BPF run-time statistics, machine facts."""

from __future__ import annotations

import atexit
import contextlib
import cProfile
import ctypes
import functools
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracekeeper_agent.host.bpf_stats import enable_run_time_stats
from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.kubelet import create_cgroup, remove_cgroup_tree

BENCH_DIR = Path(__file__).resolve().parent
LOOP_SOURCE = BENCH_DIR / "tk_loop.c"


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the benchmarks load BPF programs and create cgroups: run them as root")


# --- tables --------------------------------------------------------------------------------


@dataclass
class Table:
    """A titled plain-text table; the first column is left-aligned, the others right."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            out = [cells[0].ljust(widths[0])]
            out += [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True)]
            return "  ".join(out).rstrip()

        rule = "  ".join("-" * w for w in widths)
        parts = [f"== {self.title}", line(list(self.columns)), rule]
        parts += [line(list(r)) for r in self.rows]
        parts += [f"  * {n}" for n in self.notes]
        return "\n".join(parts)

    def print(self) -> None:
        print(self.render() + "\n", flush=True)


def met(ok: bool) -> str:
    return "yes" if ok else "NO"


def ms(seconds: float, digits: int = 2) -> str:
    return f"{seconds * 1e3:.{digits}f}"


def rate(per_second: float) -> str:
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f}k"
    return f"{per_second:.0f}"


@dataclass(frozen=True)
class Spread:
    low: float
    median: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(min(values), statistics.median(values), max(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# --- cgroups ------------------------------------------------------------------------------


@contextlib.contextmanager
def cgroup_sandbox(prefix: str = "tk-bench") -> Iterator[Path]:
    """A fresh cgroup v2 subtree under the real root, removed (processes evacuated) after."""
    root = detect_root()
    top = root / f"{prefix}-{uuid.uuid4().hex[:8]}"
    create_cgroup(top)
    try:
        yield top
    finally:
        remove_cgroup_tree(top, evacuate_to=root)


# --- the C syscall generator -----------------------------------------------------------------


@functools.cache
def tk_loop() -> Path:
    """bench/tk_loop.c compiled with the system cc (once per process)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("no C compiler (cc): the benchmarks compile bench/tk_loop.c at run time")
    directory = tempfile.mkdtemp(prefix="tk-bench-loop-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    out = Path(directory) / "tk_loop"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(LOOP_SOURCE)], check=True)
    return out


@dataclass(frozen=True)
class LoopRun:
    calls: int
    ns_total: int
    ns_per_call: float
    t_pod: int
    t_start: int
    t_end: int
    chunk_p10: float = 0.0
    """Tight loop: 10th percentile of the ns/call of its 10 000-call chunks (0: no chunks)."""
    chunk_p50: float = 0.0


def parse_loop_output(text: str) -> LoopRun:
    values = dict(pair.split("=", 1) for pair in text.split())
    return LoopRun(
        calls=int(values["calls"]),
        ns_total=int(values["ns_total"]),
        ns_per_call=float(values["ns_per_call"]),
        t_pod=int(values["t_pod"]),
        t_start=int(values["t_start"]),
        t_end=int(values["t_end"]),
        chunk_p10=float(values.get("chunk_p10", 0)),
        chunk_p50=float(values.get("chunk_p50", 0)),
    )


def loop_argv(*args: str | int | Path) -> list[str]:
    return [str(tk_loop()), *(str(a) for a in args)]


def run_loop(*args: str | int | Path, timeout: float = 120) -> LoopRun:
    """Run tk_loop with these options and parse its report."""
    done = subprocess.run(
        loop_argv(*args), check=True, capture_output=True, text=True, timeout=timeout
    )
    return parse_loop_output(done.stdout)


# --- BPF run-time statistics -------------------------------------------------------------------


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """Kernel accounting of each BPF program's run count and time (BPF_ENABLE_STATS), on
    while the fd is held: never left on if the benchmark dies. It costs two clock reads
    per program run, so timed repetitions run without it."""
    fd = enable_run_time_stats()
    try:
        yield
    finally:
        os.close(fd)


def bpftool_progs() -> list[dict[str, object]]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    )
    progs: list[dict[str, object]] = json.loads(out.stdout or "[]")
    return progs


def prog_run_stats(ids: Sequence[int]) -> tuple[int, int]:
    """(run count, run time ns) summed over these program ids."""
    wanted = set(ids)
    runs = time_ns = 0
    for p in bpftool_progs():
        if p.get("id") in wanted:
            runs += int(str(p.get("run_cnt", 0)))
            time_ns += int(str(p.get("run_time_ns", 0)))
    return runs, time_ns


def bpftool_memlock(program_ids: Iterable[int]) -> int:
    """bytes_memlock of these programs and of every map they use, as bpftool counts it."""
    ids = list(program_ids)
    total, maps = 0, set[int]()
    for prog in (p for p in bpftool_progs() if p.get("id") in ids):
        total += int(str(prog["bytes_memlock"]))
        map_ids = prog.get("map_ids", [])
        assert isinstance(map_ids, list)
        maps.update(int(m) for m in map_ids)
    out = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return total + sum(int(m["bytes_memlock"]) for m in json.loads(out.stdout) if m["id"] in maps)


# --- the machine -----------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _dpkg_version(package: str) -> str:
    return _first_line(["dpkg-query", "-W", "-f", "${Version}", package])


def machine_details() -> list[tuple[str, str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    virt = "yes (hypervisor flag)" if flags and "hypervisor" in flags[1].split() else "no"
    perf = _first_line(["sh", "-c", "perf stat -x, -e instructions true 2>&1 >/dev/null"])
    return [
        ("kernel", platform.release()),
        ("CPU model", model[1].strip() if model else "unknown"),
        ("cores (online)", str(os.cpu_count())),
        ("memory", f"{int(mem[1]) / 1024 / 1024:.1f} GiB" if mem else "unknown"),
        ("virtualized", virt),
        ("BCC (libbpfcc)", _dpkg_version("libbpfcc")),
        ("bpftrace", _first_line(["bpftrace", "--version"])),
        ("bpftool", _first_line(["bpftool", "version"])),
        ("cc", _first_line(["cc", "--version"])),
        ("python", sys.version.split()[0]),
        ("hw counters (perf stat -e instructions)", perf),
    ]


# --- profiles ---------------------------------------------------------------------------------


def _where(key: tuple[str, int, str]) -> str:
    filename, line, func = key
    if filename == "~":  # a builtin or C function
        return func
    path = Path(filename)
    parts = path.parts
    for anchor in (
        "tracekeeper_agent",
        "tracekeeper_operator",
        "bcc",
        "aiohttp",
        "asyncio",
        "json",
        "bench",
    ):
        if anchor in parts:
            path = Path(*parts[parts.index(anchor) :])
            break
    else:
        path = Path(path.name)
    return f"{path}:{line} {func}"


IDLE = frozenset(
    {"<method 'poll' of 'select.epoll' objects>", "<method 'acquire' of '_thread.lock' objects>"}
)
"""Where a thread waits: left out of profile tables (reported as idle time)."""


def profile_table(
    title: str, profile: cProfile.Profile, *, top: int = 12, per: tuple[str, int] | None = None
) -> Table:
    """The top functions of a cProfile by own time, waiting left out; `per` = (unit, count)
    adds a column of own time per unit (e.g. per event)."""
    stats = pstats.Stats(profile)
    everything: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = getattr(
        stats, "stats", {}
    )
    raw = {k: v for k, v in everything.items() if k[2] not in IDLE}
    idle = sum(v[2] for k, v in everything.items() if k[2] in IDLE)
    total = sum(v[2] for v in raw.values()) or 1.0
    columns = ["function (own time order)", "calls", "own s", "own %", "cumulative s"]
    if per is not None:
        columns.append(f"own us/{per[0]}")
    table = Table(title, columns)
    ranked = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for key, (_cc, ncalls, own, cumulative, _callers) in ranked:
        cells = [
            _where(key),
            f"{ncalls:,}",
            f"{own:.3f}",
            f"{own / total:.1%}",
            f"{cumulative:.3f}",
        ]
        if per is not None:
            cells.append(f"{own / per[1] * 1e6:.3f}")
        table.add(*cells)
    table.notes.append(
        f"busy (profiled own time) {total:.3f} s, waiting {idle:.3f} s; cProfile inflates "
        "Python-level calls, so read shares, not absolute times"
    )
    return table


def perf_top(argv: Sequence[str], *, top: int = 15) -> list[tuple[float, str]] | None:
    """Run argv under `perf record -e cpu-clock` (this machine has no hardware counters) and
    return its top symbols by samples (kernel ones marked [k]); None without perf."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    with tempfile.TemporaryDirectory(prefix="tk-bench-perf-") as tmp:
        data = str(Path(tmp) / "perf.data")
        record = [perf, "record", "-q", "-e", "cpu-clock", "-F", "20000", "-o", data, "--"]
        done = subprocess.run([*record, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            return None
        report = subprocess.run(
            [perf, "report", "-i", data, "--no-children", "--sort", "sym", "-q", "--stdio"],
            capture_output=True,
            text=True,
        )
    rows = []
    for line in report.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\[.\])\s+(.+?)\s*$", line)
        if m:
            rows.append((float(m[1]), f"{m[2]} {m[3]}"))
    return rows[:top]


# --- programs loaded directly (not through the agent): one binding, or a reference's map ---

_LOADER: Any = None


def bench_loader() -> Any:
    """One BccLoader (one identity table) for the programs a benchmark loads itself."""
    global _LOADER
    if _LOADER is None:
        from tracekeeper_agent.bpf.loader import BccLoader

        _LOADER = BccLoader()
    return _LOADER


def fill_alone(program: Any, entries: Any, *, sampling: int = 1, rate_limit: int = 0) -> None:
    """Make `entries` (ports.FilterEntries) the targets of a program's binding 0, as the
    reconciler writes them for a probe alone in its program."""
    from tracekeeper_agent.programs.sharing import Binding, program_maps

    slots = {cgid: slot for slot, cgid in enumerate(sorted(entries.cgroups), start=1)}
    bench_loader().identities.sync(slots)
    binding = Binding(0, entries, sampling=sampling, rate_limit=rate_limit)
    program.update_maps(program_maps([binding], slots))


def fill_reference(program: Any, cgroup_ids: Iterable[int]) -> None:
    """The reference programs' own `tk_cgroups` hash (cgroup id -> 1)."""

    table = program._bpf[b"tk_cgroups"]  # a reference program's map: not the agent's seam
    for cgid in cgroup_ids:
        table[ctypes.c_ulonglong(cgid)] = ctypes.c_uint(1)
