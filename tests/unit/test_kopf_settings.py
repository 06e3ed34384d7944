"""What the operator changes of kopf's settings."""

from __future__ import annotations

from typing import Any, cast

import kopf

from tracekeeper_operator.handlers import ProbeDiffBase, configure_kopf

META = {"name": "x", "namespace": "shop", "labels": {"app": "web"}}


def body(**fields: Any) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, {"metadata": META, **fields}))


def test_only_traceprobes_get_a_diff_essence() -> None:
    """kopf deep-copies every event's body into an essence for change handlers; only
    TraceProbe has one (its delete handler), so other kinds are spared the copy."""
    storage = ProbeDiffBase(prefix="tracekeeper.dev")
    spec = {"tracepoint": "syscalls:sys_enter_openat"}
    assert storage.build(body=body(apiVersion="v1", kind="Pod", spec={"a": 1})) == {}
    probe = body(apiVersion="tracekeeper.dev/v1alpha1", kind="TraceProbe", spec=spec)
    assert storage.build(body=probe)["spec"] == spec
    assert storage.build(body=body(spec={"a": 1}))["spec"] == {"a": 1}  # no kind: as kopf does


def test_the_operator_uses_it() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings)
    assert isinstance(settings.persistence.diffbase_storage, ProbeDiffBase)
