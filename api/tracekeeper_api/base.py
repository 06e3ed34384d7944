"""Model base shared by every wire type: camelCase on the wire, unknown fields refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """camelCase JSON/YAML on the wire, snake_case in Python; typos are errors, not ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it travels: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_merge_patch(self) -> dict[str, Any]:
        """The object as a JSON merge patch (RFC 7386) that makes the stored object equal to
        it: an optional that is None becomes null (which deletes the stored field), except
        inside lists, which a merge patch replaces whole and stores as written."""
        patch: dict[str, Any] = _nulls_outside_lists(self.model_dump(mode="json", by_alias=True))
        return patch


class SpecModel(WireModel):
    """A part of a custom resource's spec: types as strict as the apiserver's schema (no
    "true" for a boolean, no "3" for an integer), so that both refuse the same objects."""

    model_config = ConfigDict(strict=True)


def _nulls_outside_lists(value: Any, in_list: bool = False) -> Any:
    if isinstance(value, dict):
        return {
            k: _nulls_outside_lists(v, in_list)
            for k, v in value.items()
            if not (in_list and v is None)
        }
    if isinstance(value, list):
        return [_nulls_outside_lists(v, True) for v in value]
    return value
