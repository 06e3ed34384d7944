"""Whole TraceProbe / TraceFilter objects, and parsing them from YAML documents."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.status import TraceFilterStatus, TraceProbeStatus

ApiVersion = Literal["tracekeeper.dev/v1alpha1"]


class ObjectMeta(BaseModel):
    """The parts of metadata tracekeeper reads; the rest is kept as it is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class TraceProbe(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    api_version: ApiVersion = Field("tracekeeper.dev/v1alpha1", alias="apiVersion")
    kind: Literal["TraceProbe"] = "TraceProbe"
    metadata: ObjectMeta
    spec: TraceProbeSpec
    status: TraceProbeStatus | None = None


class TraceFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    api_version: ApiVersion = Field("tracekeeper.dev/v1alpha1", alias="apiVersion")
    kind: Literal["TraceFilter"] = "TraceFilter"
    metadata: ObjectMeta
    spec: TraceFilterSpec
    status: TraceFilterStatus | None = None


Resource = TraceProbe | TraceFilter


class DocumentError(ValueError):
    """A YAML document that is not a valid TraceProbe or TraceFilter; says which and why."""


def parse_resource(doc: dict[str, Any], where: str = "document") -> Resource:
    kind = doc.get("kind")
    try:
        if kind == "TraceProbe":
            return TraceProbe.model_validate(doc)
        if kind == "TraceFilter":
            return TraceFilter.model_validate(doc)
    except ValidationError as exc:
        raise DocumentError(f"{where}: {kind} is invalid:\n{format_errors(exc)}") from exc
    raise DocumentError(f"{where}: kind must be TraceProbe or TraceFilter, not {kind!r}")


def load_documents(text: str, where: str = "input") -> Iterator[Resource]:
    """Every TraceProbe/TraceFilter in a multi-document YAML text, validated."""
    for index, doc in enumerate(yaml.safe_load_all(text)):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise DocumentError(f"{where}, document {index + 1}: not a mapping")
        yield parse_resource(doc, f"{where}, document {index + 1}")


def format_errors(exc: ValidationError) -> str:
    """pydantic errors as 'spec.output.kind: message' lines, with wire (camelCase) names."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(object)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)
