"""Starting and stopping the output API's TLS listener inside the operator process."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tracekeeper_api.output import OUTPUT_GROUP, OUTPUT_VERSION
from tracekeeper_operator.agent_client import TokenSource
from tracekeeper_operator.output_api.access import SubjectAccessReviews
from tracekeeper_operator.output_api.agent_reads import HttpAgentReads
from tracekeeper_operator.output_api.front_proxy import RequestHeaderAuth
from tracekeeper_operator.output_api.kube_reads import (
    KubeProbeLookup,
    read_request_header_auth,
    set_ca_bundle,
)
from tracekeeper_operator.output_api.placement import Placement
from tracekeeper_operator.output_api.server import OutputSources, create_output_app
from tracekeeper_operator.output_api.serving_cert import self_signed, service_names, write_pair

log = logging.getLogger(__name__)

DEFAULT_PORT = 8443
DEFAULT_OUTPUT_SERVICE = "tracekeeper-output"
DEFAULT_APISERVICE = f"{OUTPUT_VERSION}.{OUTPUT_GROUP}"


@dataclass(frozen=True)
class OutputApiSettings:
    namespace: str
    port: int = DEFAULT_PORT
    address: str = "0.0.0.0"
    cert_file: Path | None = None
    """A mounted serving certificate; None: make one and patch the APIService's caBundle."""
    key_file: Path | None = None
    service: str = DEFAULT_OUTPUT_SERVICE
    apiservice: str = DEFAULT_APISERVICE


def output_runner(app: web.Application) -> web.AppRunner:
    """How the output API is served. auto_decompress=False: no handler here reads a body,
    but aiohttp would inflate a gzip one on the event loop while it drains it, for any
    peer that connects (a client certificate is checked after)."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None, auto_decompress=False)


class OutputServer:
    def __init__(
        self,
        settings: OutputApiSettings,
        placements: Callable[[str], list[Placement]],
        tokens: TokenSource,
    ) -> None:
        self.settings = settings
        self._placements = placements
        self._reads = HttpAgentReads(tokens)
        self._runner: web.AppRunner | None = None
        self._auth: RequestHeaderAuth | None = None
        self.port = 0

    def _current_auth(self) -> RequestHeaderAuth:
        assert self._auth is not None
        return self._auth

    async def start(self) -> None:
        s = self.settings
        self._auth = await read_request_header_auth()
        if s.cert_file is not None and s.key_file is not None:
            cert, key = s.cert_file, s.key_file
        else:
            cert_pem, key_pem = self_signed(service_names(s.service, s.namespace))
            cert, key = write_pair(Path(tempfile.mkdtemp(prefix="tk-output-")), cert_pem, key_pem)
            await set_ca_bundle(s.apiservice, cert_pem)
        ssl_context = self._auth.server_context(str(cert), str(key))
        app = create_output_app(
            OutputSources(
                auth=self._current_auth,
                authorizer=SubjectAccessReviews(),
                probes=KubeProbeLookup(),
                placements=self._placements,
                reads=self._reads,
            )
        )
        self._runner = output_runner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.address, s.port, ssl_context=ssl_context)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else s.port
        log.info(
            "output API %s/%s on %s:%d (APIService %s)",
            OUTPUT_GROUP, OUTPUT_VERSION, s.address, self.port, s.apiservice,
        )  # fmt: skip

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self._reads.close()
