"""tracekeeper installed as the README says on a real node: the operator Deployment and the
agent DaemonSet run from the images built from the project's Dockerfiles, with their
ServiceAccounts, probes, Services and NetworkPolicy objects."""

from __future__ import annotations

import functools
import json
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.node.conftest import NS, Install
from tracekeeper_sim.local_node import NODE_NAME
from tracekeeper_sim.world import wait_until

pytestmark = pytest.mark.node

Sh = Callable[..., subprocess.CompletedProcess[str]]
REPO = Path(__file__).resolve().parents[2]


def pods(sh: Sh, selector: str, ns: str = NS) -> list[dict[str, Any]]:
    out = sh(f"kubectl get pods -n {ns} -l {selector} -o json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def one_pod(sh: Sh, name: str) -> dict[str, Any]:
    (pod,) = pods(sh, f"app.kubernetes.io/name={name}")
    return pod


def host_pid(pod: dict[str, Any], install: Install) -> int:
    """The host PID of a pod's first container (its runc task's init)."""
    cid = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    info = json.loads(install.node.crictl("inspect", cid))
    return int(info["info"]["pid"])


def test_node_runs_the_versions_built_here(install: Install, sh: Sh) -> None:
    info = json.loads(sh(f"kubectl get node {NODE_NAME} -o json").stdout)["status"]["nodeInfo"]
    server = json.loads(sh("kubectl version -o json").stdout)["serverVersion"]["gitVersion"]
    assert info["kubeletVersion"] == server
    # containerd reports its version without the v (the bin dir is containerd-v2.4.2).
    built = install.node.bin.containerd.name.removeprefix("containerd-v")
    assert info["containerRuntimeVersion"] == f"containerd://{built}"


@pytest.mark.parametrize(
    ("name", "image"),
    [("tracekeeper-operator", "tracekeeper-operator"), ("tracekeeper-agent", "tracekeeper-agent")],
)
def test_pods_run_from_the_built_images(install: Install, sh: Sh, name: str, image: str) -> None:
    pod = one_pod(sh, name)
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"] == NODE_NAME
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] is True
    assert status["restartCount"] == 0
    # The image the node's containerd imported from tests/node/images.sh's archive.
    ref = f"docker.io/library/{status['image'].split('/')[-1]}"
    assert ref.startswith(f"docker.io/library/{image}:")
    listed = install.node.ctr("images", "ls", "--quiet")
    assert ref in listed.split()
    assert status["imageID"].split("@")[-1] in install.node.crictl("inspecti", ref)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def test_readiness_and_liveness_answer(install: Install, sh: Sh) -> None:
    agent = one_pod(sh, "tracekeeper-agent")
    operator = one_pod(sh, "tracekeeper-operator")
    # What the kubelet's probes ask, asked here from the node as the kubelet does.
    for ip, port, path in (
        (agent["status"]["podIP"], 9440, "/healthz"),
        (agent["status"]["podIP"], 9440, "/readyz"),
        (operator["status"]["podIP"], 8081, "/healthz"),
    ):
        url = f"http://{ip}:{port}{path}"
        # kopf opens its liveness endpoint once its first listing is done.
        wait_until(f"{url} answering 200", functools.partial(_answers, url), 60)
    # The kubelet ran them too: Ready is the readiness probe's answer.
    ready = {c["type"]: c["status"] for c in agent["status"]["conditions"]}
    assert ready["Ready"] == "True"


def test_the_installed_objects(install: Install, sh: Sh) -> None:
    for kind, name in (
        ("serviceaccount", "tracekeeper-operator"),
        ("serviceaccount", "tracekeeper-agent"),
        ("networkpolicy", "tracekeeper-agent"),
        ("networkpolicy", "tracekeeper-operator"),
        ("service", "tracekeeper-agent"),
        ("service", "tracekeeper-output"),
    ):
        sh(f"kubectl get -n {NS} {kind} {name}")
    # The operator runs as its ServiceAccount (its token mounted by the kubelet).
    assert one_pod(sh, "tracekeeper-operator")["spec"]["serviceAccountName"] == (
        "tracekeeper-operator"
    )
    # The output API is served by the operator pod, through its Service.
    sh("kubectl wait --for=condition=Available apiservice/v1alpha1.output.tracekeeper.dev "
       "--timeout=120s", timeout=150)  # fmt: skip


def _caps(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


CAP = {"DAC_READ_SEARCH": 2, "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_RESOURCE": 24,
       "PERFMON": 38, "BPF": 39}  # fmt: skip


def test_agent_has_the_capabilities_the_manifest_grants(install: Install, sh: Sh) -> None:
    pid = host_pid(one_pod(sh, "tracekeeper-agent"), install)
    eff = _caps(pid, "CapEff")
    granted = {n for n, bit in CAP.items() if eff & (1 << bit)}
    # All but SYS_RESOURCE, which the overlay drops (this VM cannot grant it).
    assert granted == set(CAP) - {"SYS_RESOURCE"}
    # Nothing beyond the list (drop: [ALL]).
    assert eff & ~sum(1 << b for b in CAP.values()) == 0
    # In kubelet's cgroups, also in the cgroup2 hierarchy the agent's programs see.
    cgroup2 = next(
        line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if line.startswith("0::")
    )  # fmt: skip
    assert "/kubepods/" in cgroup2
