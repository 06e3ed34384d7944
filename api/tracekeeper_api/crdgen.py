"""Generate the CRD YAML in crds/ from the pydantic models (the one source of truth).

pydantic's JSON schema is not a Kubernetes structural schema, so it is rewritten:
$refs inlined, `X | None` reduced to X, `const` -> enum, titles dropped, the
docstrings kept as descriptions (they become `kubectl explain` text), and CEL
rules carried through as x-kubernetes-validations.

    python -m tracekeeper_api.crdgen --out crds      # write
    python -m tracekeeper_api.crdgen --check crds    # exit 1 when crds/ drifted

Both options repeat: `make crds` writes crds/ and its copy in manifests/base/crds/
(kustomize loads no file outside its root), and `--check` of both finds either stale.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tracekeeper_api import GROUP, VERSION
from tracekeeper_api.filters import TraceFilterSpec
from tracekeeper_api.probes import TraceProbeSpec
from tracekeeper_api.status import TraceFilterStatus, TraceProbeStatus

_DROP_KEYS = {"title", "additionalProperties", "$defs", "discriminator"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _inline({**target, **extra}, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:  # X | None: absence stands for None in Kubernetes
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return _inline({**branches[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            out[key] = {name: _inline(sub, defs) for name, sub in value.items()}
        elif key == "const":
            out["enum"] = [value]
        elif key == "default" and value is None:
            continue
        elif key == "description" and isinstance(value, str):
            out[key] = " ".join(value.split())  # docstrings wrap; kubectl explain rewraps
        else:
            out[key] = _inline(value, defs)
    if "patternProperties" in out:  # dict[Key, Value]: structural schemas have no patterns on keys
        (key_pattern, value_schema) = next(iter(out.pop("patternProperties").items()))
        names = out.pop("propertyNames", {})
        out["additionalProperties"] = value_schema
        out.setdefault("x-kubernetes-validations", []).append(_key_rule(key_pattern, names))
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _key_rule(pattern: str, names: dict[str, Any]) -> dict[str, str]:
    """The map's key pattern (and length bound) as CEL, which the apiserver checks: OpenAPI's
    propertyNames is not allowed in a structural schema, so without this the CRD would admit
    keys the models refuse."""
    rule = f"k.matches({_cel_string(pattern)})"
    if "maxLength" in names:
        rule = f"size(k) <= {names['maxLength']} && {rule}"
    return {
        "rule": f"self.all(k, {rule})",
        "message": f"every key must match {pattern}",
    }


def _cel_string(text: str) -> str:
    """A CEL raw string literal (no escape processing, as the pattern is written)."""
    assert "'" not in text, text
    return f"r'{text}'"


def _defaults_fit(node: Any) -> Any:
    """Drop object/array defaults: the apiserver would materialise them on every object,
    and pydantic applies them on read anyway."""
    if isinstance(node, list):
        return [_defaults_fit(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _defaults_fit(v) for k, v in node.items()}
    if isinstance(out.get("default"), dict | list):
        del out["default"]
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    result: dict[str, Any] = _defaults_fit(_inline(raw, defs))
    return result


def _crd(
    kind: str,
    plural: str,
    short: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": structural_schema(spec_model),
            "status": structural_schema(status_model),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["tracing"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


_READY = '.status.conditions[?(@.type=="Ready")]'


def crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object."""
    probe = _crd(
        "TraceProbe",
        "traceprobes",
        "tp",
        TraceProbeSpec,
        TraceProbeStatus,
        "TraceProbe: what to trace (one attach point), in which pods (a TraceFilter), "
        "and what to produce (counts, a histogram, or events).",
        [
            {"name": "Ready", "type": "string", "jsonPath": f"{_READY}.status"},
            {"name": "Reason", "type": "string", "jsonPath": f"{_READY}.reason"},
            {"name": "Loaded", "type": "integer", "jsonPath": ".status.nodes.loaded"},
            {"name": "Targeted", "type": "integer", "jsonPath": ".status.nodes.targeted"},
            {"name": "Pods", "type": "integer", "jsonPath": ".status.targets.pods"},
            {"name": "Output", "type": "string", "jsonPath": ".spec.output.kind", "priority": 1},
            # kubectl prints a future date column as <invalid>: the time itself, and
            # `kubectl tracekeeper status` says how long is left.
            {"name": "Expires", "type": "string", "jsonPath": ".status.session.expiresAt"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )
    filt = _crd(
        "TraceFilter",
        "tracefilters",
        "tf",
        TraceFilterSpec,
        TraceFilterStatus,
        "TraceFilter: whom to trace. TraceProbes in the same namespace use it by filterRef.",
        [
            {"name": "Pods", "type": "integer", "jsonPath": ".status.matchedPods"},
            {"name": "Used-By", "type": "string", "jsonPath": ".status.usedBy", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )
    return {
        f"{GROUP}_traceprobes.yaml": probe,
        f"{GROUP}_tracefilters.yaml": filt,
    }


HEADER = "# Generated by `make crds` from api/tracekeeper_api. Do not edit by hand.\n"


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--out", type=Path, action="append", help="write the CRDs into this directory (repeatable)"
    )
    group.add_argument(
        "--check",
        type=Path,
        action="append",
        help="fail when this directory has drifted (repeatable)",
    )
    args = parser.parse_args(argv)
    drifted = []
    rendered = {name: render(crd) for name, crd in crds().items()}
    for directory in args.out or []:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.items():
            (directory / name).write_text(text)
    for directory in args.check or []:
        for name, text in rendered.items():
            path = directory / name
            if not path.exists() or path.read_text() != text:
                drifted.append(str(path))
    if drifted:
        print(f"out of date: {', '.join(drifted)}; run `make crds`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
