"""Capture what libbcc and clang print on fd 2: it is the compiler/verifier text
users need in the status message, and BCC's exceptions do not carry it."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


class Captured:
    text = ""


@contextlib.contextmanager
def capture_fd2() -> Iterator[Captured]:
    """Redirect fd 2 into a temp file for the duration. Loads are serialized by the
    reconciler, so the process-wide redirect sees only this load's output."""
    result = Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield result
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            result.text = tmp.read().decode(errors="replace")
