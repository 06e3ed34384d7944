"""The models and the apiserver agree (one source of truth, checked): generated TraceProbe
and TraceFilter specs, valid and invalid (each field's edge values, patterns, lengths, list
sizes, map keys, wrong types, unknown fields, cross-field rules), are sent to the real
apiserver as a server-side dry run and parsed by the pydantic models. Both must accept or
both refuse, and a refusal must point at the same field.

TK_DIFFERENTIAL_EXAMPLES (default 2000) and TK_DIFFERENTIAL_SEED set the run; hypothesis
shrinks a disagreement to its smallest object. `make test` runs one fixed seed, so that CI
repeats the same 2,000 objects; `make reliability` takes a new random seed each run (printed)
to explore further.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import MAX_EVENTS_PER_SECOND, MAX_SAMPLING, TraceProbeSpec
from tracekeeper_sim.local_cluster import LocalCluster

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("TK_DIFFERENTIAL_EXAMPLES", "2000"))
FIXED_SEED = 20261202
_seed = os.environ.get("TK_DIFFERENTIAL_SEED", str(FIXED_SEED))
SEED = int(_seed) if _seed != "random" else random.randrange(2**32)
API = "/apis/tracekeeper.dev/v1alpha1"

Obj = dict[str, Any]


def pool(*values: Any, valid: int = 1) -> st.SearchStrategy[Any]:
    """One of `values`; the first `valid` of them (valid ones) four times as likely, so that
    objects with several fields are still often valid as a whole."""
    return st.sampled_from([*values[:valid] * 4, *values])


# Edge values per field: valid ones first, then the ones either side should refuse.
LABEL_KEYS = pool(
    "app",
    "example.com/tier",
    "a" * 63,
    "k8s.io/" + "n" * 63,
    "a.b_c-d",
    "bad key!",
    "",
    "-a",
    "a" * 64,
    "UP.example.com/x",
    "a/b/c",
    "x/",
    "/x",
)
LABEL_VALUES = pool("", "web", "a" * 63, "A-b_c.d", "bad value!", "a" * 64, "-x", "x-", valid=4)
NAMES = pool("opens", "a" * 253, "Bad_Name", "", "a" * 254, "-a", valid=2)
TRACEPOINTS = pool(
    "syscalls:sys_enter_openat",
    "sched:sched_process_exec",
    "a:b",
    "bad",
    "A:b",
    "a" * 65 + ":b",
    "a:" + "b" * 97,
    ":x",
    7,
)
IDENTS = pool("vfs_read", "main", "_x.y", "a" * 128, "1bad", "a-b", "", "a" * 129, valid=4)
SYSCALLS = pool("openat", "read", "sys_enter_read", "Open", "", "a" * 65, valid=3)
BINARIES = pool(
    "/usr/bin/python3", "python3", "libc.so.6", "/a/../b", "/", "", "a b", "/" + "d/" * 10 + "x"
)
C_IDENTS = pool("python", "function__entry", "_x", "a" * 64, "1bad", "a.b", "", "a" * 65, valid=4)
FIELDS = pool("filename", "count", "a" * 64, "BAD", "9x", "", "a" * 65, valid=3)
AGG = pool("pod", "container", "comm", "pid", "nope", valid=4)
COMMS = pool("nginx", "a" * 15, "a" * 16, "", "a/b", valid=2)
CGROUPS = pool("/system.slice/x.service", "/a", "rel", "/../x", "/a//b", "/", valid=2)
DNS = pool("web", "a" * 63, "Web", "", "a" * 64, valid=2)
BOOLS = pool(True, False, None, "true", 1, valid=3)
DURATIONS = pool("10m", "1h30m", "1s", "168h", "500ms", "169h", "0s", "1.5h", "10", "", 5, valid=4)


def sizes(elements: st.SearchStrategy[Any], *, most: int) -> st.SearchStrategy[list[Any]]:
    """Lists of 0..3 elements, or just at and over their bound."""
    return st.one_of(
        st.lists(elements, max_size=3),
        st.lists(elements, min_size=most, max_size=most + 1),
    )


def some(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Obj]:
    """Objects with any subset of these fields."""
    return st.fixed_dictionaries({}, optional=fields)


def labels(most: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=3),
        st.dictionaries(st.from_regex(r"k[0-9]{1,3}", fullmatch=True), pool("v"),
                        min_size=most, max_size=most + 1),
    )  # fmt: skip


REQUIREMENT = some(
    key=LABEL_KEYS,
    operator=pool("In", "NotIn", "Exists", "DoesNotExist", "Bogus", valid=4),
    values=sizes(LABEL_VALUES, most=64),
)
SELECTOR = some(matchLabels=labels(32), matchExpressions=sizes(REQUIREMENT, most=16))
FILTER = some(
    podSelector=SELECTOR,
    containers=sizes(DNS, most=16),
    processNames=sizes(COMMS, most=16),
    namespaceSelector=SELECTOR,
    pids=sizes(pool(1, 42, 4_194_304, 4_194_305, 0, -1, "7", valid=3), most=64),
    followChildren=BOOLS,
    cgroupPaths=sizes(CGROUPS, most=16),
    hostWide=BOOLS,
)
OUTPUT = some(
    kind=pool("count", "histogram", "events", "bogus", valid=3),
    by=sizes(AGG, most=4),
    fields=sizes(FIELDS, most=8),
    value=FIELDS,
    rateLimit=pool(1, 1000, MAX_EVENTS_PER_SECOND, MAX_EVENTS_PER_SECOND + 1, 0, -5, "9", valid=3),
)
ATTACH = st.one_of(
    st.fixed_dictionaries({"tracepoint": TRACEPOINTS}),
    st.fixed_dictionaries({"rawTracepoint": IDENTS}),
    st.fixed_dictionaries({"syscall": some(name=SYSCALLS, latency=BOOLS)}),
    st.fixed_dictionaries({"kprobe": some(function=IDENTS, **{"return": BOOLS})}),
    st.fixed_dictionaries({"uprobe": some(binary=BINARIES, symbol=IDENTS, **{"return": BOOLS})}),
    st.fixed_dictionaries({"usdt": some(binary=BINARIES, provider=C_IDENTS, name=C_IDENTS)}),
    st.fixed_dictionaries({"program": some(source=pool("int x;", "", "x" * 65537))}),
    st.just({}),
    st.fixed_dictionaries({"tracepoint": TRACEPOINTS, "syscall": st.just({"name": "read"})}),
)
PROBE_REST = some(
    filterRef=NAMES,
    filter=FILTER,
    output=OUTPUT,
    sampling=pool(1, 2, MAX_SAMPLING, MAX_SAMPLING + 1, 0, "3", 1.5, valid=3),
    nodeSelector=labels(16),
    suspend=BOOLS,
    duration=DURATIONS,
    bogus=st.just(1),  # an unknown field
)
PROBE = st.builds(lambda a, r: {**a, **r}, ATTACH, PROBE_REST)
KINDS: dict[str, tuple[str, type[BaseModel], st.SearchStrategy[Obj]]] = {
    "TraceProbe": ("traceprobes", TraceProbeSpec, PROBE),
    "TraceFilter": ("tracefilters", TraceFilterSpec, FILTER),
}
TRIED: Counter[str] = Counter()
LAST_REFUSAL = [""]
"""The apiserver's message of the last refusal, for an assertion's text."""


def _path(parts: Any) -> str:
    """`filter.pids[1]`, `spec.filter.pids[1]` and ("filter", "pids", 1) all -> filter.pids.1"""
    text = parts if isinstance(parts, str) else ".".join(str(p) for p in parts)
    text = re.sub(r"\[(\w+)\]", r".\1", text)
    return text.removeprefix("spec").lstrip(".")


def model_verdict(model: type[BaseModel], spec: Obj) -> list[str] | None:
    """None when the model accepts the spec, else the fields it names."""
    try:
        model.model_validate(spec)
    except ValidationError as exc:
        return [_path(e["loc"]) for e in exc.errors(include_url=False)]
    return None


def server_verdict(
    cluster: LocalCluster, ns: str, kind: str, spec: Obj
) -> tuple[list[str] | None, Obj]:
    """(None, the spec as it would be stored) when the apiserver accepts, else (the fields
    it names, the spec sent). Stored, because that is what the operator and agents parse:
    the apiserver drops a null where a field is not nullable."""
    plural = KINDS[kind][0]
    body = {"apiVersion": "tracekeeper.dev/v1alpha1", "kind": kind,
            "metadata": {"name": "differential"}, "spec": spec}  # fmt: skip
    status, text = cluster.request(
        f"{API}/namespaces/{ns}/{plural}?dryRun=All&fieldValidation=Strict",
        method="POST", body=json.dumps(body), timeout=30,
    )  # fmt: skip
    if status in (200, 201):
        stored: Obj = json.loads(text).get("spec") or {}
        return None, stored
    assert status in (400, 422), f"HTTP {status}: {text[:500]}"
    answer = json.loads(text)
    causes = (answer.get("details") or {}).get("causes") or [{}]
    LAST_REFUSAL[0] = str(answer.get("message", ""))[:600]
    return [_path(c.get("field", "") or "") for c in causes], _without_nulls(spec)


def _without_nulls(value: Any) -> Any:
    """What the apiserver reads of a sent object: a null where a field is not nullable is
    as if the field were absent."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def same_field(server: list[str], model: list[str]) -> bool:
    """Some field both name, one inside the other (CEL rules sit on the object that holds
    the fields; pydantic names the key or item)."""
    return any(s.startswith(m) or m.startswith(s) for s in server for m in model)


