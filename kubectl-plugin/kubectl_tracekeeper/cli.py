"""kubectl tracekeeper tail|top|status NAME [-n NS]: a probe's output, as yourself.

Installed as `kubectl-tracekeeper` (kubectl finds plugins by that name on $PATH). It talks
to the output API (output.tracekeeper.dev) through the kube-apiserver with your kubeconfig,
so RBAC decides: `view` in a namespace reads the output of its probes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from kubectl_tracekeeper.output_client import OutputApi, OutputError, Target, load
from tracekeeper_api.durations import parse_duration
from tracekeeper_api.output import NodeValues, ProbeNodes, ProbeTracepoints, ProbeValues
from tracekeeper_api.output_text import (
    conditions_text,
    cost_text,
    nodes_text,
    record_line,
    session_text,
    tracepoints_text,
    values_text,
)
from tracekeeper_api.status import DebugSession, ProbeCostStatus


def duration(text: str) -> float:
    """kubectl-style durations: 500ms, 10s, 5m, 1h30m (a bare number is seconds)."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    def connection(p: argparse.ArgumentParser, default: object) -> None:
        # Before or after the command, as with kubectl's own flags.
        p.add_argument("-n", "--namespace", default=default, help="default: the context's")
        p.add_argument("--kubeconfig", default=default, help="default: $KUBECONFIG")
        p.add_argument("--context", default=default, help="the kubeconfig context to use")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="the TraceProbe")
    connection(common, argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="kubectl tracekeeper", description=(__doc__ or "").splitlines()[0]
    )
    connection(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    tail = sub.add_parser("tail", parents=[common], help="follow the probe's events, all nodes")
    tail.add_argument("--for", dest="duration", type=duration, help="stop after this long")
    tail.add_argument("-o", "--output", choices=["text", "json"], default="text")
    top = sub.add_parser("top", parents=[common], help="counts or histograms, all nodes")
    top.add_argument("--once", action="store_true", help="print once and exit")
    top.add_argument("--interval", type=duration, default=2.0)
    top.add_argument("--per-node", action="store_true", help="also each node's values")
    top.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sub.add_parser("status", parents=[common], help="conditions and per-node detail")
    tps = sub.add_parser(
        "tracepoints", parents=[common], help="tracepoints the kernels of its nodes have"
    )
    tps.add_argument("--match", default="*", help="a glob, e.g. 'sched:*' (default: all)")
    tps.add_argument("-o", "--output", choices=["table", "json"], default="table")
    return parser


def tail(api: OutputApi, target: Target, args: argparse.Namespace, out: TextIO) -> int:
    deadline = None if args.duration is None else time.monotonic() + args.duration
    for record in api.records(target, 0.5 if deadline is not None else None):
        if deadline is not None and time.monotonic() >= deadline:
            break
        if not record:
            continue
        if args.output == "json":
            out.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
        else:
            out.write(record_line(record) + "\n")
        out.flush()
    return 0


def _top_frame(api: OutputApi, target: Target, args: argparse.Namespace) -> str:
    if args.per_node:
        both = NodeValues.model_validate(api.get_json(target, "values", perNode="true"))
        if args.output == "json":
            return json.dumps(both.to_wire(), separators=(",", ":")) + "\n"
        parts = [values_text(both.merged)]
        parts += [values_text(v) for _, v in sorted(both.nodes.items())]
        parts += [f"{node}: not in the sum: {why}\n" for node, why in both.unavailable.items()]
        return "\n".join(parts)
    values = ProbeValues.model_validate(api.get_json(target, "values"))
    if args.output == "json":
        return json.dumps(values.to_wire(), separators=(",", ":")) + "\n"
    return values_text(values)


def top(api: OutputApi, target: Target, args: argparse.Namespace, out: TextIO) -> int:
    while True:
        frame = _top_frame(api, target, args)
        if not args.once and args.output == "table" and out.isatty():
            out.write("\x1b[H\x1b[2J")  # like watch: redraw in place
        out.write(frame)
        out.flush()
        if args.once:
            return 0
        time.sleep(args.interval)


def status(api: OutputApi, target: Target, out: TextIO) -> int:
    probe = api.probe(target)
    st = probe.get("status") or {}
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
    head = f"TraceProbe {target.namespace}/{target.name}: "
    head += f"Ready={ready.get('status')} ({ready.get('reason', '')})" if ready else "no status yet"
    out.write(head + "\n\n" + conditions_text(st.get("conditions") or []) + "\n")
    if st.get("cost"):
        out.write(cost_text(ProbeCostStatus.model_validate(st["cost"])) + "\n")
    if st.get("session"):
        session = DebugSession.model_validate(st["session"])
        out.write(session_text(session, datetime.now(UTC)) + "\n")
        if session.final is not None:
            return 0  # unloaded everywhere: no node has anything to say
    nodes = ProbeNodes.model_validate(api.get_json(target, "nodes"))
    out.write(nodes_text(nodes))
    return 0


def tracepoints(api: OutputApi, target: Target, args: argparse.Namespace, out: TextIO) -> int:
    listing = ProbeTracepoints.model_validate(api.get_json(target, "tracepoints", match=args.match))
    if args.output == "json":
        out.write(json.dumps(listing.to_wire(), separators=(",", ":")) + "\n")
    else:
        out.write(tracepoints_text(listing))
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = _parser().parse_args(argv)
    try:
        api_client, context_ns = load(args.kubeconfig, args.context)
        api = OutputApi(api_client)
        target = Target(args.namespace or context_ns, args.name)
        if args.command == "tail":
            return tail(api, target, args, out)
        if args.command == "top":
            return top(api, target, args, out)
        if args.command == "tracepoints":
            return tracepoints(api, target, args, out)
        return status(api, target, out)
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
