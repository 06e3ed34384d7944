"""What a call to an agent can fail with (pure: the push planner decides on these)."""

from __future__ import annotations


class AgentError(Exception):
    """The agent could not be reached, or answered with an error or nonsense."""


class StaleRevision(AgentError):
    """409: the agent applied a newer revision than the one sent."""

    def __init__(self, message: str, applied_revision: int) -> None:
        super().__init__(message)
        self.applied_revision = applied_revision
