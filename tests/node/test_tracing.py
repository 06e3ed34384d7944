"""Real tracing on a real node: workload pods started by kubelet from a local image, the
README's examples applied as the tenant alice, the output read as alice through
`kubectl tracekeeper`. Tests run in file order on one tenant namespace."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.node.conftest import NS, Install, kubectl_env
from tests.node.test_install import one_pod, pods
from tracekeeper_agent.targets.pod_paths import pod_cgroup_paths
from tracekeeper_sim.world import wait_until

pytestmark = pytest.mark.node

Sh = Callable[..., subprocess.CompletedProcess[str]]
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ("file-opens-by-pod", "exec-events")
WORKLOAD_BINARY = "/usr/local/bin/tk-workload"
WAIT = 90.0


def _workload(ns: str) -> list[dict[str, Any]]:
    """web: a Deployment of the workload image (it holds tk-workload); db: one pod of
    busybox only. Every container start runs tk-workload once, then sleeps."""
    container = {
        "name": "app",
        "image": "tk-workload:1",
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", f"{WORKLOAD_BINARY} opens 3 /etc/hostname; exec sleep 1000000"],
    }
    pod_spec = {"terminationGracePeriodSeconds": 1, "containers": [container]}
    web = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod_spec},
        },
    }
    db = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "db-0", "namespace": ns, "labels": {"app": "db"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": "tk-busybox:1", "imagePullPolicy": "Never",
                            "command": ["sleep", "1000000"]}],
        },
    }  # fmt: skip
    return [web, db]


# The tier's own probes beside the README's: exact counts (only tk-workload's opens), and a
# uprobe on a binary that exists only in the workload image.
def _own_probes() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "tracekeeper.dev/v1alpha1",
            "kind": "TraceProbe",
            "metadata": {"name": "workload-opens"},
            "spec": {
                "tracepoint": "syscalls:sys_enter_openat",
                "filter": {"processNames": ["tk-workload"]},
                "output": {"kind": "count", "by": ["pod"]},
            },
        },
        {
            "apiVersion": "tracekeeper.dev/v1alpha1",
            "kind": "TraceProbe",
            "metadata": {"name": "workload-ticks"},
            "spec": {
                "uprobe": {"binary": WORKLOAD_BINARY, "symbol": "tk_workload_tick"},
                "output": {"kind": "count", "by": ["pod"]},
            },
        },
    ]


@dataclass
class Tenant:
    ns: str
    sh: Sh
    install: Install

    def alice(self, cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.sh(cmd, user="alice", **kw)

    def web_pods(self) -> list[str]:
        return sorted(
            p["metadata"]["name"] for p in pods(self.sh, "app=web", self.ns)
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        )  # fmt: skip

    def exec(self, pod: str, cmd: str) -> None:
        self.sh(f"kubectl exec -n {self.ns} {pod} -- {cmd}")

    def counts(self, probe: str) -> dict[str, int]:
        """kubectl tracekeeper top NAME --once -o json, as alice: {pod: count}."""
        out = self.alice(f"kubectl tracekeeper top {probe} -n {self.ns} --once -o json").stdout
        return {row["key"]["pod"]: row["count"] for row in json.loads(out)["counts"]}

    def nodes(self, probe: str) -> dict[str, dict[str, str]]:
        """kubectl tracekeeper status NAME, as alice: the per-node table's rows."""
        out = self.alice(f"kubectl tracekeeper status {probe} -n {self.ns}").stdout
        lines = out.splitlines()
        head = next(i for i, line in enumerate(lines) if line.startswith("NODE "))
        rows = {}
        for line in lines[head + 1 :]:
            if line.startswith("("):
                break
            cells = line.split()  # KERNEL MEM is two words ("5.1 MiB") or "-"
            node, state, reason, programs, entries, pods_, drops, ns_per_call = cells[:8]
            rows[node] = {"state": state, "reason": reason, "programs": programs,
                          "filter_entries": entries, "pods": pods_, "drops": drops,
                          "ns_per_call": ns_per_call, "kernel": cells[-1]}  # fmt: skip
        return rows

    def coverage(self) -> tuple[int, int, int]:
        """From the agent pod's token-free metrics port: pod cgroups the kernel claimed in
        their mkdir (announced first), and new pods the agent covered itself before and
        after their first process (tracekeeper_agent_pods_covered_total)."""
        agent = one_pod(self.sh, "tracekeeper-agent")
        url = f"http://{agent['status']['podIP']}:9441/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        wanted = (
            "tracekeeper_agent_cgroups_claimed_total",
            'tracekeeper_agent_pods_covered_total{when="before_first_process"}',
            'tracekeeper_agent_pods_covered_total{when="after_first_process"}',
        )
        samples = [ln.rpartition(" ") for ln in text.splitlines() if not ln.startswith("#")]
        found = {name: int(float(value)) for name, _, value in samples}
        missing = [w for w in wanted if w not in found]
        assert not missing, f"no {missing} in {url}"
        claimed, before, after = (found[w] for w in wanted)
        return claimed, before, after

    def ready(self, probe: str) -> bool:
        res = self.alice(
            f"kubectl get tp {probe} -n {self.ns} "
            "-o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}'"
        )
        return res.stdout.strip() == "True"

    def tail(self, probe: str, duration: str) -> subprocess.Popen[str]:
        """kubectl tracekeeper tail NAME --for DURATION -o json, as alice, in the background
        (read it with :func:`tail_events`)."""
        cluster = self.install.cluster
        return subprocess.Popen(
            [str(cluster.binary("kubectl")), "tracekeeper", "tail", probe, "-n", self.ns,
             "--for", duration, "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**kubectl_env(cluster), "KUBECONFIG": str(cluster.kubeconfig("alice"))},
        )  # fmt: skip

    def wait_ready(self, probe: str) -> None:
        def describe() -> str:
            return self.alice(f"kubectl describe tp {probe} -n {self.ns}").stdout

        wait_until(f"{probe} Ready", lambda: self.ready(probe), WAIT, describe=describe)

    def wait_count(self, probe: str, pod: str, want: Callable[[int], bool]) -> int:
        def check() -> int | None:
            n = self.counts(probe).get(pod, 0)
            return n if want(n) else None

        return wait_until(f"{probe} count of {pod}", check, WAIT,
                          describe=lambda: json.dumps(self.counts(probe)))  # fmt: skip


def tail_events(tail: subprocess.Popen[str]) -> str:
    """What the tail printed; it must end on its own after --for."""
    try:
        out, err = tail.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        tail.kill()
        out, err = tail.communicate()
        raise AssertionError(
            f"kubectl tracekeeper tail did not stop after --for; printed:\n{out}\n{err}"
        ) from None
    assert tail.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def tenant(install: Install, sh: Sh) -> Iterator[Tenant]:
    ns = f"shop-{uuid.uuid4().hex[:6]}"
    sh(f"kubectl create namespace {ns}")
    # README step 5: a team with edit in its namespace.
    sh(f"kubectl create rolebinding alice-edit --clusterrole=edit --user=alice -n {ns}")
    docs = yaml.safe_dump_all(_workload(ns))
    subprocess.run(
        [str(install.cluster.binary("kubectl")), "--kubeconfig",
         str(install.cluster.kubeconfig()), "apply", "-f", "-"],
        input=docs, text=True, check=True, capture_output=True, env=kubectl_env(install.cluster),
    )  # fmt: skip
    sh(f"kubectl -n {ns} rollout status deploy/web --timeout=120s", timeout=150)
    sh(f"kubectl -n {ns} wait --for=condition=Ready pod/db-0 --timeout=120s", timeout=150)
    t = Tenant(ns, sh, install)
    for example in EXAMPLES:
        t.alice(f"kubectl apply -n {ns} -f examples/{example}.yaml")
    own = REPO / ".pytest_cache" / f"node-probes-{os.getpid()}.yaml"
    own.parent.mkdir(exist_ok=True)
    own.write_text(yaml.safe_dump_all(_own_probes()))
    try:
        t.alice(f"kubectl apply -n {ns} -f {own}")
    finally:
        own.unlink()
    yield t
    sh(f"kubectl delete tp --all -n {ns} --timeout=60s", check=False, timeout=90)


PROBES = ("web-file-opens", "exec-events", "workload-opens", "workload-ticks")


def test_the_readme_examples_reach_ready_as_alice(tenant: Tenant) -> None:
    for probe in PROBES:
        tenant.wait_ready(probe)
    out = tenant.alice(f"kubectl get tp -n {tenant.ns}").stdout
    print(f"\n$ kubectl get tp -n {tenant.ns}  (as alice)\n{out}")


def test_counts_match_what_the_workload_did(tenant: Tenant) -> None:
    web = tenant.web_pods()[0]
    # (The pods' own tk-workload runs at start came before the probes: not counted.)
    before = tenant.counts("web-file-opens").get(web, 0)
    tenant.exec(web, f"{WORKLOAD_BINARY} opens 40 /etc/passwd")
    tenant.wait_count("workload-opens", web, lambda n: n == 40)
    # The README's probe counts every open of the pod: at least these 40.
    tenant.wait_count("web-file-opens", web, lambda n: n >= before + 40)
    tenant.exec("db-0", "cat /etc/passwd")
    time.sleep(2)
    # db-0 is not app=web, and runs no tk-workload.
    assert "db-0" not in tenant.counts("web-file-opens")
    assert "db-0" not in tenant.counts("workload-opens")


def test_exec_events_name_the_pod_and_the_file(tenant: Tenant) -> None:
    web = tenant.web_pods()[0]
    tail = tenant.tail("exec-events", "12s")
    time.sleep(3)
    tenant.exec(web, f"{WORKLOAD_BINARY} ticks 1")
    tenant.exec("db-0", "cat /etc/hostname")
    out = tail_events(tail)
    seen = {(e["pod"], e["filename"]) for e in map(json.loads, out.splitlines())
            if e.get("type", "event") == "event" and "filename" in e}  # fmt: skip
    assert (web, WORKLOAD_BINARY) in seen, out
    assert ("db-0", "/bin/cat") in seen, out


def test_a_uprobe_on_a_binary_only_in_the_workload_image(tenant: Tenant) -> None:
    assert not Path(WORKLOAD_BINARY).exists(), "the binary must exist only inside the image"
    web = tenant.web_pods()[0]
    before = tenant.counts("workload-ticks").get(web, 0)
    tenant.exec(web, f"{WORKLOAD_BINARY} ticks 7")
    tenant.wait_count("workload-ticks", web, lambda n: n == before + 7)
    # db-0's container has no such file: skipped, the probe still loaded and Ready.
    assert "db-0" not in tenant.counts("workload-ticks")
    assert tenant.ready("workload-ticks")


def test_a_new_pod_is_counted_from_its_first_exec(tenant: Tenant) -> None:
    programs = tenant.nodes("exec-events")
    old = set(tenant.web_pods())
    coverage = tenant.coverage()
    tail = tenant.tail("exec-events", "25s")
    time.sleep(3)
    tenant.sh(f"kubectl -n {tenant.ns} scale deploy/web --replicas=3")
    tenant.sh(f"kubectl -n {tenant.ns} rollout status deploy/web --timeout=120s", timeout=150)
    (new,) = set(tenant.web_pods()) - old
    # Its start ran tk-workload (3 opens) right after the container's first exec (sh).
    tenant.wait_count("workload-opens", new, lambda n: n == 3)
    out = tail_events(tail)
    files = [e["filename"] for e in map(json.loads, out.splitlines())
             if e.get("pod") == new and "filename" in e]  # fmt: skip
    # The sandbox's /pause may come first (the pod is traced from its sandbox on); the
    # container's own first exec is its command, sh, then the tk-workload it runs.
    container = [f for f in files if f != "/pause"]
    assert container[:2] == ["/bin/sh", WORKLOAD_BINARY], out
    # The paths the agent derives for a pending pod hold the one this kubelet gave it...
    uid = tenant.sh(f"kubectl -n {tenant.ns} get pod {new} -o jsonpath={{.metadata.uid}}").stdout
    proc = tenant.sh(f"kubectl exec -n {tenant.ns} {new} -- cat /proc/1/cgroup").stdout
    (v2,) = [line.split("::", 1)[1] for line in proc.splitlines() if line.startswith("0::")]
    pod_dir = str(PurePosixPath(v2).parent)
    kubepods = PurePosixPath(pod_dir.split("/")[1])
    assert pod_dir in pod_cgroup_paths(uid, [kubepods]), (pod_dir, uid)
    # ...and how the race went: the pod announced before its cgroup2 mkdir (claimed by the
    # kernel in it), or covered by the agent after the mkdir, before any process ran in it
    # (kubelet makes the pod's cgroup as it sees the binding; the sandbox comes later).
    claimed, before, late = (b - a for a, b in zip(coverage, tenant.coverage(), strict=True))
    print(f"\n[node] new pod {new} ({pod_dir}): claimed at mkdir {claimed}, covered before its"
          f" first process {before}, after it {late}")  # fmt: skip
    assert (claimed + before, late) == (1, 0)
    # The same programs: the new pod went into the filter map, nothing was reloaded.
    after = tenant.nodes("exec-events")
    assert {n: r["programs"] for n, r in after.items()} == {
        n: r["programs"] for n, r in programs.items()
    }


def test_a_deleted_pod_leaves_the_maps(tenant: Tenant) -> None:
    (node,) = tenant.nodes("exec-events")
    before = int(tenant.nodes("exec-events")[node]["filter_entries"])
    tenant.sh(f"kubectl delete pod db-0 -n {tenant.ns} --wait=true --timeout=60s", timeout=90)
    wait_until(
        "db-0's filter entry removed",
        lambda: int(tenant.nodes("exec-events")[node]["filter_entries"]) == before - 1,
        WAIT, describe=lambda: str(tenant.nodes("exec-events")),
    )  # fmt: skip


def _bpftool_has(prog_id: int) -> bool:
    res = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True)
    return res.returncode == 0