@pytest.fixture(scope="module")
def ns(cluster: LocalCluster, crds: list[str], make_namespace: Callable[[str], str]) -> str:
    return make_namespace("differential")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_models_and_the_apiserver_agree(cluster: LocalCluster, ns: str, kind: str) -> None:
    started = time.monotonic()
    model = KINDS[kind][1]

    @seed(SEED)
    @settings(max_examples=EXAMPLES // len(KINDS), deadline=None, database=None,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(spec=KINDS[kind][2])
    def agree(spec: Obj) -> None:
        server, parsed = server_verdict(cluster, ns, kind, spec)
        ours = model_verdict(model, parsed)
        TRIED[f"{kind} {'refused' if ours is not None else 'accepted'}"] += 1
        shown = f"{json.dumps(spec)[:600]} (seed {SEED}; apiserver: {LAST_REFUSAL[0]})"
        assert (server is None) == (ours is None), (
            f"apiserver {'accepts' if server is None else f'refuses {server}'}, the model "
            f"{'accepts' if ours is None else f'refuses {ours}'}: {shown}"
        )
        if server is not None and ours is not None:
            assert same_field(server, ours), f"apiserver names {server}, model {ours}: {shown}"

    agree()
    tried = sum(n for k, n in TRIED.items() if k.startswith(kind))
    print(
        f"\n[differential] {kind}: {tried} objects, 0 disagreements, seed {SEED} "
        f"({TRIED[kind + ' accepted']} accepted, {TRIED[kind + ' refused']} refused by both; "
        f"{time.monotonic() - started:.1f}s)",
        file=sys.stderr,
    )
