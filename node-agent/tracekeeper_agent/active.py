"""A probe the reconciler has loaded: what exporters read from."""

from __future__ import annotations

from dataclasses import dataclass

from tracekeeper_agent.ports import LoadedProgram, ProgramPlan
from tracekeeper_api.protocol import ProbeAssignment


@dataclass
class ActiveProbe:
    assignment: ProbeAssignment
    plan: ProgramPlan
    program: LoadedProgram

    @property
    def id(self) -> str:
        return self.assignment.id

    @property
    def namespace(self) -> str:
        return self.assignment.namespace

    @property
    def name(self) -> str:
        return self.assignment.name
