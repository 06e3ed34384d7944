"""The README's uninstall: TraceProbes deleted first (the operator releases their
finalizers), then `kubectl delete -k`; nothing of tracekeeper is left running or pinned."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from tests.node.conftest import NS, OVERLAY, REPO, Install
from tracekeeper_agent.host.bpffs import PIN_ROOT
from tracekeeper_sim.local_node import NODE_NAME
from tracekeeper_sim.world import wait_until

pytestmark = pytest.mark.node

Sh = Callable[..., subprocess.CompletedProcess[str]]


def test_uninstall_leaves_nothing_running(install: Install, sh: Sh) -> None:
    sh("kubectl delete tp --all -A --timeout=120s", timeout=150)
    assert sh("kubectl get tp -A -o name").stdout.strip() == ""
    sh(f"kubectl delete -k {OVERLAY.relative_to(REPO)} --wait=true --timeout=180s", timeout=240)
    wait_until(
        f"namespace {NS} gone",
        lambda: sh(f"kubectl get namespace {NS}", check=False).returncode != 0,
        120,
    )
    assert sh("kubectl get crd -o name | grep tracekeeper.dev || true").stdout.strip() == ""
    assert sh("kubectl get apiservice v1alpha1.output.tracekeeper.dev", check=False).returncode
    # No tracekeeper container left running on the node (exited ones stay listed until the
    # kubelet's garbage collection).
    label = f"io.kubernetes.pod.namespace={NS}"
    wait_until(
        "no tracekeeper container running",
        lambda: install.node.crictl("ps", "--label", label, "-q").strip() == "",
        60,
    )
    # Nor any of its programs: the agent stopped cleanly unpinned them (only a killed
    # agent leaves them, for its successor).
    pins = PIN_ROOT / NODE_NAME
    assert not pins.exists() or not any(pins.iterdir()), sorted(pins.rglob("*"))
