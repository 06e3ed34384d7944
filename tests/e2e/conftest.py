"""e2e fixtures: a real kube-apiserver + etcd (tests/controlplane), shared by the session.

The binaries are built (or found in the cache) once, after collection and before any test
runs, so that a first build on a fresh machine (~5 minutes) is not cut short by the
per-test timeout. A failed build fails every e2e test: CI must never pass without them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tracekeeper_sim.local_cluster import (
    BUILD_SCRIPT,
    ControlPlaneError,
    LocalCluster,
    build_binaries,
)

REPO = Path(__file__).resolve().parents[2]

E2E_DIR = Path(__file__).resolve().parent
CRDS_DIR = REPO / "crds"

_bin_dir: Path | None = None
_build_error: str | None = None


def _collected_e2e(session: pytest.Session) -> bool:
    return any(E2E_DIR in Path(str(item.path)).parents for item in session.items)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    global _bin_dir, _build_error
    if not _collected_e2e(session) or session.config.option.collectonly:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"e2e: building or reusing the control plane ({BUILD_SCRIPT})")
    capman = session.config.pluginmanager.get_plugin("capturemanager")
    try:
        # Show build.sh's progress live: a first build is long and should not look hung.
        if capman is not None:
            capman.suspend_global_capture(in_=False)
        _bin_dir = build_binaries(echo=True)
    except ControlPlaneError as e:
        _build_error = str(e)
    finally:
        if capman is not None:
            capman.resume_global_capture()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if _build_error is not None:
        pytest.fail(f"control plane build failed:\n{_build_error}", pytrace=False)
    bin_dir = _bin_dir if _bin_dir is not None else build_binaries(echo=False)
    c = LocalCluster(bin_dir, tmp_path_factory.mktemp("cluster"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> list[str]:
    """Apply crds/ and wait until every CRD is established; return their names."""
    files = sorted(CRDS_DIR.glob("*.yaml"))
    assert files, f"no CRDs in {CRDS_DIR}"
    cluster.kubectl("apply", "-f", str(CRDS_DIR), check=True)
    names = cluster.kubectl(
        "get", "-f", str(CRDS_DIR), "-o", "jsonpath={.items[*].metadata.name}", check=True
    ).stdout.split()
    cluster.kubectl(
        "wait", "--for", "condition=established", "--timeout=60s",
        *(f"crd/{n}" for n in names), check=True,
    )  # fmt: skip
    return names


@pytest.fixture(scope="session")
def make_namespace(cluster: LocalCluster) -> Callable[[str], str]:
    """Create a uniquely named namespace ``prefix-xxxxxx``. The cluster is thrown away at
    the end of the session, and no namespace controller runs to finalize a deletion, so
    namespaces are left in place."""

    def make(prefix: str = "e2e") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "namespace", name, check=True)
        return name

    return make
