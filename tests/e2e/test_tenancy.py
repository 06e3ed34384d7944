"""Tenants and RBAC on the tracekeeper resources: a Role in team-a lets alice manage her
TraceProbes there, and nowhere else; status stays the operator's."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tracekeeper_sim.local_cluster import LocalCluster

pytestmark = pytest.mark.e2e

GROUP = "tracekeeper.dev"


def _probe(name: str) -> str:
    obj = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "TraceProbe", "metadata": {"name": name},
           "spec": {"syscall": {"name": "openat"}}}  # fmt: skip
    return json.dumps(obj)


def _rbac(namespace: str, user: str) -> list[dict[str, Any]]:
    # What a cluster admin grants an application team: its own objects, not their status.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "tracekeeper-editor", "namespace": namespace},
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": ["traceprobes", "tracefilters"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"tracekeeper-editor-{user}", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "tracekeeper-editor"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }  # fmt: skip
    return [role, binding]


@pytest.fixture(scope="module")
def teams(cluster: LocalCluster, crds: list[str]) -> tuple[str, str]:
    for ns in ("team-a", "team-b"):
        cluster.kubectl("create", "namespace", ns, check=True)
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": _rbac("team-a", "alice")})
    cluster.kubectl("apply", "-f", "-", input=doc, check=True)
    return "team-a", "team-b"


def _can_i(
    cluster: LocalCluster, user: str, verb: str, resource: str, ns: str, *extra: str
) -> bool:
    res = cluster.kubectl("auth", "can-i", verb, resource, "-n", ns, *extra, user=user)
    assert res.stdout.strip() in ("yes", "no"), res.stdout + res.stderr
    return res.stdout.strip() == "yes"


def test_can_i_follows_the_role(cluster: LocalCluster, teams: tuple[str, str]) -> None:
    team_a, team_b = teams
    tp = f"traceprobes.{GROUP}"
    assert _can_i(cluster, "alice", "create", tp, team_a)
    assert _can_i(cluster, "alice", "delete", f"tracefilters.{GROUP}", team_a)
    assert not _can_i(cluster, "alice", "create", tp, team_b)
    assert not _can_i(cluster, "alice", "patch", tp, team_a, "--subresource=status")
    assert not _can_i(cluster, "bob", "create", tp, team_a)


def test_alice_creates_probes_in_team_a_only(cluster: LocalCluster, teams: tuple[str, str]) -> None:
    team_a, team_b = teams
    ok = cluster.kubectl("create", "-n", team_a, "-f", "-", user="alice", input=_probe("mine"))
    assert ok.returncode == 0, ok.stderr
    listed = cluster.kubectl("get", "tp", "-n", team_a, "-o", "name", user="alice", check=True)
    assert f"traceprobe.{GROUP}/mine" in listed.stdout.split()

    denied = cluster.kubectl("create", "-n", team_b, "-f", "-", user="alice", input=_probe("x"))
    assert denied.returncode != 0
    assert (
        f'User "alice" cannot create resource "traceprobes" in API group "{GROUP}" '
        f'in the namespace "{team_b}"'
    ) in denied.stderr
    assert "NotFound" in cluster.kubectl("get", "tp", "x", "-n", team_b).stderr

    bob = cluster.kubectl("create", "-n", team_a, "-f", "-", user="bob", input=_probe("bobs"))
    assert bob.returncode != 0
    assert 'User "bob" cannot create resource "traceprobes"' in bob.stderr
    assert "cannot list" in cluster.kubectl("get", "tp", "-n", team_a, user="bob").stderr


def test_tenant_cannot_write_status(cluster: LocalCluster, teams: tuple[str, str]) -> None:
    team_a, _ = teams
    cluster.kubectl("apply", "-n", team_a, "-f", "-", input=_probe("forged"), check=True)
    # Straight to the API: kubectl patch would stop at its GET of the subresource.
    status, body = cluster.request(
        f"/apis/{GROUP}/v1alpha1/namespaces/{team_a}/traceprobes/forged/status",
        user="alice",
        method="PATCH",
        body=json.dumps({"status": {"observedGeneration": 1}}),
        content_type="application/merge-patch+json",
    )
    assert status == 403, body
    assert 'User \\"alice\\" cannot patch resource \\"traceprobes/status\\"' in body
