"""`tracekeeper-agent`: the node agent (`serve`), standalone tracing on a host (`run`) and
the C a probe compiles to (`render`): arguments and commands.

Only the commands import the BCC loader (lazily, in `agent`), so that this module and
everything it imports at the top stay importable without bcc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

import yaml

from tracekeeper_agent.active import ProgramBoard
from tracekeeper_agent.outputs.events import EventHub
from tracekeeper_agent.reconcile.reconciler import Reconciler
from tracekeeper_agent.reconcile.state_store import DEFAULT_STATE_DIR
from tracekeeper_agent.reconcile.tenancy import DEFAULT_PRIVILEGED
from tracekeeper_agent.service.agent import real_loader, running_agent
from tracekeeper_agent.service.http_api import (
    API_LIMITS,
    METRICS_LIMITS,
    Listener,
    start_listener,
    token_source,
)
from tracekeeper_agent.service.render import render_state
from tracekeeper_agent.service.standalone import StandaloneError, load_standalone, outcome_lines
from tracekeeper_agent.targets.cgroups import CgroupError, CgroupIndex
from tracekeeper_agent.targets.node import NodeCgroups
from tracekeeper_agent.targets.processes import ProcTable
from tracekeeper_api.protocol import NodeState
from tracekeeper_api.resources import (
    DocumentError,
)

log = logging.getLogger("tracekeeper_agent")

DEFAULT_LISTEN = "0.0.0.0:9440"
EXIT_USAGE = 2
EXIT_NOTHING_LOADED = 1

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# --- pure helpers ------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """'10s', '1.5m', '500ms', '2h' or bare seconds -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or float(m[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration such as 10s, 2m or 500ms")
    return float(m[1]) * _UNITS[m[2] or "s"]


def parse_listen(text: str) -> tuple[str, int]:
    """'0.0.0.0:9440', '[::]:9440' or ':9440' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


_ANY_HOST = frozenset({"0.0.0.0", "::"})


def check_listeners(api: tuple[str, int], metrics: tuple[str, int]) -> None:
    """The metrics listener must not take the API's address (the second bind would fail
    after the programs were restored, with a less helpful error)."""
    (api_host, api_port), (metrics_host, metrics_port) = api, metrics
    overlap = api_host == metrics_host or {api_host, metrics_host} & _ANY_HOST
    if api_port == metrics_port and overlap:
        raise ValueError(
            f"--metrics-listen {metrics_host}:{metrics_port} takes the API's port "
            f"(--listen {api_host}:{api_port}): give it a port of its own"
        )


# --- commands ----------------------------------------------------------------------------------


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve(args: argparse.Namespace) -> int:
    node = args.node_name or os.environ.get("NODE_NAME", "")
    if not node:
        raise ValueError("--node-name (or $NODE_NAME) is required")
    host, port = parse_listen(args.listen)
    metrics_at = parse_listen(args.metrics_listen) if args.metrics_listen else None
    if metrics_at is not None:
        check_listeners((host, port), metrics_at)
    token = token_source(args.token_file)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    async with running_agent(
        node=node,
        token=token,
        state_dir=args.state_dir,
        cgroup_root=args.cgroup_root,
        events_file=args.events_file,
        privileged_namespaces=frozenset(args.privileged_namespace or DEFAULT_PRIVILEGED),
        run_time_stats=args.run_time_stats,
    ) as agent:
        listeners = [("API", agent.app, host, port, API_LIMITS)]
        if metrics_at is not None:
            listeners.append(("metrics", agent.metrics_app, *metrics_at, METRICS_LIMITS))
        started: list[Listener] = []
        try:
            for what, app, at_host, at_port, limits in listeners:
                started.append(await start_listener(app, at_host, at_port, limits))
                log.info("node %s: %s listening on %s:%d", node, what, at_host, at_port)
            await stop.wait()
        finally:
            for listener in reversed(started):
                await listener.close()  # no request outlives the programs
    return 0


async def run(args: argparse.Namespace, state: NodeState, root: Path) -> int:
    from tracekeeper_agent.outputs.console import run_console
    from tracekeeper_agent.programs.builder import Planner

    cgroups = NodeCgroups(CgroupIndex(root))  # host paths only: no pod index to build
    planner = Planner()  # uprobes resolve in the host's root: the host's root user asks
    board = ProgramBoard()
    loader = real_loader()
    reconciler = Reconciler(
        board=board,
        node=state.node,
        loader=loader,
        build_plan=planner.build,
        plan_inputs=planner.inputs,
        privileged_namespaces=None,  # the file is the host root user's own
        cgroups=cgroups,
        processes=ProcTable(),
    )
    hub = EventHub(reconciler.attributor)
    board.add_reader(hub)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    if args.duration is not None:
        asyncio.get_running_loop().call_later(args.duration, stop.set)
    polling = asyncio.create_task(reconciler.poll_targets(1.0))
    try:
        report = await reconciler.apply(state)
        for line in outcome_lines(report):
            print(line, file=sys.stderr)
        if not board.probes():
            return EXIT_NOTHING_LOADED
        await run_console(
            board.probes,
            reconciler.attributor,
            hub,
            output=cast(Literal["table", "json"], args.output),
            out=sys.stdout,
            stop=stop,
            interval=args.interval,
        )
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await hub.close()
        await reconciler.close()
        loader.close()
    return 0


# --- arguments -----------------------------------------------------------------------------------


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracekeeper-agent",
        description="tracekeeper's node agent: serve the operator's probes (serve), or run "
        "TraceProbe files on this host without Kubernetes (run).",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("serve", help="run the node agent (DaemonSet)")
    s.add_argument("--node-name", default=None, help="this node's name (default: $NODE_NAME)")
    s.add_argument("--listen", default=DEFAULT_LISTEN, help="host:port of the API")
    s.add_argument(
        "--metrics-listen",
        default=None,
        metavar="HOST:PORT",
        help="also serve GET /metrics here, without the token, for Prometheus (default: "
        "off; /metrics stays on the API port behind the token)",
    )
    s.add_argument(
        "--token-file", type=Path, default=None, help="bearer token file (else $TRACEKEEPER_TOKEN)"
    )
    s.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    s.add_argument("--cgroup-root", type=Path, default=None, help="cgroup v2 root (detected)")
    s.add_argument("--events-file", type=Path, default=None, help="also append events here")
    s.add_argument(
        "--run-time-stats",
        choices=["sampled", "on", "off"],
        default="sampled",
        help="BPF run-time statistics, what a probe's run time and ns per call are read "
        "from: they cost every BPF program on the node two clock reads per run, so by "
        "default they are on 1 s in every 10 (sampled)",
    )
    s.add_argument(
        "--privileged-namespace",
        action="append",
        default=None,
        metavar="NAMESPACE",
        help="a namespace whose probes may use privileged fields (repeatable; default: "
        "tracekeeper-system, as the operator's); the agent refuses them, and pods of other "
        "namespaces, for every other probe (NotPermitted)",
    )

    r = commands.add_parser("run", help="run TraceProbe documents on this host, no Kubernetes")
    r.add_argument("-f", "--file", type=Path, required=True, help="YAML with TraceProbe/Filter")
    r.add_argument("--for", dest="duration", type=_duration, default=None, help="e.g. 10s")
    r.add_argument("-o", "--output", choices=["table", "json"], default="table")
    r.add_argument("--interval", type=_duration, default=1.0, help="refresh period (1s)")
    r.add_argument("--cgroup-root", type=Path, default=None, help="cgroup v2 root (detected)")

    c = commands.add_parser(
        "render", help="print the C text each TraceProbe of a file compiles to (loads nothing)"
    )
    c.add_argument("-f", "--file", type=Path, required=True, help="YAML with TraceProbe/Filter")
    c.add_argument("--cgroup-root", type=Path, default=None, help="cgroup v2 root (detected)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level != "debug":  # probes and scrapes every few seconds drown the rest
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return asyncio.run(serve(args))
        try:
            state, root = load_standalone(args.file, args.cgroup_root)
        except (OSError, DocumentError, StandaloneError, CgroupError, yaml.YAMLError) as exc:
            print(f"tracekeeper-agent: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if args.command == "render":
            return EXIT_NOTHING_LOADED if render_state(state, sys.stdout, sys.stderr) else 0
        return asyncio.run(run(args, state, root))
    except (ValueError, CgroupError, OSError) as exc:  # configuration errors: no traceback
        print(f"tracekeeper-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
