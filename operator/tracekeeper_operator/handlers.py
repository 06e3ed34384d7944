"""kopf wiring: thin handlers that hand everything to the control loop.

Watch events only poke the loop (it renders from the indexes); the TraceProbe delete
handler holds kopf's finalizer until the agents confirm the probe is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from tracekeeper_api import GROUP, VERSION
from tracekeeper_operator.agent_client import HttpAgentClient, TokenSource
from tracekeeper_operator.control_loop import ControlLoop
from tracekeeper_operator.indexes import INDEX_IDS, Snapshots, register_indexes
from tracekeeper_operator.kube_api import KubeWrites, connection_info
from tracekeeper_operator.metrics import OperatorMetrics
from tracekeeper_operator.node_state import RevisionClock
from tracekeeper_operator.output_api.agent_reads import HttpAgentReads
from tracekeeper_operator.output_api.listener import OutputApiSettings, OutputServer
from tracekeeper_operator.output_api.placement import placements
from tracekeeper_operator.push_planner import PushPlanner
from tracekeeper_operator.pusher import Pusher
from tracekeeper_operator.records import ObjectRef
from tracekeeper_operator.settings import OperatorSettings
from tracekeeper_operator.unloading import unload_verdict

log = logging.getLogger(__name__)

FINALIZER = "tracekeeper.dev/unload"
ANNOTATION_PREFIX = "tracekeeper.dev"


@dataclass
class Runtime:
    """Everything the handlers share, built before kopf starts."""

    settings: OperatorSettings
    writes: KubeWrites
    metrics: OperatorMetrics
    client: HttpAgentClient
    loop: ControlLoop
    reads: HttpAgentReads
    kubeconfig: str | None = None
    output: OutputServer | None = None
    """The aggregated output API (output_api/), when its listener is on."""
    indices: dict[str, Any] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        settings: OperatorSettings,
        writes: KubeWrites,
        metrics: OperatorMetrics,
        kubeconfig: str | None = None,
        output: OutputApiSettings | None = None,
    ) -> Runtime:
        tokens = TokenSource(settings.token_file)
        client = HttpAgentClient(tokens, timeout=settings.push_timeout)
        planner = PushPlanner(
            revisions=RevisionClock(),
            debounce=settings.push_debounce,
            max_delay=settings.push_max_delay,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
            resync_interval=settings.resync_interval,
        )
        pusher = Pusher(planner, client, metrics=metrics)
        # Reads a debug session's last values before the push that unloads it.
        reads = HttpAgentReads(tokens, timeout=settings.push_timeout)
        loop = ControlLoop(settings, pusher, writes, metrics=metrics, reads=reads)
        pusher.on_change = loop.poke  # agent reports feed statuses
        server = None
        if output is not None:
            server = OutputServer(
                output,
                lambda probe_id: placements(probe_id, planner.views(), loop.unsupported()),
                tokens,
            )
        return cls(settings, writes, metrics, client, loop, reads, kubeconfig, server)

    def indexes_complete(self) -> None:
        if not self.loop.ready:
            snapshots = Snapshots()
            self.loop.attach(lambda: snapshots.take(self.indices))
        else:
            self.loop.poke()


_FieldSpec = str | tuple[str, ...] | list[str] | None
"""kopf's own FieldSpec (not exported)."""


class ProbeDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds the essence of every watched object's body on every event (a deep copy,
    its largest cost per pod event) to diff it for change handlers. The only change handler
    here is TraceProbe's delete handler, so objects of every other kind get an empty
    essence. A body of no kind (never seen) gets the usual one."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[_FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        kind = body.get("kind")
        if kind is not None and kind != "TraceProbe":
            return kopf.BodyEssence()
        return super().build(body=body, extra_fields=extra_fields)


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    settings.peering.standalone = True
    settings.persistence.finalizer = FINALIZER
    # Progress in annotations: kopf's default would also write status.kopf, which the
    # CRD schema prunes (every field of status is declared).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = ProbeDiffBase(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # kopf's per-handler log lines as Events would flood namespaces; ours are specific.
    settings.posting.level = logging.ERROR


def register_handlers(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    register_indexes(registry, runtime.settings)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(runtime.kubeconfig)

    @kopf.on.startup(registry=registry)
    async def start(**kwargs: Any) -> None:
        # kopf passes its (live) indexes to every handler under their ids.
        runtime.indices.update({k: v for k, v in kwargs.items() if k in INDEX_IDS})
        runtime.tasks += [
            asyncio.create_task(runtime.loop.run(), name="tracekeeper control loop"),
            asyncio.create_task(runtime.loop.pusher.run(), name="tracekeeper pusher"),
        ]
        if runtime.output is not None:
            try:
                await runtime.output.start()
            except Exception:
                # Pushes and statuses do not depend on it: the operator goes on without it,
                # and the APIService shows it unavailable (kubectl get apiservice).
                log.exception("the output API is not served")
                runtime.output = None

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        await runtime.client.close()
        runtime.loop.close()
        await runtime.reads.close()
        if runtime.output is not None:
            await runtime.output.close()

    # Async on purpose: kopf runs sync handlers in threads, and the loop's state is not
    # thread-safe.
    async def changed(**_: Any) -> None:
        runtime.indexes_complete()

    kopf.on.event("v1", "pods", registry=registry, id="pod_changed")(changed)
    kopf.on.event("v1", "namespaces", registry=registry, id="namespace_changed")(changed)
    if runtime.settings.read_nodes:
        kopf.on.event("v1", "nodes", registry=registry, id="node_changed")(changed)
    kopf.on.event(GROUP, VERSION, "traceprobes", registry=registry, id="probe_changed")(changed)
    kopf.on.event(GROUP, VERSION, "tracefilters", registry=registry, id="filter_changed")(changed)

    @kopf.on.delete(GROUP, VERSION, "traceprobes", registry=registry)
    async def probe_deleted(
        *, namespace: str | None, name: str | None, uid: str | None, meta: kopf.Meta, **_: Any
    ) -> None:
        runtime.indexes_complete()
        ref = ObjectRef("TraceProbe", namespace or "", name or "", uid or "")
        verdict = unload_verdict(
            runtime.loop.holding_nodes(ref.key),
            deletion_started=str(meta.get("deletionTimestamp") or ""),
            now=datetime.now(UTC),
            timeout=runtime.settings.unload_timeout,
        )
        if not verdict.release:
            raise kopf.TemporaryError(verdict.message, delay=0.5)
        if verdict.event is not None:
            await runtime.loop.post_event(ref, verdict.event)
        log.info("TraceProbe %s: %s", ref.key, verdict.message)

    @kopf.on.probe(registry=registry, id="rendering")
    async def rendering(**_: Any) -> bool:
        return runtime.loop.ready
