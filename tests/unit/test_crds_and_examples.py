"""crds/ is generated from the models and stays structural; examples validate as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tracekeeper_api import crdgen
from tracekeeper_api.resources import TraceFilter, TraceProbe, load_documents

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
STANDALONE = sorted((ROOT / "examples" / "standalone").glob("*.yaml"))


def test_crds_in_sync_with_models() -> None:
    assert crdgen.main(["--check", str(ROOT / "crds")]) == 0, "run `make crds`"


def test_crdgen_writes_and_checks_several_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "crds", tmp_path / "copy"
    assert crdgen.main(["--out", str(first), "--out", str(second)]) == 0
    names = sorted(crdgen.crds())
    assert sorted(p.name for p in second.iterdir()) == names
    assert crdgen.main(["--check", str(first), "--check", str(second)]) == 0
    stale = second / names[0]
    stale.write_text(stale.read_text() + "# edited\n")
    assert crdgen.main(["--check", str(first), "--check", str(second)]) == 1
    assert f"out of date: {stale}; run `make crds`" in capsys.readouterr().err


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found += _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _walk(value, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("name", sorted(crdgen.crds()))
def test_schema_is_structural(name: str) -> None:
    crd = crdgen.crds()[name]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "patternProperties"):
            assert banned not in node or path.endswith(".properties"), f"{banned} at {path}"
        if node.get("additionalProperties") is False:
            pytest.fail(f"additionalProperties: false at {path}")
        if node.get("type") == "object" and path != ".properties.metadata":
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), f"object without properties at {path}"
        if "properties" in node and not path.endswith(".properties"):
            assert "type" in node, f"no type at {path}"


def test_one_attach_point_rule_is_in_the_crd() -> None:
    crd = crdgen.crds()["tracekeeper.dev_traceprobes.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in spec["x-kubernetes-validations"]]
    assert any("has(self.kprobe)" in r and "== 1" in r for r in rules)


def test_committed_crds_parse() -> None:
    for path in (ROOT / "crds").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "CustomResourceDefinition"


def test_at_least_six_examples() -> None:
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates_and_says_what_it_shows(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "each example starts with a comment saying what it shows"
    objects = list(load_documents(text, path.name))
    assert objects
    for obj in objects:
        assert isinstance(obj, TraceProbe | TraceFilter)
        assert obj.metadata.namespace is None, "examples apply into the user's namespace"


def test_shared_filter_is_referenced_by_two_probes() -> None:
    objs = list(load_documents((ROOT / "examples" / "shared-filter.yaml").read_text()))
    filters = [o for o in objs if isinstance(o, TraceFilter)]
    refs = [o.spec.filter_ref for o in objs if isinstance(o, TraceProbe)]
    assert len(filters) == 1 and refs.count(filters[0].metadata.name) == 2


@pytest.mark.parametrize("path", STANDALONE, ids=[p.name for p in STANDALONE])
def test_standalone_example_validates(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#")
    assert list(load_documents(text, path.name))
