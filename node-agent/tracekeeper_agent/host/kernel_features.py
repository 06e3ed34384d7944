"""What the running kernel can do for tracing, detected once and reported as a snapshot.

The program builder refuses what is missing with an `Unsupported` outcome whose message is
the check's evidence ("CONFIG_KPROBES is not set in /proc/config.gz"), and the agent reports
the snapshot so that the operator can show it.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tracekeeper_agent.host.tracefs import TracefsNotFound, find_tracefs

RING_BUFFER_SINCE = (5, 8)
BATCH_MAP_OPS_SINCE = (5, 6)
# BCC attaches through the *_EVENTS perf PMUs: the probe support alone is not enough.
_KPROBES = ("KPROBES", "KPROBE_EVENTS")
_UPROBES = ("UPROBES", "UPROBE_EVENTS")
_RELEASE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")
_UTS_RELEASE = re.compile(r'#define\s+UTS_RELEASE\s+"([^"]+)"')


@dataclass(frozen=True, slots=True)
class FeatureCheck:
    available: bool
    evidence: str  # why we believe it: quoted in status messages


@dataclass(frozen=True, slots=True)
class KernelFeatures:
    release: str
    version: tuple[int, int, int]
    config_source: str | None  # the kernel config file read, if any
    kprobes: FeatureCheck
    uprobes: FeatureCheck
    tracepoints: FeatureCheck
    btf: FeatureCheck
    ring_buffer: FeatureCheck
    batch_map_ops: FeatureCheck
    cgroup_v2: FeatureCheck  # what pod filters match on (bpf_get_current_cgroup_id)
    kernel_headers: FeatureCheck  # what BCC compiles against
    headers_dir: str | None
    headers_release: str | None  # from the headers' utsrelease.h; may differ from release


def parse_release(release: str) -> tuple[int, int, int]:
    m = _RELEASE.match(release)
    if m is None:
        return (0, 0, 0)
    return (int(m[1]), int(m[2]), int(m[3] or 0))


def parse_kernel_config(text: str) -> dict[str, str]:
    """CONFIG_X=y lines -> {'CONFIG_X': 'y'}; '# CONFIG_X is not set' -> 'n'."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            options[key] = value.strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            options[line[2:].split(" ", 1)[0]] = "n"
    return options


def read_kernel_config(
    release: str, *, proc: Path = Path("/proc"), boot: Path = Path("/boot")
) -> tuple[dict[str, str], str | None]:
    """The running kernel's config and where it came from ({}, None when unavailable)."""
    gz = proc / "config.gz"
    try:
        return parse_kernel_config(gzip.decompress(gz.read_bytes()).decode()), str(gz)
    except (OSError, EOFError, gzip.BadGzipFile):
        pass
    plain = boot / f"config-{release}"
    try:
        return parse_kernel_config(plain.read_text()), str(plain)
    except OSError:
        return {}, None


def detect(
    *,
    release: str | None = None,
    proc: Path = Path("/proc"),
    sysfs: Path = Path("/sys"),
    boot: Path = Path("/boot"),
    modules: Path = Path("/lib/modules"),
    tracefs: Path | None = None,
    environ: dict[str, str] | None = None,
) -> KernelFeatures:
    """Probe the running kernel (the paths are parameters so tests can fake a machine)."""
    release = release or os.uname().release
    env = dict(os.environ) if environ is None else environ
    config, source = read_kernel_config(release, proc=proc, boot=boot)
    if tracefs is None:
        try:
            tracefs = find_tracefs((sysfs / "kernel/tracing", sysfs / "kernel/debug/tracing"))
        except TracefsNotFound:
            tracefs = None
    pmu = sysfs / "bus/event_source/devices"
    version = parse_release(release)
    headers_dir = _headers_dir(release, modules, env)
    headers_release = _headers_release(headers_dir) if headers_dir else None
    return KernelFeatures(
        release=release,
        version=version,
        config_source=source,
        kprobes=_probe_check(_KPROBES, config, source, pmu / "kprobe", tracefs, "kprobe_events"),
        uprobes=_probe_check(_UPROBES, config, source, pmu / "uprobe", tracefs, "uprobe_events"),
        tracepoints=_tracepoints(config, source, tracefs),
        btf=_btf(sysfs / "kernel/btf/vmlinux"),
        ring_buffer=_ring_buffer(release, version),
        batch_map_ops=_batch_map_ops(release, version),
        cgroup_v2=_cgroup_v2(sysfs / "fs/cgroup"),
        kernel_headers=_headers_check(release, modules, headers_dir, headers_release),
        headers_dir=str(headers_dir) if headers_dir else None,
        headers_release=headers_release,
    )


