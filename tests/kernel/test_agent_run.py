"""`tracekeeper-agent run`: standalone tracing of host processes, ended by --for or Ctrl-C
with its programs detached."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.conftest import run_in_cgroup
from tests.kernel.test_agent_api import bpf_prog_ids
from tracekeeper_sim.kubelet import create_cgroup

pytestmark = pytest.mark.kernel

AGENT = Path(sys.executable).parent / "tracekeeper-agent"

PROBE = """\
apiVersion: tracekeeper.dev/v1alpha1
kind: TraceProbe
metadata:
  name: cat-opens
spec:
  tracepoint: syscalls:sys_enter_openat
  filterRef: sandbox
  output:
    kind: count
    by: [comm]
---
apiVersion: tracekeeper.dev/v1alpha1
kind: TraceFilter
metadata:
  name: sandbox
spec:
  cgroupPaths: [{path}]
"""


def start(probe_file: Path, *args: str) -> tuple[subprocess.Popen[str], list[int]]:
    """Start `run` and wait until it reports its probe loaded; returns the program ids."""
    proc = subprocess.Popen(
        [str(AGENT), "run", "-f", str(probe_file), "-o", "json", "--interval", "200ms", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the outcome line comes once the program is attached
    match = re.match(r"default/cat-opens: Loaded \(program ids ([\d, ]+);", line)
    if match is None:
        proc.kill()
        pytest.fail(f"not loaded: {line}{proc.stderr.read()}")
    return proc, [int(i) for i in match[1].split(", ")]


def final_count(stdout: str) -> int:
    counts = [json.loads(line) for line in stdout.splitlines() if '"counts"' in line]
    assert counts, stdout
    return sum(row["count"] for row in counts[-1]["counts"] if row.get("comm") == "cat")


@pytest.fixture
def probe_file(cgroup_root: Path, cgroup_sandbox: Path, tmp_path: Path) -> Path:
    path = tmp_path / "probe.yaml"
    path.write_text(PROBE.format(path="/" + str(cgroup_sandbox.relative_to(cgroup_root))))
    return path


def test_run_for_a_duration(probe_file: Path, cgroup_sandbox: Path) -> None:
    inside = cgroup_sandbox / "job"
    create_cgroup(inside)  # below the traced cgroup: covered too
    proc, ids = start(probe_file, "--for", "3s")
    for _ in range(3):
        run_in_cgroup(inside, "cat", "/etc/hostname")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert final_count(stdout) >= 3
    assert not set(ids) & set(bpf_prog_ids())  # detached on the way out


def test_ctrl_c_ends_cleanly(probe_file: Path, cgroup_sandbox: Path) -> None:
    proc, ids = start(probe_file)
    run_in_cgroup(cgroup_sandbox, "cat", "/etc/hostname")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert final_count(stdout) >= 1
    assert not set(ids) & set(bpf_prog_ids())
