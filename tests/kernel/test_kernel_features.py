"""The snapshot against what this kernel actually does when BCC tries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tracekeeper_agent.host.kernel_features import detect

pytestmark = pytest.mark.kernel

NOOP = b"int probe(void *ctx) { return 0; }"


def test_snapshot_of_this_machine() -> None:
    f = detect()
    assert f.release == os.uname().release
    assert f.config_source is not None
    assert f.uprobes.available
    assert f.tracepoints.available
    assert f.btf.available
    assert f.ring_buffer.available
    assert f.kernel_headers.available
    # The kprobe PMU is an independent sign: BCC attaches kprobes through it.
    assert f.kprobes.available == Path("/sys/bus/event_source/devices/kprobe").is_dir()


def test_kprobes_verdict_matches_bcc() -> None:
    """Reported unsupported (as on this build machine) -> BCC cannot attach one, and the
    evidence names the missing option; reported supported -> BCC can."""
    from bcc import BPF

    f = detect()
    bpf = BPF(text=NOOP)
    try:
        if f.kprobes.available:
            bpf.attach_kprobe(event=b"do_nanosleep", fn_name=b"probe")
        else:
            assert "CONFIG_KPROBES" in f.kprobes.evidence
            with pytest.raises(Exception, match="kprobe"):
                bpf.attach_kprobe(event=b"do_nanosleep", fn_name=b"probe")
    finally:
        bpf.cleanup()


def test_uprobes_verdict_matches_bcc() -> None:
    from bcc import BPF

    assert detect().uprobes.available
    bpf = BPF(text=NOOP)
    try:
        bpf.attach_uprobe(name=b"c", sym=b"getpid", fn_name=b"probe")
        assert bpf.num_open_uprobes() == 1
    finally:
        bpf.cleanup()
