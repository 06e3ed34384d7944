"""tracekeeper-operator run: the kopf operator, cluster-wide, standalone (no peering).

tracekeeper-operator run [--namespace N] [--privileged-namespace N ...]
    [--allow-raw-programs] [--tenant-tracepoint C:N ...] [--tenant-raw-tracepoint N ...]
    [--token-file F] [--metrics-port P] [--kubeconfig K]
    [--agent-daemonset NAME] [--trust-agent-endpoint-annotation] [--tenant-budget JSON]
    [--output-api-port P] [--output-api-cert-file F --output-api-key-file F]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import kopf
from prometheus_client import start_http_server

from tracekeeper_api.budgets import Budget, parse_override
from tracekeeper_api.tenant_rules import (
    TenantRules,
    check_raw_tracepoint_entry,
    check_tracepoint_entry,
)
from tracekeeper_operator.handlers import Runtime, configure_kopf, register_handlers
from tracekeeper_operator.kube_api import KubernetesWrites, can_list_nodes, load_config
from tracekeeper_operator.metrics import OperatorMetrics
from tracekeeper_operator.output_api.listener import (
    DEFAULT_APISERVICE,
    DEFAULT_OUTPUT_SERVICE,
    OutputApiSettings,
)
from tracekeeper_operator.output_api.listener import (
    DEFAULT_PORT as DEFAULT_OUTPUT_PORT,
)
from tracekeeper_operator.settings import (
    AGENT_ENDPOINT_ANNOTATION,
    DEFAULT_AGENT_DAEMONSET,
    DEFAULT_AGENT_PORT_NAME,
    DEFAULT_AGENT_SELECTOR,
    DEFAULT_TOKEN_FILE,
    OperatorSettings,
    own_namespace,
    parse_label_selector,
)

log = logging.getLogger("tracekeeper_operator")


def _tracepoint_entry(text: str) -> str:
    try:
        return check_tracepoint_entry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _raw_tracepoint_entry(text: str) -> str:
    try:
        return check_raw_tracepoint_entry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracekeeper-operator", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator until SIGINT/SIGTERM")
    run.add_argument("--namespace", help="the operator's namespace (default: $POD_NAMESPACE)")
    run.add_argument(
        "--privileged-namespace",
        action="append",
        default=[],
        metavar="N",
        help="namespace whose objects may use privileged fields (repeatable; "
        "default: the operator's namespace)",
    )
    run.add_argument(
        "--allow-raw-programs",
        action="store_true",
        help="allow spec.program (raw BCC C) in privileged namespaces",
    )
    run.add_argument(
        "--tenant-tracepoint",
        action="append",
        default=[],
        type=_tracepoint_entry,
        metavar="CATEGORY:NAME",
        help="also let tenants attach to this tracepoint, or CATEGORY:* (repeatable; add "
        "it to the admission policy's tenantTracepoints too)",
    )
    run.add_argument(
        "--tenant-raw-tracepoint",
        action="append",
        default=[],
        type=_raw_tracepoint_entry,
        metavar="NAME",
        help="also let tenants attach to this raw tracepoint (repeatable; add it to the "
        "admission policy's tenantRawTracepoints too)",
    )
    run.add_argument(
        "--token-file",
        type=Path,
        default=DEFAULT_TOKEN_FILE,
        help="the agents' API bearer token (else $TRACEKEEPER_TOKEN)",
    )
    run.add_argument("--metrics-port", type=int, default=8080, help="/metrics port (0: off)")
    run.add_argument("--metrics-address", default="0.0.0.0")
    run.add_argument(
        "--liveness",
        metavar="URL",
        help="kopf's liveness endpoint, e.g. http://0.0.0.0:8081/healthz",
    )
    run.add_argument("--kubeconfig", help="kubeconfig (default: in-cluster, else $KUBECONFIG)")
    run.add_argument(
        "--agent-selector",
        default=DEFAULT_AGENT_SELECTOR,
        help="labels of the agent pods (k=v[,k=v])",
    )
    run.add_argument("--agent-port-name", default=DEFAULT_AGENT_PORT_NAME)
    run.add_argument(
        "--agent-daemonset",
        default=DEFAULT_AGENT_DAEMONSET,
        metavar="NAME",
        help="only pods this DaemonSet of the operator's namespace controls are agents",
    )
    run.add_argument(
        "--trust-agent-endpoint-annotation",
        action="store_true",
        help=f"reach agents at their pods' {AGENT_ENDPOINT_ANNOTATION} annotation instead of "
        "pod IP:port (local test worlds only; never in a cluster)",
    )
    run.add_argument(
        "--no-node-labels",
        action="store_true",
        help="do not watch Nodes (a nodeSelector then selects no node)",
    )
    run.add_argument("--push-debounce", type=float, default=0.2, metavar="SECONDS")
    run.add_argument("--resync-interval", type=float, default=30.0, metavar="SECONDS")
    run.add_argument("--backoff-max", type=float, default=30.0, metavar="SECONDS")
    run.add_argument("--unload-timeout", type=float, default=120.0, metavar="SECONDS")
    run.add_argument(
        "--cost-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often a loaded probe's status.cost is refreshed (default 60)",
    )
    run.add_argument(
        "--tenant-budget",
        type=_budget,
        default=Budget(),
        metavar="JSON",
        help="default per-namespace budget per node, e.g. '{\"probesPerNode\": 16}' "
        "(fields left out keep their defaults; see README)",
    )
    run.add_argument(
        "--output-api-port",
        type=int,
        default=DEFAULT_OUTPUT_PORT,
        help="HTTPS port of the aggregated output API (output.tracekeeper.dev; 0: off)",
    )
    run.add_argument("--output-api-address", default="0.0.0.0")
    run.add_argument(
        "--output-api-cert-file",
        type=Path,
        help="its serving certificate (with --output-api-key-file); default: made at start, "
        "self-signed, and put into the APIService's caBundle",
    )
    run.add_argument("--output-api-key-file", type=Path)
    run.add_argument(
        "--output-api-service",
        default=DEFAULT_OUTPUT_SERVICE,
        help="the Service the APIService points at (the made certificate's DNS names)",
    )
    run.add_argument("--output-apiservice", default=DEFAULT_APISERVICE, metavar="NAME")
    run.add_argument("-v", "--verbose", action="store_true")
    return parser


def output_settings_from(args: argparse.Namespace, namespace: str) -> OutputApiSettings | None:
    if not args.output_api_port:
        return None
    if (args.output_api_cert_file is None) != (args.output_api_key_file is None):
        raise SystemExit("--output-api-cert-file and --output-api-key-file go together")
    return OutputApiSettings(
        namespace=namespace,
        port=args.output_api_port,
        address=args.output_api_address,
        cert_file=args.output_api_cert_file,
        key_file=args.output_api_key_file,
        service=args.output_api_service,
        apiservice=args.output_apiservice,
    )


def _budget(text: str) -> Budget:
    try:
        return parse_override(text).over(Budget())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def settings_from(args: argparse.Namespace) -> OperatorSettings:
    return OperatorSettings(
        namespace=own_namespace(args.namespace),
        privileged_namespaces=frozenset(args.privileged_namespace),
        allow_raw_programs=args.allow_raw_programs,
        agent_labels=parse_label_selector(args.agent_selector),
        agent_port_name=args.agent_port_name,
        agent_daemonset=args.agent_daemonset,
        trust_endpoint_annotation=args.trust_agent_endpoint_annotation,
        token_file=args.token_file,
        read_nodes=not args.no_node_labels,
        push_debounce=args.push_debounce,
        push_max_delay=max(1.0, args.push_debounce * 5),
        resync_interval=args.resync_interval,
        backoff_max=args.backoff_max,
        unload_timeout=args.unload_timeout,
        cost_interval=args.cost_interval,
        budget=args.tenant_budget,
        tenant_rules=TenantRules.extended(args.tenant_tracepoint, args.tenant_raw_tracepoint),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # kopf logs every event handler call (every pod change) at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # liveness probes
    settings = settings_from(args)
    load_config(args.kubeconfig)
    if settings.read_nodes:
        allowed, why = can_list_nodes()
        if not allowed:
            log.warning("not watching Node objects (%s): nodeSelector selects no node", why)
            settings = dataclasses.replace(settings, read_nodes=False)
    metrics = OperatorMetrics()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address, registry=metrics.registry)
    registry = kopf.OperatorRegistry()
    output = output_settings_from(args, settings.namespace)
    runtime = Runtime.build(settings, KubernetesWrites(), metrics, args.kubeconfig, output)
    register_handlers(registry, runtime)
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings)
    log.info(
        "starting: privileged namespaces %s, raw programs %s, agents: pods of DaemonSet %s/%s "
        "(%s)%s",
        ", ".join(sorted(settings.privileged)),
        "allowed" if settings.allow_raw_programs else "refused",
        settings.namespace,
        settings.agent_daemonset,
        ",".join(f"{k}={v}" for k, v in settings.agent_labels.items()),
        ", at their endpoint annotation" if settings.trust_endpoint_annotation else "",
    )
    # kopf's documented way to name itself (its default asks getpass.getuser()).
    os.environ.setdefault("POD_ID", operator_identity())
    kopf.run(
        registry=registry,
        settings=kopf_settings,
        clusterwide=True,
        standalone=True,
        liveness_endpoint=args.liveness,
    )
    return 0


def operator_identity() -> str:
    """Who this operator is, for kopf: the pod's name (its hostname) and PID. kopf's default
    asks getpass.getuser(), which fails for the image's uid 65532 (no passwd entry) and
    made the operator exit at start in its own image."""
    return f"{socket.gethostname()}/{os.getpid()}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
