"""The aggregated output API (output.tracekeeper.dev) on a LocalCluster, as the shipped
manifests install it on a real one: the tenant roles aggregated into view/edit/admin, the
shipped APIService, and its Service made an ExternalName for the operator serving on this
host's loopback (no kube-proxy or pod network here: the apiserver dials localhost).

LocalCluster runs no kube-controller-manager, so `aggregate_cluster_roles` does what its
clusterrole-aggregation controller would."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tracekeeper_sim.local_cluster import LocalCluster
from tracekeeper_sim.world import OPERATOR_NS

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "base"
APISERVICE = "v1alpha1.output.tracekeeper.dev"
AGGREGATED = ("view", "edit", "admin")

Obj = dict[str, Any]


def shipped(kind: str, name: str, file: str = "output-api.yaml") -> Obj:
    """One object of the shipped manifests, as written."""
    docs = yaml.safe_load_all((MANIFESTS / file).read_text())
    return next(d for d in docs if d and d["kind"] == kind and d["metadata"]["name"] == name)


def aggregate_cluster_roles(cluster: LocalCluster) -> None:
    """Each aggregated role's rules become the union of the rules of the ClusterRoles its
    selectors match. Repeated until nothing changes, since view feeds edit and edit feeds
    admin."""
    for _ in range(len(AGGREGATED) + 1):
        changed = False
        for name in AGGREGATED:
            role = json.loads(cluster.kubectl("get", "clusterrole", name, "-o", "json",
                                              check=True).stdout)  # fmt: skip
            rules: list[Obj] = []
            for selector in role["aggregationRule"]["clusterRoleSelectors"]:
                labels = ",".join(f"{k}={v}" for k, v in selector["matchLabels"].items())
                listed = json.loads(cluster.kubectl("get", "clusterroles", "-l", labels, "-o",
                                                    "json", check=True).stdout)  # fmt: skip
                for source in sorted(listed["items"], key=lambda r: r["metadata"]["name"]):
                    if source["metadata"]["name"] != name:
                        rules += [r for r in source.get("rules") or [] if r not in rules]
            if rules != (role.get("rules") or []):
                cluster.kubectl("patch", "clusterrole", name, "--type=merge",
                                "-p", json.dumps({"rules": rules}), check=True)  # fmt: skip
                changed = True
        if not changed:
            return
    raise AssertionError("role aggregation did not settle")


@contextlib.contextmanager
def output_api_installed(cluster: LocalCluster, port: int) -> Iterator[None]:
    """The tenant roles (TraceProbes and their output in view/edit/admin), the APIService
    and its Service pointing at 127.0.0.1:`port`, where the operator is to serve
    (`World.start_operator(output_api_port=port)`); removed again on exit."""
    cluster.kubectl("apply", "-f", str(MANIFESTS / "rbac-tenants.yaml"), check=True)
    role = shipped("ClusterRole", "tracekeeper-output-view")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(role), check=True)
    aggregate_cluster_roles(cluster)
    apiservice = shipped("APIService", APISERVICE)
    apiservice["spec"]["service"]["port"] = port
    service_name: str = apiservice["spec"]["service"]["name"]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name, "namespace": OPERATOR_NS},
        "spec": {"type": "ExternalName", "externalName": "localhost",
                 "ports": [{"name": "https", "port": port}]},
    }  # fmt: skip
    try:
        for doc in (service, apiservice):
            cluster.kubectl("apply", "-f", "-", input=json.dumps(doc), check=True)
        yield
    finally:
        cluster.kubectl("delete", "apiservice", APISERVICE, "--ignore-not-found")
        cluster.kubectl("delete", "service", "-n", OPERATOR_NS, service_name,
                        "--ignore-not-found")  # fmt: skip
