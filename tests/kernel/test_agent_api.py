"""The real agent (BCC loader, cgroup watcher, API) in-process, driven over HTTP as the
operator does, against cgroups this test creates the way kubelet lays them out; and the
`tracekeeper-agent serve` process with its token-free metrics listener."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from bench.common import bpftool_memlock

from tests.kernel.conftest import run_in_cgroup
from tracekeeper_agent.service.agent import Agent, running_agent
from tracekeeper_sim import kubelet
from tracekeeper_sim.kubelet import create_cgroup
from tracekeeper_sim.local_cluster import find_free_ports
from tracekeeper_sim.served_agent import FakePod

pytestmark = pytest.mark.kernel

AGENT = Path(sys.executable).parent / "tracekeeper-agent"
TOKEN = "kernel-tier-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NODE = "node-k"
WAIT_SECONDS = 20.0
POLL_SECONDS = 0.05


@pytest.fixture
def kubepods(cgroup_sandbox: Path) -> Path:
    # Made before the agent starts, within the depth at which it looks for kubepods trees.
    qos = kubelet.qos_dir(cgroup_sandbox)
    create_cgroup(qos)
    return qos


def fake_pod(kubepods: Path, name: str) -> FakePod:
    return FakePod.new(kubepods, name, namespace="team-k")


@dataclass
class RunningAgent:
    agent: Agent
    client: TestClient[Any, Any]
    context: contextlib.AbstractAsyncContextManager[Agent]
    stopped: bool = False

    async def stop(self) -> None:
        """Stop the agent (its programs detach), as a pod restart does."""
        if not self.stopped:
            self.stopped = True
            await self.client.close()
            await self.context.__aexit__(None, None, None)

    async def put(self, revision: int, *probes: dict[str, Any]) -> dict[str, Any]:
        body = {"node": NODE, "revision": revision, "probes": list(probes)}
        async with self.client.put("/v1/state", json=body, headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            report: dict[str, Any] = await resp.json()
        return report

    async def state(self) -> dict[str, Any]:
        async with self.client.get("/v1/state", headers=AUTH) as resp:
            assert resp.status == 200
            report: dict[str, Any] = await resp.json()
        return report

    async def outcome(self, probe_id: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [
            p for p in (await self.state())["probes"] if p["id"] == probe_id
        ]
        assert len(found) == 1, found
        return found[0]

    async def metrics(self) -> str:
        async with self.client.get("/metrics", headers=AUTH) as resp:
            assert resp.status == 200
            return await resp.text()


@pytest.fixture
async def make_agent(
    cgroup_root: Path, tmp_path: Path
) -> AsyncIterator[Callable[[], Awaitable[RunningAgent]]]:
    """Start agents on one state dir (a second one is a restart of the first)."""
    started: list[RunningAgent] = []

    async def start() -> RunningAgent:
        context = running_agent(
            node=NODE,
            token=TOKEN,
            state_dir=tmp_path / "state",
            cgroup_root=cgroup_root,
            run_time_stats="on",  # not sampled: every run of the tests' workloads counts
        )
        agent = await context.__aenter__()
        running = RunningAgent(agent, TestClient(TestServer(agent.app)), context)
        started.append(running)
        await running.client.start_server()
        async with asyncio.timeout(60):
            await agent.ready.wait()
        return running

    yield start
    for running in reversed(started):
        await running.stop()


def opens_probe(*pods: FakePod, spec_hash: str = "k000000000000001") -> dict[str, Any]:
    return {
        "id": "team-k/opens",
        "specHash": spec_hash,
        "spec": {"tracepoint": "syscalls:sys_enter_openat", "output": {"by": ["pod"]}},
        "targets": {"pods": [p.target() for p in pods]},
    }


def bpf_prog_ids() -> list[int]:
    """Every BPF program id loaded on this machine (as bpftool lists them)."""
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    )
    return [int(p["id"]) for p in json.loads(out.stdout)]


def matched(metrics_text: str) -> int:
    """Hits of team-k/opens that passed its filter, whoever they came from."""
    for line in metrics_text.splitlines():
        if line.startswith('tracekeeper_probe_matched_total{namespace="team-k",probe="opens"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("no matched counter for team-k/opens")


def hits(metrics_text: str, pod: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith("tracekeeper_probe_hits_total{") and f'pod="{pod}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def wait_for(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Poll a condition read from the agent (kernel maps have no change notification)
    until it holds; fail naming `what` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while True:
        if await check():
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out after {WAIT_SECONDS}s waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


async def run_cat(cgroup: Path, times: int = 3) -> None:
    # Off the loop: the agent under test serves on this same loop.
    for _ in range(times):
        await asyncio.to_thread(run_in_cgroup, cgroup, "cat", "/etc/hostname")


async def test_live_targets_keep_the_program(
    make_agent: Callable[[], Awaitable[RunningAgent]], kubepods: Path
) -> None:
    web0, web1 = fake_pod(kubepods, "web-0"), fake_pod(kubepods, "web-1")
    create_cgroup(web1.container_dir)
    agent = await make_agent()

    # web-0 is bound to the node but kubelet has not made its cgroup yet.
    report = await agent.put(1, opens_probe(web0))
    (first,) = report["probes"]
    assert first["state"] == "Loaded", first
    assert first["filterEntries"] == 0 and "web-0" in first["message"]
    program_ids = first["programIds"]
    assert program_ids

    # An empty filter matches nothing, never everything: not even this busy host's opens.
    outsider = kubepods.parent / "system-like.slice"
    create_cgroup(outsider)
    await run_cat(outsider)
    assert matched(await agent.metrics()) == 0

    # The pod cgroup appears: its entry is in the map before any container runs.
    create_cgroup(web0.directory)

    async def web0_entered() -> bool:
        return bool((await agent.outcome("team-k/opens"))["filterEntries"] == 1)

    await wait_for("the pod-level entry of web-0", web0_entered)
    create_cgroup(web0.container_dir)
    await run_cat(web0.container_dir)

    async def web0_counted() -> bool:
        return hits(await agent.metrics(), "web-0") >= 3

    await wait_for("web-0's openat hits", web0_counted)
    assert hits(await agent.metrics(), "web-1") == 0  # not targeted: never counted

    # A new target: map entries only, the same programs stay attached.
    report = await agent.put(2, opens_probe(web0, web1))
    (second,) = report["probes"]
    assert second["state"] == "Loaded" and second["filterEntries"] == 2
    assert second["programIds"] == program_ids
    await run_cat(web1.container_dir)

    async def web1_counted() -> bool:
        return hits(await agent.metrics(), "web-1") >= 3

    await wait_for("web-1's openat hits", web1_counted)

    # A process outside every target changes nothing.
    before = await agent.metrics()
    await run_cat(outsider)
    after = await agent.metrics()
    assert hits(after, "web-0") == hits(before, "web-0")
    assert hits(after, "web-1") == hits(before, "web-1")
    assert (await agent.outcome("team-k/opens"))["programIds"] == program_ids


def metric(metrics_text: str, name: str) -> float:
    prefix = name + '{namespace="team-k",probe="opens"} '
    found = [line for line in metrics_text.splitlines() if line.startswith(prefix)]
    assert found, f"no {name} for team-k/opens"
    return float(found[0].rsplit(" ", 1)[1])


async def test_a_probes_cost_is_the_kernels_own_accounting(
    make_agent: Callable[[], Awaitable[RunningAgent]], kubepods: Path
) -> None:
    web0 = fake_pod(kubepods, "web-0")
    create_cgroup(web0.container_dir)
    agent = await make_agent()
    (loaded,) = (await agent.put(1, opens_probe(web0)))["probes"]
    assert loaded["state"] == "Loaded", loaded
    assert (await agent.state())["kernel"]["runTimeStats"] is True
    await run_cat(web0.container_dir)

    first = (await agent.outcome("team-k/opens"))["cost"]
    assert first["runs"] > 0 and first["runTimeNs"] > 0, first
    await run_cat(web0.container_dir, times=10)
    second = (await agent.outcome("team-k/opens"))["cost"]
    # Every openat on the machine runs the program (a miss too): ours and the host's.
    assert second["runs"] >= first["runs"] + 10 and second["runTimeNs"] > first["runTimeNs"]
    # Alone on the node, the probe holds all its programs and maps: bpftool's sum.
    assert second["kernelMemoryBytes"] == bpftool_memlock(loaded["programIds"]) > 0

    text = await agent.metrics()
    assert metric(text, "tracekeeper_probe_run_seconds_total") > 0
    assert metric(text, "tracekeeper_probe_runs_total") >= second["runs"]
    assert metric(text, "tracekeeper_probe_kernel_memory_bytes") == second["kernelMemoryBytes"]


async def test_the_kernels_tracepoints_are_listed_on_request(
    make_agent: Callable[[], Awaitable[RunningAgent]],
) -> None:
    agent = await make_agent()
    path = "/v1/tracepoints?match=syscalls:sys_enter_getpp*"
    async with agent.client.get(path, headers=AUTH) as resp:
        assert resp.status == 200
        listing = await resp.json()
    assert listing == {"match": "syscalls:sys_enter_getpp*", "total": 1,
                       "names": ["syscalls:sys_enter_getppid"], "truncated": False}  # fmt: skip
    async with agent.client.get("/v1/tracepoints?match=" + "x" * 300, headers=AUTH) as resp:
        assert resp.status == 400 and "longer than" in (await resp.json())["error"]
    async with agent.client.get("/v1/tracepoints") as resp:
        assert resp.status == 401  # the node's inventory is behind the token too


async def test_changed_spec_replaces_the_program_and_events_stream(
    make_agent: Callable[[], Awaitable[RunningAgent]], kubepods: Path
) -> None:
    web0 = fake_pod(kubepods, "web-0")
    create_cgroup(web0.container_dir)
    agent = await make_agent()
    first = (await agent.put(1, opens_probe(web0)))["probes"][0]
    events_probe = {
        **opens_probe(web0, spec_hash="k000000000000002"),
        "spec": {
            "tracepoint": "syscalls:sys_enter_openat",
            "output": {"kind": "events", "fields": ["filename"]},
        },
    }
    second = (await agent.put(2, events_probe))["probes"][0]
    assert second["state"] == "Loaded", second
    assert set(second["programIds"]).isdisjoint(first["programIds"])
    assert not set(first["programIds"]) & set(bpf_prog_ids())  # the old one is gone

    async with agent.client.get("/v1/events?probe=team-k/opens", headers=AUTH) as resp:
        assert resp.status == 200
        await run_cat(web0.container_dir, times=1)
        async with asyncio.timeout(20):
            while True:
                line = await resp.content.readline()
                assert line, "the event stream ended"
                event = json.loads(line)
                if event.get("filename") == "/etc/hostname":
                    break
    assert (event["namespace"], event["pod"], event["comm"]) == ("team-k", "web-0", "cat")


async def test_restart_resumes_the_persisted_state(
    make_agent: Callable[[], Awaitable[RunningAgent]], kubepods: Path
) -> None:
    web0 = fake_pod(kubepods, "web-0")
    create_cgroup(web0.container_dir)
    first = await make_agent()
    loaded = (await first.put(3, opens_probe(web0)))["probes"][0]
    assert loaded["state"] == "Loaded"
    boot_id = (await first.state())["bootId"]
    await first.stop()
    assert not set(loaded["programIds"]) & set(bpf_prog_ids())

    restarted = await make_agent()  # ready only once the persisted state is applied again
    report = await restarted.state()
    assert report["revision"] == 3 and report["bootId"] != boot_id
    (resumed,) = report["probes"]
    assert resumed["state"] == "Loaded" and resumed["filterEntries"] == 1
    await run_cat(web0.container_dir)

    async def counted() -> bool:
        return hits(await restarted.metrics(), "web-0") >= 3

    await wait_for("hits counted by the restarted agent", counted)


# --- `tracekeeper-agent serve`, the process the DaemonSet runs --------------------------------


def _http(
    url: str, *, method: str = "GET", body: bytes | None = None, token: str | None = None
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


def _poll(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert proc.poll() is None, f"the agent exited ({proc.returncode}) waiting for {what}"
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(POLL_SECONDS)


def test_serve_gives_prometheus_the_metrics_and_nothing_else(
    cgroup_root: Path, kubepods: Path, tmp_path: Path
) -> None:
    web0 = fake_pod(kubepods, "web-0")
    create_cgroup(web0.container_dir)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    api_port, metrics_port = find_free_ports(2)
    api, open_metrics = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{metrics_port}"
    with (tmp_path / "agent.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(AGENT), "serve", "--node-name", NODE,
             "--listen", f"127.0.0.1:{api_port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
             "--token-file", str(token_file), "--state-dir", str(tmp_path / "state"),
             "--cgroup-root", str(cgroup_root)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        _poll("/readyz", lambda: _http(f"{api}/readyz")[0] == 200, proc)
        body = json.dumps({"node": NODE, "revision": 1, "probes": [opens_probe(web0)]}).encode()
        status, text = _http(f"{api}/v1/state", method="PUT", body=body, token=TOKEN)
        assert status == 200, text
        (loaded,) = json.loads(text)["probes"]
        assert loaded["state"] == "Loaded", loaded
        for _ in range(3):
            run_in_cgroup(web0.container_dir, "cat", "/etc/hostname")

        # The metrics listener: the probe's series, without a token.
        _poll("web-0's hits on the metrics port",
              lambda: hits(_http(f"{open_metrics}/metrics")[1], "web-0") >= 3, proc)  # fmt: skip
        # The API port keeps /metrics, behind the token.
        assert _http(f"{api}/metrics")[0] == 401
        status, text = _http(f"{api}/metrics", token=TOKEN)
        assert status == 200 and hits(text, "web-0") >= 3
        # Nothing but /metrics on the metrics listener, token or not.
        for token in (None, TOKEN):
            assert _http(f"{open_metrics}/v1/state", token=token)[0] == 404
            empty = json.dumps({"node": NODE, "revision": 2, "probes": []}).encode()
            put = _http(f"{open_metrics}/v1/state", method="PUT", body=empty, token=token)
            assert put[0] == 404
            assert _http(f"{open_metrics}/metrics", method="POST", body=b"", token=token)[0] == 405
        status, text = _http(f"{api}/v1/state", token=TOKEN)
        assert json.loads(text)["revision"] == 1  # still the state the operator pushed
    finally:
        proc.terminate()
        try:
            returncode = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert returncode == 0, (tmp_path / "agent.log").read_text(errors="replace")[-4000:]
    assert not set(loaded["programIds"]) & set(bpf_prog_ids())  # detached on SIGTERM


# --- tenant safety: applies the client abandons, uprobes in the container's root -------------


def agent_held_programs(pid: int) -> set[int]:
    """Ids of the BPF programs process `pid` holds: the `prog_id` of its fds' fdinfo (what
    bpftool's `pids` column reads, where bpftool is built with it; Debian's is not). Other
    test runs may load programs meanwhile, so only the agent's are counted; each must be
    a program the kernel lists."""
    held: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            continue
        for line in info.splitlines():
            if line.startswith("prog_id:"):
                held.add(int(line.split()[1]))
    assert held <= set(bpf_prog_ids())
    return held


TRACEPOINTS = [
    "syscalls:sys_enter_getppid",
    "syscalls:sys_enter_getpgid",
    "syscalls:sys_enter_getsid",
    "syscalls:sys_enter_getuid",
    "syscalls:sys_enter_getgid",
    "syscalls:sys_enter_geteuid",
]


def tracepoint_probe(n: int, pod: FakePod, revision_tag: str = "a") -> dict[str, Any]:
    return {
        "id": f"team-k/tp-{n}",
        "specHash": f"k{revision_tag}{n:014d}",
        "spec": {"tracepoint": TRACEPOINTS[n]},
        "targets": {"pods": [pod.target()]},
    }


def test_an_abandoned_push_is_applied_whole_and_leaks_nothing(
    cgroup_root: Path, kubepods: Path, tmp_path: Path
) -> None:
    web0 = fake_pod(kubepods, "web-0")
    create_cgroup(web0.container_dir)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    (api_port,) = find_free_ports(1)
    api = f"http://127.0.0.1:{api_port}"
    with (tmp_path / "agent.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(AGENT), "serve", "--node-name", NODE, "--listen", f"127.0.0.1:{api_port}",
             "--token-file", str(token_file), "--state-dir", str(tmp_path / "state"),
             "--cgroup-root", str(cgroup_root)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        _poll("/readyz", lambda: _http(f"{api}/readyz")[0] == 200, proc)
        probes = [tracepoint_probe(n, web0) for n in range(len(TRACEPOINTS))]
        body = json.dumps({"node": NODE, "revision": 1, "probes": probes}).encode()
        # Six compiles take seconds; the client gives up (and disconnects) long before.
        req = urllib.request.Request(f"{api}/v1/state", data=body, method="PUT", headers=AUTH)
        with pytest.raises(OSError):  # TimeoutError / URLError(timeout)
            urllib.request.urlopen(req, timeout=0.3)

        def applied() -> bool:
            status, text = _http(f"{api}/v1/state", token=TOKEN)
            return status == 200 and json.loads(text)["revision"] == 1

        _poll("the abandoned revision to be applied", applied, proc)
        report = json.loads(_http(f"{api}/v1/state", token=TOKEN)[1])
        assert [p["state"] for p in report["probes"]] == ["Loaded"] * len(TRACEPOINTS), report
        reported = {i for p in report["probes"] for i in p["programIds"]}
        assert len(reported) == len(TRACEPOINTS)
        claims = set(report["cgroupClaims"]["programIds"])  # the node's cgroup_mkdir/rmdir
        assert len(claims) == 2
        assert agent_held_programs(proc.pid) == reported | claims

        # A later push behaves: answered, and the kernel holds exactly what it reports.
        body = json.dumps({"node": NODE, "revision": 2, "probes": probes[:2]}).encode()
        status, text = _http(f"{api}/v1/state", method="PUT", body=body, token=TOKEN)
        assert status == 200, text
        report = json.loads(text)
        assert report["revision"] == 2 and [p["state"] for p in report["probes"]] == ["Loaded"] * 2
        assert agent_held_programs(proc.pid) == claims | {
            i for p in report["probes"] for i in p["programIds"]
        }
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


APP_C = r"""
#include <stdlib.h>
#include <unistd.h>
__attribute__((noinline)) int tk_some_func(int x) { return x * 2 + 1; }
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 0;   /* 0: forever */
    volatile int sink = 0;
    for (long i = 0; n == 0 || i < n; i++) { sink += tk_some_func((int)i); usleep(2000); }
    return sink == 42;
}
"""


def pid_hits(metrics_text: str, probe: str, pid: int) -> int:
    total = 0
    for line in metrics_text.splitlines():
        if (
            line.startswith("tracekeeper_probe_hits_total{")
            and f'probe="{probe}"' in line
            and f'pid="{pid}"' in line
        ):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


@dataclass
class ContainerApp:
    pod: FakePod
    binary: str
    """The same path on the host and in the container, two different files."""
    process: subprocess.Popen[bytes]


@pytest.fixture
def container_app(kubepods: Path, tmp_path: Path) -> Iterator[ContainerApp]:
    """A process in a pod's container cgroup and its own mount namespace, whose `binary`
    is a file the host does not have at that path (the host has another one there)."""
    (tmp_path / "app.c").write_text(APP_C)
    shared, inside = tmp_path / "shared", tmp_path / "container-files"
    for directory in (shared, inside):  # two builds: two files, two inodes
        directory.mkdir()
        subprocess.run(
            ["cc", "-O1", "-o", str(directory / "app"), str(tmp_path / "app.c")], check=True
        )
    binary = str(shared / "app")
    pod = fake_pod(kubepods, "app-0")
    create_cgroup(pod.container_dir)
    script = (
        f'echo $$ > "{pod.container_dir}/cgroup.procs" && '
        f'mount --bind "{inside}" "{shared}" && exec "{binary}"'
    )
    process = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    try:
        yield ContainerApp(pod, binary, process)
    finally:
        process.kill()
        process.wait()


async def test_a_uprobe_resolves_in_the_containers_root_not_the_hosts(
    make_agent: Callable[[], Awaitable[RunningAgent]], container_app: ContainerApp, tmp_path: Path
) -> None:
    pod, binary, container = container_app.pod, container_app.binary, container_app.process
    agent = await make_agent()
    uprobe = {
        "id": "team-k/up",
        "specHash": "k0000000000000up",
        "spec": {
            "uprobe": {"binary": binary, "symbol": "tk_some_func"},
            "output": {"by": ["pid"]},
        },
        "targets": {"pods": [pod.target()]},
    }
    await agent.put(1, uprobe)

    async def attached() -> bool:
        outcome = await agent.outcome("team-k/up")
        assert outcome["state"] == "Loaded", outcome
        return bool(outcome["programIds"])

    await wait_for("the uprobe resolved in the container (retried once it runs)", attached)

    async def container_counted() -> bool:
        return pid_hits(await agent.metrics(), "up", container.pid) >= 20

    await wait_for("hits of the container's process", container_counted)

    # The host's binary at the same path, run in the very same cgroup (the filter admits
    # it): not probed, it is another file.
    await asyncio.to_thread(run_in_cgroup, pod.container_dir, binary, "200", timeout=60)
    text = await agent.metrics()
    others = [
        line
        for line in text.splitlines()
        if line.startswith("tracekeeper_probe_hits_total{")
        and 'probe="up"' in line
        and f'pid="{container.pid}"' not in line
    ]
    assert others == [], others
    assert pid_hits(text, "up", container.pid) >= 20
    assert str(tmp_path) not in (await agent.outcome("team-k/up"))["message"]
