"""App teams read their probes' output as themselves: the aggregated output API
(output.tracekeeper.dev, served by the operator) behind the real kube-apiserver's
authentication, RBAC and front proxy, and `kubectl tracekeeper` with each user's kubeconfig.

One world: two simulated nodes with real agents, the operator serving the API on loopback,
reached by the apiserver through an ExternalName Service (localhost) and the shipped
APIService, whose caBundle the operator fills in with the certificate it made.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracekeeper_agent.targets.cgroups import detect_root
from tracekeeper_sim.local_cluster import LocalCluster, find_free_ports
from tracekeeper_sim.output_api import APISERVICE, output_api_installed
from tracekeeper_sim.world import EXAMPLES_DIR, World, condition, wait_until

pytestmark = pytest.mark.e2e

PLUGIN = Path(sys.executable).parent / "kubectl-tracekeeper"


def report(name: str, value: str) -> None:
    print(f"\n[e2e output] {name}: {value}", file=sys.stderr)


@pytest.fixture(scope="module")
def world(
    cluster: LocalCluster, crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("real agents load BPF programs: needs root")
    (port,) = find_free_ports(1)
    w = World(cluster, tmp_path_factory.mktemp("output-e2e"), detect_root())
    try:
        with output_api_installed(cluster, port):
            w.add_node("node-a")
            w.add_node("node-b")
            w.start_operator(output_api_port=port)
            started = time.monotonic()
            res = cluster.kubectl(
                "wait", "--for=condition=Available", f"apiservice/{APISERVICE}", "--timeout=60s"
            )
            assert res.returncode == 0, (res.stderr, w.operator_log_tail())
            report("APIService Available after", f"{time.monotonic() - started:.1f}s")
            w.output_port = port  # type: ignore[attr-defined]
            yield w
    finally:
        w.close()


def plugin(
    cluster: LocalCluster, user: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PLUGIN), "--kubeconfig", str(cluster.kubeconfig(user)), *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def bind(cluster: LocalCluster, ns: str, user: str, role: str) -> None:
    cluster.kubectl("create", "rolebinding", f"{user}-{role}", f"--clusterrole={role}",
                    f"--user={user}", "-n", ns, check=True)  # fmt: skip


def wait_ready(world: World, ns: str, name: str) -> None:
    def ready() -> bool:
        c = condition(world.probe(ns, name), "Ready")
        return c is not None and c["status"] == "True"

    wait_until(f"{ns}/{name} Ready", ready, timeout=90, describe=world.operator_log_tail)


@pytest.fixture(scope="module")
def teams(world: World) -> dict[str, str]:
    """team-a: alice (edit) with an events probe and a count probe, pods on both nodes;
    team-b: a probe of its own (alice may not read it)."""
    cluster = world.cluster
    a = world.namespace("out-a")
    b = world.namespace("out-b")
    bind(cluster, a, "alice", "edit")
    for name, node in (("web-0", world.nodes["node-a"]), ("web-1", world.nodes["node-b"])):
        world.create_pod(a, name, node, {"app": "web"})
    world.create_pod(b, "other-0", world.nodes["node-a"], {"app": "web"})
    for example in ("exec-events.yaml", "file-opens-by-pod.yaml"):
        res = cluster.kubectl("apply", "-n", a, "-f", str(EXAMPLES_DIR / example), user="alice")
        assert res.returncode == 0, res.stderr
    cluster.kubectl("apply", "-n", b, "-f", str(EXAMPLES_DIR / "exec-events.yaml"), check=True)
    for ns, name in ((a, "exec-events"), (a, "web-file-opens"), (b, "exec-events")):
        wait_ready(world, ns, name)
    return {"a": a, "b": b}


def test_alice_tails_her_probe_from_both_nodes(world: World, teams: dict[str, str]) -> None:
    res = plugin(world.cluster, "alice", "tail", "exec-events", "-n", teams["a"],
                 "--for", "6s", "-o", "json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    events = [r for r in records if "type" not in r]
    assert {e["node"] for e in events} == {"node-a", "node-b"}, res.stdout[-2000:]
    # Only her probe's events: another namespace's pod on node-a never shows up.
    assert {e["probe"] for e in events} == {f"{teams['a']}/exec-events"}
    assert {e["namespace"] for e in events} == {teams["a"]}
    assert {e["pod"] for e in events} == {"web-0", "web-1"}
    text = plugin(world.cluster, "alice", "tail", "exec-events", "-n", teams["a"], "--for", "3s")
    assert text.returncode == 0, text.stderr
    report("alice: kubectl tracekeeper tail (text)", "\n" + "\n".join(text.stdout.splitlines()[:4]))


def test_alice_is_forbidden_team_b(world: World, teams: dict[str, str]) -> None:
    status, body = world.cluster.request(
        f"/apis/output.tracekeeper.dev/v1alpha1/namespaces/{teams['b']}/traceprobes/"
        "exec-events/log", user="alice",
    )  # fmt: skip
    assert status == 403, body
    res = plugin(world.cluster, "alice", "tail", "exec-events", "-n", teams["b"], "--for", "2s")
    assert res.returncode == 1
    assert "forbidden" in res.stderr and "traceprobes/log" in res.stderr, res.stderr
    assert teams["b"] in res.stderr
    report("alice, team-b", res.stderr.strip())


def test_bob_reads_with_view_only(world: World, teams: dict[str, str]) -> None:
    a = teams["a"]
    res = plugin(world.cluster, "bob", "top", "web-file-opens", "-n", a, "--once")
    assert res.returncode == 1 and "forbidden" in res.stderr, res.stderr
    assert "traceprobes/values" in res.stderr
    bind(world.cluster, a, "bob", "view")
    res = plugin(world.cluster, "bob", "top", "web-file-opens", "-n", a, "--once")
    assert res.returncode == 0, res.stderr
    assert "web-0" in res.stdout and "web-1" in res.stdout, res.stdout
    res = plugin(world.cluster, "bob", "status", "web-file-opens", "-n", a)
    assert res.returncode == 0, res.stderr
    assert "node-a" in res.stdout and "node-b" in res.stdout and "Loaded" in res.stdout
    report("bob (view): kubectl tracekeeper status", "\n" + res.stdout)


def test_alice_asks_her_probes_nodes_for_their_tracepoints(
    world: World, teams: dict[str, str]
) -> None:
    a = teams["a"]
    res = plugin(world.cluster, "alice", "tracepoints", "web-file-opens", "-n", a,
                 "--match", "syscalls:sys_enter_openat*", "-o", "json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    listing = json.loads(res.stdout)
    assert set(listing["nodes"]) == {"node-a", "node-b"} and listing["unavailable"] == {}
    for node in listing["nodes"].values():
        assert "syscalls:sys_enter_openat" in node["names"], node
        assert all(n.startswith("syscalls:sys_enter_openat") for n in node["names"])
    table = plugin(world.cluster, "alice", "tracepoints", "web-file-opens", "-n", a,
                   "--match", "syscalls:sys_enter_openat*")  # fmt: skip
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["syscalls:sys_enter_openat", "all"] in rows, table.stdout
    report("alice: kubectl tracekeeper tracepoints", "\n" + table.stdout)
    denied = plugin(world.cluster, "alice", "tracepoints", "exec-events", "-n", teams["b"])
    assert denied.returncode == 1 and "traceprobes/tracepoints" in denied.stderr, denied.stderr


def test_a_direct_request_with_forged_headers_is_refused(world: World) -> None:
    port = world.output_port  # type: ignore[attr-defined]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we are the attacker: we trust anything
    for path in (
        "/apis/output.tracekeeper.dev/v1alpha1/namespaces/default/traceprobes/x/log",
        "/apis/output.tracekeeper.dev/v1alpha1",
    ):
        req = urllib.request.Request(
            f"https://127.0.0.1:{port}{path}",
            headers={"X-Remote-User": "admin", "X-Remote-Group": "system:masters"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, context=ctx, timeout=10)
        assert err.value.code == 401
        assert "front-proxy client certificate" in err.value.read().decode()


def test_plugin_errors(world: World, teams: dict[str, str]) -> None:
    res = plugin(world.cluster, "alice", "top", "no-such-probe", "-n", teams["a"], "--once")
    assert res.returncode == 1
    assert f"traceprobe {teams['a']}/no-such-probe not found" in res.stderr, res.stderr
    res = plugin(world.cluster, "alice", "status", "exec-events", "-n", teams["b"])
    assert res.returncode == 1 and "forbidden" in res.stderr, res.stderr
    report("plugin errors", res.stderr.strip())


def _agent_values(world: World, probe_id: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for node in world.nodes.values():
        status, text = node.agent.http(f"/v1/values?probe={probe_id}")
        assert status == 200, text
        for row in json.loads(text)["counts"]:
            total[row["key"]["pod"]] = total.get(row["key"]["pod"], 0) + row["count"]
    return total


def test_top_once_json_is_the_sum_of_the_agents_maps(world: World, teams: dict[str, str]) -> None:
    a = teams["a"]
    for pod in [p for p in world.pods if p.namespace == a]:
        for proc in pod.procs:  # counts stop moving: the sums can be compared exactly
            proc.kill()
            proc.wait()
    time.sleep(0.5)
    res = plugin(world.cluster, "alice", "top", "web-file-opens", "-n", a, "--once", "-o", "json")
    assert res.returncode == 0, res.stderr
    merged = json.loads(res.stdout)
    got = {row["key"]["pod"]: row["count"] for row in merged["counts"]}
    assert got == _agent_values(world, f"{a}/web-file-opens")
    assert set(got) == {"web-0", "web-1"} and all(v > 0 for v in got.values())
    assert merged["nodes"] == ["node-a", "node-b"]
    table = plugin(world.cluster, "alice", "top", "web-file-opens", "-n", a, "--once")
    report("alice: kubectl tracekeeper top --once", "\n" + table.stdout)
    for pod in [p for p in world.pods if p.namespace == a]:
        pod.procs.clear()
        pod.start("app")


def test_a_killed_agent_is_a_gap_and_the_stream_goes_on(
    world: World, teams: dict[str, str]
) -> None:
    proc = subprocess.Popen(
        [str(PLUGIN), "--kubeconfig", str(world.cluster.kubeconfig("alice")), "tail",
         "exec-events", "-n", teams["a"], "--for", "40s", "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    records: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            records.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    node_b = world.nodes["node-b"]
    try:
        wait_until(
            "events from both nodes",
            lambda: {r.get("node") for r in records if "type" not in r} >= {"node-a", "node-b"},
            timeout=30,
        )
        node_b.agent.kill()

        def gap_then_more() -> bool:
            gaps = [i for i, r in enumerate(records) if r.get("type") == "gap"]
            return bool(gaps) and any(
                r.get("node") == "node-a" and "type" not in r for r in records[gaps[0] + 1 :]
            )

        wait_until("a gap record for node-b, then node-a's events", gap_then_more, timeout=30)
        gap = next(r for r in records if r.get("type") == "gap")
        assert gap["node"] == "node-b" and gap["received"] > 0, gap
        assert set(gap["drops"]) <= {"rateLimited", "ringFull", "backlog"}
        report("gap record", json.dumps(gap))
    finally:
        proc.kill()
        proc.wait()
        world.restart_agent(node_b, wipe_state=False)
