"""Node tier fixtures: a real node (containerd, runc, kubelet, kube-proxy, controllers)
beside the real control plane, tracekeeper installed on it with `kubectl apply -k` from
the images built from its Dockerfiles.

The binaries and images are built (or found in the cache) once, after collection and
before any test runs: a cold build takes minutes and must not be cut short by the per-test
timeout. A failed build fails every node test: CI must never pass without them. The files
run in name order and share one installation: test_install.py installs and checks it,
test_tracing.py traces with it, test_uninstall.py removes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tracekeeper_sim.local_cluster import ControlPlaneError, LocalCluster, build_binaries
from tracekeeper_sim.local_node import (
    LocalNode,
    NodeBinaries,
    build_images,
    build_node_binaries,
    node_ip,
)

REPO = Path(__file__).resolve().parents[2]
NODE_TESTS = Path(__file__).resolve().parent
OVERLAY = NODE_TESTS / "overlay"
NS = "tracekeeper-system"
# kubectl finds `kubectl-tracekeeper` (the project's console script) on PATH.
VENV_BIN = Path(sys.executable).parent


@dataclass
class _Built:
    cp_bin: Path
    node_bin: NodeBinaries
    images: dict[str, Path]


_built: _Built | None = None
_build_error: str | None = None


def _collected(session: pytest.Session) -> bool:
    return any(NODE_TESTS in Path(str(item.path)).parents for item in session.items)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    global _built, _build_error
    if not _collected(session) or session.config.option.collectonly or os.geteuid() != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("node: building or reusing kubelet & co, containerd and the images")
    capman = session.config.pluginmanager.get_plugin("capturemanager")
    try:
        if capman is not None:
            capman.suspend_global_capture(in_=False)
        _built = _Built(build_binaries(echo=True), build_node_binaries(), build_images())
    except ControlPlaneError as e:
        _build_error = str(e)
    finally:
        if capman is not None:
            capman.resume_global_capture()


@pytest.fixture(scope="session")
def built() -> _Built:
    if os.geteuid() != 0:
        pytest.skip("a real node (containerd, kubelet, iptables, mounts): needs root")
    if _build_error is not None:
        pytest.fail(f"node tier build failed:\n{_build_error}", pytrace=False)
    assert _built is not None
    return _built


@pytest.fixture(scope="session")
def node_cluster(built: _Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(built.cp_bin, tmp_path_factory.mktemp("node-cluster"), node_ip=node_ip())
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def node(
    built: _Built, node_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    # Not under pytest's tmp dir: kubelet's and containerd's roots hold overlay mounts and
    # sockets (a path short enough for a unix socket).
    n = LocalNode(node_cluster, built.node_bin, built.images, Path(f"/run/tk-node-{os.getpid()}"))
    n.start()
    try:
        yield n
    finally:
        n.stop()


def kubectl_env(cluster: LocalCluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["PATH"] = f"{cluster.bin_dir}:{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["KUBECACHEDIR"] = str(cluster.dir / "kube-cache")
    return env


@pytest.fixture(scope="session")
def sh(node_cluster: LocalCluster) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a shell command line as a user would, with this cluster's kubectl (and the
    kubectl-tracekeeper plugin) on PATH and KUBECONFIG set for ``user``."""

    def run(
        cmd: str, *, user: str = "admin", check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        env = kubectl_env(node_cluster)
        env["KUBECONFIG"] = str(node_cluster.kubeconfig(user))
        res = subprocess.run(
            ["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=timeout,
            cwd=REPO,
        )  # fmt: skip
        if check and res.returncode != 0:
            raise AssertionError(f"$ {cmd}\n(exit {res.returncode})\n{res.stdout}{res.stderr}")
        return res

    return run


@dataclass
class Install:
    cluster: LocalCluster
    node: LocalNode
    token: str


@pytest.fixture(scope="session")
def install(
    node: LocalNode, node_cluster: LocalCluster, sh: Callable[..., subprocess.CompletedProcess[str]]
) -> Install:
    """The README's "Install on a cluster", steps 2-4, as written (the overlay is step 1's
    "your own kustomize overlay"). test_uninstall.py removes it."""
    sh(f"kubectl apply -k {OVERLAY.relative_to(REPO)}")
    # Step 3 as the README has it, openssl rand included.
    sh(
        f"kubectl -n {NS} create secret generic tracekeeper-agent-token "
        '--from-literal=token="$(openssl rand -hex 32)"'
    )
    token = sh(f"kubectl -n {NS} get secret tracekeeper-agent-token "
               "-o jsonpath='{.data.token}' | base64 -d").stdout  # fmt: skip
    sh(f"kubectl -n {NS} rollout status deploy/tracekeeper-operator --timeout=240s", timeout=300)
    sh(f"kubectl -n {NS} rollout status ds/tracekeeper-agent --timeout=240s", timeout=300)
    return Install(node_cluster, node, token)
