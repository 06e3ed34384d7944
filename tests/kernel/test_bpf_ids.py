"""Program ids from fdinfo agree with bpftool's view from outside the process."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tracekeeper_agent.host.bpf_ids import NotABpfObject, prog_id

pytestmark = pytest.mark.kernel


def bpftool(*args: str) -> Any:
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_ids_match_bpftool() -> None:
    from bcc import BPF

    bpf = BPF(text=b"BPF_HASH(tk_ids_map, u32, u32); int tk_ids_prog(void *ctx) { return 0; }")
    try:
        fn = bpf.load_func(b"tk_ids_prog", BPF.SOCKET_FILTER)
        pid = prog_id(fn.fd)
        assert bpftool("prog", "show", "id", str(pid))["name"] == "tk_ids_prog"
    finally:
        bpf.cleanup()


def test_plain_fd_is_not_bpf() -> None:
    with open("/dev/null") as f, pytest.raises(NotABpfObject):
        prog_id(f.fileno())