def test_deleting_a_traceprobe_unloads_its_programs(tenant: Tenant) -> None:
    rows = tenant.nodes("workload-ticks")
    ids = [int(i) for r in rows.values() for i in r["programs"].split(",") if i != "-"]
    assert ids and all(_bpftool_has(i) for i in ids), rows
    tenant.alice(f"kubectl delete tp workload-ticks -n {tenant.ns} --timeout=60s", timeout=90)
    wait_until("workload-ticks' programs unloaded",
               lambda: not any(_bpftool_has(i) for i in ids), WAIT)  # fmt: skip


def test_a_new_agent_pod_resumes_from_its_persisted_state(tenant: Tenant) -> None:
    old = one_pod(tenant.sh, "tracekeeper-agent")["metadata"]["name"]
    tenant.sh(f"kubectl delete pod -n {NS} {old} --wait=true --timeout=90s", timeout=120)
    tenant.sh(f"kubectl -n {NS} rollout status ds/tracekeeper-agent --timeout=180s", timeout=200)
    new = one_pod(tenant.sh, "tracekeeper-agent")
    assert new["metadata"]["name"] != old
    # Ready (readiness: its persisted state loaded again), and tracing: a new exec counts.
    for probe in ("web-file-opens", "exec-events", "workload-opens"):
        tenant.wait_ready(probe)
    web = tenant.web_pods()[0]
    before = tenant.counts("workload-opens").get(web, 0)
    tenant.exec(web, f"{WORKLOAD_BINARY} opens 5 /etc/passwd")
    tenant.wait_count("workload-opens", web, lambda n: n == before + 5)
