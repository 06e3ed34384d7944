"""The real node agent (cli.running_agent: cgroup watcher, reconciler, BCC loader, event hub,
HTTP API) served on a loopback port, driven over HTTP as the operator drives it."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tracekeeper_agent.host.bpf_stats import StatsMode
from tracekeeper_agent.ports import ProgramLoader
from tracekeeper_agent.service.agent import Agent, running_agent
from tracekeeper_sim import kubelet

NODE = "bench-node"
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class FakePod:
    """A pod as kubelet (systemd driver, burstable QoS) and containerd lay it out."""

    uid: str
    name: str
    directory: Path
    container_id: str
    """Bare hex, as containerd names it."""
    namespace: str = "bench"

    @classmethod
    def new(cls, kubepods_qos: Path, name: str, namespace: str = "bench") -> FakePod:
        uid = str(uuid.uuid4())
        directory = kubelet.pod_dir(kubepods_qos, uid)
        return cls(uid, name, directory, uuid.uuid4().hex + uuid.uuid4().hex, namespace)

    @property
    def container_dir(self) -> Path:
        return kubelet.container_dir(self.directory, self.container_id)

    def target(self, namespace: str | None = None) -> dict[str, Any]:
        return {"uid": self.uid, "namespace": namespace or self.namespace, "name": self.name}


def kubepods_qos(top: Path) -> Path:
    """top/kubepods.slice/kubepods-burstable.slice, made before the agent starts (it finds
    kubepods trees within two levels of the root)."""
    qos = kubelet.qos_dir(top)
    qos.mkdir(parents=True, exist_ok=True)
    return qos


@dataclass
class ServedAgent:
    agent: Agent
    url: str
    session: aiohttp.ClientSession

    async def put_state(self, revision: int, probes: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"node": NODE, "revision": revision, "probes": probes}
        async with self.session.put(f"{self.url}/v1/state", json=body, headers=AUTH) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"PUT /v1/state: {resp.status} {text}")
            report: dict[str, Any] = await resp.json()
        for probe in report["probes"]:
            if probe["state"] != "Loaded":
                raise RuntimeError(f"probe {probe['id']} not loaded: {probe}")
        return report


@contextlib.asynccontextmanager
async def served_agent(
    cgroup_root: Path, *, loader: ProgramLoader | None = None, run_time_stats: StatsMode = "sampled"
) -> AsyncIterator[ServedAgent]:
    with tempfile.TemporaryDirectory(prefix="tk-bench-state-") as state_dir:
        async with running_agent(
            node=NODE,
            token=TOKEN,
            state_dir=Path(state_dir),
            cgroup_root=cgroup_root,
            loader=loader,
            run_time_stats=run_time_stats,
        ) as agent:
            runner = web.AppRunner(agent.app, handler_cancellation=True, access_log=None)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                host, port = runner.addresses[0][:2]
                await agent.ready.wait()
                async with aiohttp.ClientSession() as session:
                    yield ServedAgent(agent, f"http://{host}:{port}", session)
            finally:
                await runner.cleanup()
