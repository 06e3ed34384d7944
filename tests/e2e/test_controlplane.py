"""The local control plane itself: a real apiserver, token authentication, RBAC enforced."""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tracekeeper_sim import local_cluster
from tracekeeper_sim.local_cluster import ControlPlaneError, LocalCluster

pytestmark = pytest.mark.e2e

GO_MOD = Path(__file__).resolve().parents[1] / "controlplane" / "go.mod"
LOCAL_CLUSTER = Path(local_cluster.__file__)


def _pinned_version() -> str:
    m = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes (v\S+)", GO_MOD.read_text(), re.M)
    assert m, f"k8s.io/kubernetes not required in {GO_MOD}"
    return m.group(1)


def test_apiserver_ready_and_versions_match(cluster: LocalCluster) -> None:
    assert cluster.request("/readyz")[0] == 200
    out = cluster.kubectl("version", "-o", "json", check=True).stdout
    versions = json.loads(out)
    # Built with the version stamped in (not v0.0.0-master), client and server alike.
    assert versions["serverVersion"]["gitVersion"] == _pinned_version()
    assert versions["clientVersion"]["gitVersion"] == _pinned_version()


def test_system_namespaces_bootstrapped(cluster: LocalCluster) -> None:
    out = cluster.kubectl("get", "namespaces", "-o", "name", check=True).stdout.split()
    for ns in ("default", "kube-system", "kube-public"):
        assert f"namespace/{ns}" in out


def test_unknown_token_is_unauthorized(cluster: LocalCluster) -> None:
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    req = urllib.request.Request(
        cluster.server + "/api/v1/namespaces", headers={"Authorization": "Bearer not-a-token"}
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, context=ctx, timeout=5)
    assert exc.value.code == 401


def test_users_are_who_the_kubeconfigs_say(cluster: LocalCluster) -> None:
    for user in cluster.users:
        out = cluster.kubectl("auth", "whoami", "-o", "json", user=user, check=True).stdout
        info = json.loads(out)["status"]["userInfo"]
        assert info["username"] == user
        groups = set(info.get("groups", []))
        if user == "admin":
            assert "system:masters" in groups
        else:
            assert groups == {"system:authenticated"}


def test_rbac_is_enforced_for_tenants(cluster: LocalCluster) -> None:
    res = cluster.kubectl("get", "pods", "-n", "kube-system", user="alice")
    assert res.returncode != 0
    assert (
        'User "alice" cannot list resource "pods" in API group "" in the namespace "kube-system"'
    ) in res.stderr
    can = cluster.kubectl("auth", "can-i", "list", "pods", "-n", "kube-system", user="alice")
    assert (can.returncode, can.stdout.strip()) == (1, "no")
    # The admin (system:masters) can: authorization is RBAC, not a blanket deny.
    cluster.kubectl("get", "pods", "-n", "kube-system", check=True)


def test_tenant_cannot_escalate_itself(cluster: LocalCluster) -> None:
    res = cluster.kubectl(
        "create", "clusterrolebinding", "alice-admin", "--clusterrole=cluster-admin",
        "--user=alice", user="alice",
    )  # fmt: skip
    assert res.returncode != 0
    assert "forbidden" in res.stderr.lower()


# -- LocalCluster's own behaviour: errors that say what to do, and a clean CLI lifecycle --


def test_missing_binaries_say_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(
        ControlPlaneError, match=r"missing etcd, kube-apiserver, kubectl .*build\.sh"
    ):
        LocalCluster(tmp_path / "no-bin", tmp_path / "c").start()


def test_taken_port_is_reported(cluster: LocalCluster, tmp_path: Path) -> None:
    other = LocalCluster(cluster.bin_dir, tmp_path / "c", apiserver_port=cluster.apiserver_port)
    with pytest.raises(
        ControlPlaneError, match=rf"kube-apiserver port 127.0.0.1:{cluster.apiserver_port} is taken"
    ):
        other.start()


def test_failed_start_carries_the_log_and_leaves_nothing_running(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    broken = LocalCluster(cluster.bin_dir, tmp_path / "c", extra_apiserver_args=["--no-such-flag"])
    with pytest.raises(ControlPlaneError, match="kube-apiserver exited with code") as exc:
        broken.start()
    assert "unknown flag: --no-such-flag" in str(exc.value)
    assert not broken.pids  # etcd was stopped too


def test_cli_runs_until_sigterm(cluster: LocalCluster, tmp_path: Path) -> None:
    cdir = tmp_path / "cli"
    proc = subprocess.Popen(
        [sys.executable, str(LOCAL_CLUSTER), "start", "--dir", str(cdir),
         "--bin-dir", str(cluster.bin_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        kubeconfig = proc.stdout.readline().strip()  # printed once the cluster is ready
        assert kubeconfig == str(cdir / "kubeconfig-admin"), (
            proc.stderr.read() if proc.stderr else ""
        )
        pids = dict(line.split() for line in (cdir / "pids").read_text().splitlines())
        assert set(pids) == {"etcd", "kube-apiserver", "local_cluster"}
        kubectl = str(cluster.bin_dir / "kubectl")
        res = subprocess.run(
            [kubectl, "--kubeconfig", kubeconfig, "get", "ns", "default"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for name in ("etcd", "kube-apiserver"):
        assert not Path(f"/proc/{pids[name]}").exists(), f"{name} still running"
    assert not (cdir / "pids").exists()