def _config_check(
    options: tuple[str, ...], config: dict[str, str], source: str | None
) -> FeatureCheck | None:
    if source is None:
        return None
    for option in options:
        key = f"CONFIG_{option}"
        if config.get(key, "n") not in ("y", "m"):
            return FeatureCheck(False, f"{key} is not set in {source}")
    found = ", ".join(f"CONFIG_{o}={config[f'CONFIG_{o}']}" for o in options)
    return FeatureCheck(True, f"{found} in {source}")


def _probe_check(
    options: tuple[str, ...],
    config: dict[str, str],
    source: str | None,
    pmu: Path,
    tracefs: Path | None,
    events_file: str,
) -> FeatureCheck:
    # The config is authoritative; without one, the perf PMU (what BCC attaches through)
    # or the tracefs control file is the next best sign.
    if (check := _config_check(options, config, source)) is not None:
        return check
    if pmu.is_dir():
        return FeatureCheck(True, f"{pmu} exists (no kernel config readable)")
    if tracefs is not None and (tracefs / events_file).exists():
        return FeatureCheck(True, f"{tracefs / events_file} exists (no kernel config readable)")
    where = f"{pmu}" + (f" nor {tracefs / events_file}" if tracefs else "")
    return FeatureCheck(False, f"no kernel config readable, and neither {where} exists")


def _tracepoints(config: dict[str, str], source: str | None, tracefs: Path | None) -> FeatureCheck:
    check = _config_check(("TRACEPOINTS",), config, source)
    if check is not None and not check.available:
        return check
    if tracefs is None:
        return FeatureCheck(False, "tracefs is not mounted (/sys/kernel/tracing)")
    return FeatureCheck(True, f"tracefs at {tracefs}")


def _btf(vmlinux: Path) -> FeatureCheck:
    if vmlinux.is_file():
        return FeatureCheck(True, f"{vmlinux} exists")
    return FeatureCheck(False, f"{vmlinux} is absent (CONFIG_DEBUG_INFO_BTF off)")


def _ring_buffer(release: str, version: tuple[int, int, int]) -> FeatureCheck:
    since = ".".join(map(str, RING_BUFFER_SINCE))
    if version[:2] >= RING_BUFFER_SINCE:
        return FeatureCheck(True, f"kernel {release} >= {since}")
    return FeatureCheck(False, f"BPF ring buffers need kernel {since}; this is {release}")


def _batch_map_ops(release: str, version: tuple[int, int, int]) -> FeatureCheck:
    since = ".".join(map(str, BATCH_MAP_OPS_SINCE))
    if version[:2] >= BATCH_MAP_OPS_SINCE:
        return FeatureCheck(True, f"kernel {release} >= {since}")
    return FeatureCheck(False, f"batch map operations need kernel {since}; this is {release}")


def _cgroup_v2(cgroupfs: Path) -> FeatureCheck:
    # The unified hierarchy at the top (cgroup v2 only) or beside v1 controllers (hybrid).
    for root in (cgroupfs, cgroupfs / "unified"):
        if (root / "cgroup.controllers").is_file():
            return FeatureCheck(True, f"cgroup2 mounted at {root}")
    return FeatureCheck(False, f"no cgroup2 hierarchy under {cgroupfs}")


def _headers_dir(release: str, modules: Path, env: dict[str, str]) -> Path | None:
    # BCC honours BCC_KERNEL_SOURCE before /lib/modules/<release>/build.
    candidates = [Path(env["BCC_KERNEL_SOURCE"])] if env.get("BCC_KERNEL_SOURCE") else []
    candidates.append(modules / release / "build")
    for candidate in candidates:
        if (candidate / "include").is_dir():
            return candidate.resolve()
    return None


def _headers_release(headers: Path) -> str | None:
    try:
        text = (headers / "include/generated/utsrelease.h").read_text()
    except OSError:
        return None
    m = _UTS_RELEASE.search(text)
    return m[1] if m else None


def _headers_check(
    release: str, modules: Path, headers: Path | None, headers_release: str | None
) -> FeatureCheck:
    if headers is None:
        return FeatureCheck(False, f"no kernel headers at {modules / release / 'build'}")
    if headers_release and headers_release != release:
        # Tracepoint programs mostly work anyway (BCC builds their structs from tracefs),
        # but kprobe programs reading kernel structs could see wrong layouts.
        return FeatureCheck(True, f"headers at {headers} are for {headers_release}, not {release}")
    return FeatureCheck(True, f"headers at {headers}")
