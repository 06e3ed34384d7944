"""The last accepted NodeState on disk, so that a restarted agent resumes tracing at once
instead of waiting for the operator's next push."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from tracekeeper_api.protocol import NodeState, Persistence
from tracekeeper_api.text import truncate_message

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/tracekeeper")
STATE_FILE = "state.json"


class StateStore:
    def __init__(self, directory: Path = DEFAULT_STATE_DIR) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.revision = 0
        """The revision the file holds (0: none), as this agent last read or wrote it."""
        self.error: str | None = None
        """Why the last save failed, until one succeeds."""

    def persisted(self) -> Persistence:
        return Persistence(revision=self.revision, error=self.error)

    def holds(self, state: NodeState) -> bool:
        return self.error is None and self.revision == state.revision

    def load(self) -> NodeState | None:
        """The persisted state, or None when there is none or it is unreadable (the
        unreadable file is set aside: the operator's next push replaces it)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            state = NodeState.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            aside = self.path.with_suffix(".json.invalid")
            log.warning("persisted state %s is invalid, moved to %s: %s", self.path, aside, exc)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return None
        self.revision = state.revision
        return state

    def save(self, state: NodeState) -> None:
        """Replace the persisted state atomically: a crash leaves the old or the new file,
        never a torn one. Mode 0600: specs may carry raw program source. A failure is kept
        (`error`) and raised; the file keeps the revision it held."""
        try:
            self._save(state)
        except OSError as exc:
            self.error = truncate_message(f"revision {state.revision} not saved: {exc}")
            raise
        self.revision, self.error = state.revision, None

    def _save(self, state: NodeState) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps(state.to_wire(), separators=(",", ":")).encode()
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(self.directory)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
