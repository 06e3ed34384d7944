"""The node agent's composition root: its parts wired, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tracekeeper_agent.active import ProgramBoard
from tracekeeper_agent.host.bpf_stats import (
    SAMPLE_ON,
    SAMPLE_PERIOD,
    RunTimeStats,
    StatsMode,
)
from tracekeeper_agent.host.bpffs import PIN_ROOT
from tracekeeper_agent.host.kernel_features import FeatureCheck, KernelFeatures
from tracekeeper_agent.outputs.events import EventHub, open_events_file
from tracekeeper_agent.outputs.metrics import AgentMetrics
from tracekeeper_agent.ports import ProgramLoader
from tracekeeper_agent.reconcile.reconciler import Reconciler
from tracekeeper_agent.reconcile.state_store import StateStore
from tracekeeper_agent.reconcile.tenancy import DEFAULT_PRIVILEGED
from tracekeeper_agent.service.http_api import (
    create_app,
    create_metrics_app,
)
from tracekeeper_agent.targets.attribution import TargetAttributor
from tracekeeper_agent.targets.cgroup_watch import CgroupWatcher
from tracekeeper_agent.targets.cgroups import CgroupIndex, detect_root
from tracekeeper_agent.targets.node import NodeCgroups, follow_cgroups
from tracekeeper_agent.targets.processes import ProcTable
from tracekeeper_agent.targets.roots import TargetRoots
from tracekeeper_api.protocol import KernelInfo

log = logging.getLogger("tracekeeper_agent")


def kernel_info(features: KernelFeatures, run_time_stats: FeatureCheck) -> KernelInfo:
    checks = {
        "kprobes": features.kprobes,
        "uprobes": features.uprobes,
        "btf": features.btf,
        "headers": features.kernel_headers,
        "tracepoints": features.tracepoints,
        "ringBuffer": features.ring_buffer,
        "batchMapOps": features.batch_map_ops,
        "cgroupV2": features.cgroup_v2,
        "runTimeStats": run_time_stats,
    }
    return KernelInfo(
        release=features.release[:128],
        kprobes=features.kprobes.available,
        uprobes=features.uprobes.available,
        btf=features.btf.available,
        headers=features.kernel_headers.available,
        headers_release=(features.headers_release or "")[:128] or None,
        tracepoints=features.tracepoints.available,
        ring_buffer=features.ring_buffer.available,
        batch_map_ops=features.batch_map_ops.available,
        cgroup_v2=features.cgroup_v2.available,
        run_time_stats=run_time_stats.available,
        missing={k: c.evidence[:512] for k, c in checks.items() if not c.available},
    )


def _stats_check(stats: RunTimeStats) -> FeatureCheck:
    if stats.error is not None:
        log.warning(
            "BPF run-time statistics unavailable: %s; probes report no run time", stats.error
        )
        return FeatureCheck(False, stats.error)
    if stats.mode == "off":
        return FeatureCheck(False, "switched off (serve --run-time-stats off)")
    return FeatureCheck(True, f"BPF_ENABLE_STATS held by the agent ({stats.mode})")


async def _sample_stats(stats: RunTimeStats) -> None:
    """Statistics on SAMPLE_ON seconds of every SAMPLE_PERIOD (they cost every program)."""
    while True:
        stats.switch(True)
        await asyncio.sleep(SAMPLE_ON)
        stats.switch(False)
        await asyncio.sleep(SAMPLE_PERIOD - SAMPLE_ON)


def real_loader(node: str | None = None) -> ProgramLoader:
    """The BCC loader; an agent's (`node` given) pins its identity table and its programs at
    paths of its own node, so that simulated nodes sharing one machine never share one, and
    the node's next agent adopts its programs (bpf/pinned_programs.py)."""
    from tracekeeper_agent.bpf.loader import BccLoader  # the only path to bcc

    if node is None:
        return BccLoader()
    return BccLoader(PIN_ROOT / node / "identity", programs_pin=PIN_ROOT / node / "programs")


@dataclass
class Agent:
    """The node agent's parts, wired; `running_agent` starts and stops them."""

    reconciler: Reconciler
    hub: EventHub
    metrics: AgentMetrics
    app: web.Application
    """The API: state, events, and /metrics, behind the token."""
    metrics_app: web.Application
    """GET /metrics only, no token (serve --metrics-listen)."""
    ready: asyncio.Event
    cgroups: NodeCgroups


@contextlib.asynccontextmanager
async def running_agent(
    *,
    node: str,
    token: str | Callable[[], str],
    state_dir: Path,
    cgroup_root: Path | None = None,
    events_file: Path | None = None,
    loader: ProgramLoader | None = None,
    privileged_namespaces: frozenset[str] = DEFAULT_PRIVILEGED,
    run_time_stats: StatsMode = "sampled",
) -> AsyncIterator[Agent]:
    """The agent with its cgroup watcher and target polling running, and the persisted
    state being restored (`ready` is set when done). Serve `agent.app` meanwhile: /healthz
    must answer while the restored programs compile."""
    from tracekeeper_agent.programs.builder import Planner, node_kernel

    root = detect_root(cgroup_root)
    # Watch first, then index: a directory created in between is seen by one or the other.
    watcher = CgroupWatcher(root)
    watcher.start()
    index = CgroupIndex(root)
    index.rescan()
    cgroups = NodeCgroups(index)
    # Uprobes resolve in the targeted containers; tenants may not capture address fields.
    planner = Planner(TargetRoots(cgroups), privileged_namespaces)
    attributor = TargetAttributor(cgroups)
    # The reconciler publishes what is loaded to the board; the outputs read it there.
    board = ProgramBoard()
    hub = EventHub(attributor, sink=open_events_file(events_file) if events_file else None)
    board.add_reader(hub)
    metrics = AgentMetrics(board, attributor)
    loader = loader or real_loader(node)
    stats = RunTimeStats(run_time_stats)
    reconciler = Reconciler(
        node=node,
        board=board,
        loader=loader,
        build_plan=planner.build,
        plan_inputs=planner.inputs,
        privileged_namespaces=privileged_namespaces,
        cgroups=cgroups,
        processes=ProcTable(),
        store=StateStore(state_dir),
        kernel=kernel_info(node_kernel(), _stats_check(stats)),
        compile_observer=metrics.observe_compile,
        adopt_observer=metrics.observe_adopted,
        attributor=attributor,
    )
    metrics.add_claims(reconciler.claims)
    metrics.add_persistence(reconciler.persisted)
    ready = asyncio.Event()
    app = create_app(
        reconciler,
        token=token,
        registry=metrics.registry,
        events=hub,
        ready=ready,
        costs=metrics.costs,
    )
    metrics_app = create_metrics_app(reconciler, metrics.registry)

    async def restore() -> None:
        restored = await reconciler.restore()
        if restored is not None:
            log.info("resumed revision %d (%d probes)", restored.revision, len(restored.probes))
        # What the previous agent left pinned and the restored state did not take goes now.
        dropped = await asyncio.to_thread(loader.drop_leftovers)
        if dropped:
            log.info("detached %d programs a previous agent left pinned", dropped)
        ready.set()

    background = [
        asyncio.create_task(follow_cgroups(watcher, cgroups, reconciler.refresh_targets)),
        asyncio.create_task(reconciler.poll_targets()),
        asyncio.create_task(restore()),
    ]
    if stats.mode == "sampled":
        background.append(asyncio.create_task(_sample_stats(stats)))
    try:
        yield Agent(reconciler, hub, metrics, app, metrics_app, ready, cgroups)
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await hub.close()
        await reconciler.close()
        loader.close()
        watcher.close()
        stats.close()
