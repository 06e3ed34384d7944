"""Kubernetes label selectors, with the matching logic the operator applies to pods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Self

from pydantic import ConfigDict, Field, model_validator

from tracekeeper_api.base import SpecModel
from tracekeeper_api.strings import LabelKey, LabelValue


class LabelSelectorRequirement(SpecModel):
    """One label requirement, as in any Kubernetes label selector."""

    key: LabelKey
    """The label key the requirement applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values: In, NotIn, Exists or DoesNotExist."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Values for In and NotIn (at least one); must be empty for Exists and DoesNotExist."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(self.operator in ['In', 'NotIn'])"
                    " || (has(self.values) && size(self.values) > 0)",
                    "message": "operator In and NotIn need at least one value",
                },
                {
                    "rule": "!(self.operator in ['Exists', 'DoesNotExist'])"
                    " || !has(self.values) || size(self.values) == 0",
                    "message": "operator Exists and DoesNotExist take no values",
                },
            ]
        }
    )

    @model_validator(mode="after")
    def _values_fit_operator(self) -> Self:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(SpecModel):
    """Selects objects by labels. An empty selector selects everything in scope."""

    match_labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    """Labels that must all be present with exactly these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=16)
    """Requirements that must all hold."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
            if req.operator == "In" and labels.get(req.key) not in req.values:
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
        return True
