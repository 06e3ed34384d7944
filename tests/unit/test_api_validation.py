"""TraceProbe / TraceFilter validation: every invalid case names the field and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from tracekeeper_api.resources import DocumentError, load_documents, parse_resource


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tracekeeper.dev/v1alpha1",
        "kind": "TraceProbe",
        "metadata": {"name": "p"},
        "spec": spec,
    }


def tfilter(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tracekeeper.dev/v1alpha1",
        "kind": "TraceFilter",
        "metadata": {"name": "f"},
        "spec": spec,
    }


TP = {"tracepoint": "syscalls:sys_enter_openat"}

INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("no attach point", probe({}), ["set exactly one attach point", "found: none"]),
    (
        "two attach points",
        probe({**TP, "rawTracepoint": "sched_switch"}),
        ["set exactly one attach point", "found: tracepoint, rawTracepoint"],
    ),
    (
        "tracepoint without category",
        probe({"tracepoint": "sys_enter_openat"}),
        ["spec.tracepoint", "use category:name"],
    ),
    (
        "tracepoint with shell characters",
        probe({"tracepoint": "syscalls:sys_enter_openat;rm"}),
        ["spec.tracepoint", "lowercase letters, digits and '_'"],
    ),
    (
        "uprobe relative binary",
        probe({"uprobe": {"binary": "../../bin/sh", "symbol": "main"}}),
        ["spec.uprobe.binary", "no relative paths, '..'"],
    ),
    (
        "uprobe path with ..",
        probe({"uprobe": {"binary": "/usr/../etc/shadow", "symbol": "main"}}),
        ["spec.uprobe.binary", "absolute path"],
    ),
    (
        "uprobe symbol charset",
        probe({"uprobe": {"binary": "c", "symbol": "get pid()"}}),
        ["spec.uprobe.symbol", "use a C identifier"],
    ),
    (
        "uprobe missing symbol",
        probe({"uprobe": {"binary": "c"}}),
        ["spec.uprobe.symbol", "Field required"],
    ),
    (
        "usdt library name",
        probe({"usdt": {"binary": "c", "provider": "libc", "name": "setjmp"}}),
        ["spec.usdt.binary", "use an absolute path inside the container"],
    ),
    (
        "usdt path with ..",
        probe({"usdt": {"binary": "/usr/../bin/x", "provider": "p", "name": "n"}}),
        ["spec.usdt.binary", "no '..'"],
    ),
    (
        "usdt provider charset",
        probe({"usdt": {"binary": "/usr/bin/python3", "provider": "py-thon", "name": "n"}}),
        ["spec.usdt.provider", "use a C identifier"],
    ),
    (
        "usdt name with a dot",
        probe({"usdt": {"binary": "/usr/bin/python3", "provider": "python", "name": "a.b"}}),
        ["spec.usdt.name", "use a C identifier"],
    ),
    (
        "usdt name too long",
        probe({"usdt": {"binary": "/usr/bin/python3", "provider": "python", "name": "n" * 65}}),
        ["spec.usdt.name", "at most 64 characters"],
    ),
    (
        "usdt missing name",
        probe({"usdt": {"binary": "/usr/bin/python3", "provider": "python"}}),
        ["spec.usdt.name", "Field required"],
    ),
    (
        "usdt and uprobe",
        probe(
            {
                "usdt": {"binary": "/usr/bin/python3", "provider": "python", "name": "line"},
                "uprobe": {"binary": "c", "symbol": "getpid"},
            }
        ),
        ["set exactly one attach point", "found: uprobe, usdt"],
    ),
    (
        "kprobe unknown field",
        probe({"kprobe": {"function": "tcp_v4_connect", "retrun": True}}),
        ["spec.kprobe.retrun", "Extra inputs are not permitted"],
    ),
    (
        "syscall with prefix uppercase",
        probe({"syscall": {"name": "SYS_read"}}),
        ["spec.syscall.name", "without prefix, lowercase"],
    ),
    (
        "unknown output kind",
        probe({**TP, "output": {"kind": "trace"}}),
        ["spec.output.kind", "'count', 'histogram' or 'events'"],
    ),
    (
        "unknown aggregation key",
        probe({**TP, "output": {"by": ["node"]}}),
        ["spec.output.by.0", "'pod', 'container', 'comm' or 'pid'"],
    ),
    (
        "repeated aggregation key",
        probe({**TP, "output": {"by": ["pod", "pod"]}}),
        ["spec.output", "by keys must not repeat"],
    ),
    (
        "rate limit on counts",
        probe({**TP, "output": {"kind": "count", "rateLimit": 10}}),
        ["spec.output", "rateLimit applies to output kind events only"],
    ),
    (
        "rate limit too high",
        probe({**TP, "output": {"kind": "events", "rateLimit": 10_000_000}}),
        ["spec.output.rateLimit", "less than or equal to 1000000"],
    ),
    (
        "rate limit zero",
        probe({**TP, "output": {"kind": "events", "rateLimit": 0}}),
        ["spec.output.rateLimit", "greater than or equal to 1"],
    ),
    (
        "sampling zero",
        probe({**TP, "sampling": 0}),
        ["spec.sampling", "greater than or equal to 1"],
    ),
    (
        "histogram without a value",
        probe({**TP, "output": {"kind": "histogram"}}),
        ["spec", "a histogram needs a value"],
    ),
    (
        "fields without a tracepoint",
        probe({"syscall": {"name": "read"}, "output": {"kind": "events", "fields": ["count"]}}),
        ["spec", "output.fields captures tracepoint fields: it needs a tracepoint"],
    ),
    (
        "too many fields",
        probe({**TP, "output": {"kind": "events", "fields": [f"f{i}" for i in range(9)]}}),
        ["spec.output.fields", "at most 8 items"],
    ),
    (
        "filterRef and filter",
        probe({**TP, "filterRef": "web", "filter": {}}),
        ["spec", "set filterRef or filter, not both"],
    ),
    (
        "filterRef not a name",
        probe({**TP, "filterRef": "Web_Pods"}),
        ["spec.filterRef", "DNS-1123 subdomain"],
    ),
    (
        "program source too large",
        probe({"program": {"source": "x" * 70_000}}),
        ["spec.program.source", "at most 65536 characters"],
    ),
    (
        "misspelled spec field",
        probe({**TP, "ouptut": {"kind": "events"}}),
        ["spec.ouptut", "Extra inputs are not permitted"],
    ),
    (
        "process name too long",
        tfilter({"processNames": ["a-very-long-process-name"]}),
        ["spec.processNames.0", "at most 15 characters"],
    ),
    (
        "selector operator",
        tfilter({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Equals"}]}}),
        ["spec.podSelector.matchExpressions.0.operator", "'In', 'NotIn', 'Exists'"],
    ),
    (
        "In without values",
        tfilter({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}),
        ["spec.podSelector.matchExpressions.0", "operator In needs at least one value"],
    ),
    (
        "hostWide with podSelector",
        tfilter({"hostWide": True, "podSelector": {"matchLabels": {"app": "x"}}}),
        ["spec", "hostWide traces every process: it cannot be combined"],
    ),
    (
        "followChildren without pids",
        tfilter({"followChildren": True}),
        ["spec", "followChildren needs pids"],
    ),
    ("pid zero", tfilter({"pids": [0]}), ["spec.pids.0", "greater than or equal to 1"]),
    (
        "cgroup path with ..",
        tfilter({"cgroupPaths": ["/system.slice/../kubepods"]}),
        ["spec.cgroupPaths.0", "no '..'"],
    ),
    (
        "container name charset",
        tfilter({"containers": ["App_1"]}),
        ["spec.containers.0", "DNS-1123 label"],
    ),
    (
        "label value charset",
        tfilter({"podSelector": {"matchLabels": {"app": "a b"}}}),
        ["spec.podSelector.matchLabels.app", "label value"],
    ),
]


@pytest.mark.parametrize(("case", "doc", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_object_names_field_and_rule(
    case: str, doc: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(DocumentError) as exc:
        parse_resource(doc, "test.yaml")
    message = str(exc.value)
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in:\n{message}"


def test_wrong_kind_is_named() -> None:
    with pytest.raises(DocumentError, match="kind must be TraceProbe or TraceFilter, not 'Pod'"):
        parse_resource({"kind": "Pod"})


def test_document_position_is_reported() -> None:
    text = "kind: TraceFilter\nmetadata: {name: f}\nspec: {}\n---\nkind: TraceProbe\n"
    text += "metadata: {name: p}\nspec: {sampling: 2}\n"
    with pytest.raises(DocumentError, match=r"probe.yaml, document 2: TraceProbe is invalid"):
        list(load_documents(text, "probe.yaml"))


def test_valid_probe_defaults() -> None:
    res = parse_resource(probe(TP))
    assert res.kind == "TraceProbe"
    spec = res.spec
    assert spec.output.kind == "count"
    assert spec.output.by == ["pod"]
    assert spec.sampling == 1
    assert spec.attach_kind == "tracepoint"


def test_privileged_fields_listed() -> None:
    res = parse_resource(tfilter({"pids": [1, 2], "followChildren": True, "cgroupPaths": ["/a"]}))
    assert res.kind == "TraceFilter"
    assert res.spec.privileged_fields() == ["pids", "cgroupPaths"]
    tenant = parse_resource(tfilter({"podSelector": {"matchLabels": {"app": "x"}}}))
    assert tenant.kind == "TraceFilter"
    assert tenant.spec.privileged_fields() == []


def test_uprobe_return_keyword_round_trips() -> None:
    res = parse_resource(probe({"uprobe": {"binary": "c", "symbol": "getpid", "return": True}}))
    assert res.kind == "TraceProbe"
    assert res.spec.uprobe is not None and res.spec.uprobe.return_
    assert res.spec.to_wire()["uprobe"] == {"binary": "c", "symbol": "getpid", "return": True}
