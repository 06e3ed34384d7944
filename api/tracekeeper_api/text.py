"""Text bounded for where users read it: status messages, Events, logs.

One set of helpers, so that a message is clipped the same way wherever it is made (the
agent's outcome, the operator's conditions and Events).
"""

from __future__ import annotations

from collections.abc import Sequence

from tracekeeper_api.status import MAX_MESSAGE


def truncate_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """Bound a verifier/compiler message: keep its end, where the error is."""
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1) :]


def clip_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """Bound a message the operator writes: keep its start, where the summary is."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_of(items: Sequence[str], limit: int, *, sep: str = ", ", more_sep: str = " ") -> str:
    """The first `limit` items, then how many more: "a, b and 3 more"."""
    more = len(items) - limit
    return sep.join(items[:limit]) + (f"{more_sep}and {more} more" if more > 0 else "")


def one_line(data: bytes, limit: int) -> str:
    """The first `limit` bytes of `data` as one line of text (for a log)."""
    return " ".join(data[:limit].decode(errors="replace").split())
