from __future__ import annotations

import gzip
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from tracekeeper_agent.host.kernel_features import (
    KernelFeatures,
    detect,
    parse_kernel_config,
    parse_release,
)

RELEASE = "6.18.44-fc-v657"
CONFIG_NO_KPROBES = """\
CONFIG_BPF_SYSCALL=y
CONFIG_UPROBES=y
CONFIG_UPROBE_EVENTS=y
# CONFIG_KPROBES is not set
CONFIG_TRACEPOINTS=y
CONFIG_LOCALVERSION="-fc"
"""


class Machine:
    """A fake /proc, /sys, /boot and /lib/modules under a tmp dir."""

    def __init__(self, base: Path) -> None:
        self.proc, self.sys = base / "proc", base / "sys"
        self.boot, self.modules = base / "boot", base / "modules"
        for d in (self.proc, self.sys, self.boot, self.modules):
            d.mkdir()

    def config_gz(self, text: str) -> None:
        (self.proc / "config.gz").write_bytes(gzip.compress(text.encode()))

    def tracefs(self, *files: str) -> None:
        events = self.sys / "kernel/tracing/events"
        events.mkdir(parents=True)
        for name in files:
            (events.parent / name).write_text("")

    def pmu(self, name: str) -> None:
        (self.sys / "bus/event_source/devices" / name).mkdir(parents=True)

    def btf(self) -> None:
        (self.sys / "kernel/btf").mkdir(parents=True)
        (self.sys / "kernel/btf/vmlinux").write_bytes(b"\x9f\xeb")

    def headers(self, release: str, for_release: str | None = None) -> Path:
        build = self.modules / release / "build"
        (build / "include/generated").mkdir(parents=True)
        uts = f'#define UTS_RELEASE "{for_release or release}"\n'
        (build / "include/generated/utsrelease.h").write_text(uts)
        return build

    def detect(self, release: str = RELEASE, env: dict[str, str] | None = None) -> KernelFeatures:
        return detect(
            release=release,
            proc=self.proc,
            sysfs=self.sys,
            boot=self.boot,
            modules=self.modules,
            environ=env or {},
        )


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def test_parse_release() -> None:
    assert parse_release(RELEASE) == (6, 18, 44)
    assert parse_release("5.8-rc1") == (5, 8, 0)
    assert parse_release("garbage") == (0, 0, 0)


def test_parse_config() -> None:
    config = parse_kernel_config(CONFIG_NO_KPROBES)
    assert config["CONFIG_UPROBES"] == "y"
    assert config["CONFIG_KPROBES"] == "n"
    assert config["CONFIG_LOCALVERSION"] == "-fc"


def test_this_build_machine(machine: Machine) -> None:
    machine.config_gz(CONFIG_NO_KPROBES)
    machine.tracefs("uprobe_events")
    machine.pmu("uprobe")
    machine.btf()
    build = machine.headers(RELEASE)
    f = machine.detect()
    assert f.version == (6, 18, 44)
    assert f.config_source == str(machine.proc / "config.gz")
    assert not f.kprobes.available
    assert f.kprobes.evidence == f"CONFIG_KPROBES is not set in {machine.proc / 'config.gz'}"
    assert f.uprobes.available
    assert f.tracepoints.available
    assert f.btf.available
    assert f.ring_buffer.available
    assert f.kernel_headers.available
    assert f.headers_dir == str(build.resolve())
    assert f.headers_release == RELEASE
    # The snapshot is what the agent reports: plain JSON.
    assert json.loads(json.dumps(asdict(f)))["kprobes"]["available"] is False


def test_config_wins_over_runtime_signs(machine: Machine) -> None:
    machine.config_gz(CONFIG_NO_KPROBES)
    machine.pmu("kprobe")
    assert not machine.detect().kprobes.available


def test_without_config_runtime_signs_decide(machine: Machine) -> None:
    f = machine.detect()
    assert f.config_source is None
    assert not f.kprobes.available
    assert "no kernel config" in f.kprobes.evidence
    assert not f.tracepoints.available
    assert not f.btf.available
    machine.pmu("kprobe")
    machine.tracefs("uprobe_events")
    f = machine.detect()
    assert f.kprobes.available
    assert f.uprobes.available
    assert f.tracepoints.available


def test_boot_config_fallback(machine: Machine) -> None:
    (machine.boot / f"config-{RELEASE}").write_text("CONFIG_KPROBES=y\nCONFIG_KPROBE_EVENTS=y\n")
    f = machine.detect()
    assert f.kprobes.available
    assert f.kprobes.evidence.startswith("CONFIG_KPROBES=y, CONFIG_KPROBE_EVENTS=y in ")
    assert f.config_source == str(machine.boot / f"config-{RELEASE}")
    assert not f.uprobes.available


def test_probes_without_their_perf_events_are_unusable(machine: Machine) -> None:
    machine.config_gz("CONFIG_KPROBES=y\n# CONFIG_KPROBE_EVENTS is not set\n")
    f = machine.detect()
    assert not f.kprobes.available
    assert "CONFIG_KPROBE_EVENTS is not set" in f.kprobes.evidence


def test_old_kernel_has_no_ring_buffer(machine: Machine) -> None:
    f = machine.detect(release="5.4.0-150-generic")
    assert not f.ring_buffer.available
    assert "5.8" in f.ring_buffer.evidence


def test_headers_missing_or_mismatched(machine: Machine) -> None:
    f = machine.detect()
    assert not f.kernel_headers.available
    assert f.headers_dir is None
    machine.headers(RELEASE, for_release="6.1.0-56-amd64")
    f = machine.detect()
    assert f.kernel_headers.available
    assert f.headers_release == "6.1.0-56-amd64"
    assert "6.1.0-56-amd64, not 6.18.44-fc-v657" in f.kernel_headers.evidence


def test_bcc_kernel_source_env(machine: Machine, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "include").mkdir(parents=True)
    f = machine.detect(env={"BCC_KERNEL_SOURCE": str(src)})
    assert f.headers_dir == str(src.resolve())
    assert f.kernel_headers.available
