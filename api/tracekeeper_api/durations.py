"""Durations as Kubernetes and kubectl write them (Go's time.ParseDuration subset): one or
more integer-and-unit parts, `500ms`, `90s`, `10m`, `1h30m`. CEL's `duration()` reads the
same strings, so the CRD can bound them where the apiserver checks."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, Field

_PART = re.compile(r"([0-9]{1,9})(ms|s|m|h)")
DURATION_PATTERN = r"^([0-9]{1,9}(ms|s|m|h))+$"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

MIN_PROBE_DURATION = "1s"
MAX_PROBE_DURATION = "168h"
"""The longest debug session any TraceProbe may ask for (a week); a namespace's budget
(maxDuration) usually asks for less."""


def parse_duration(text: str) -> float:
    """Seconds; ValueError saying what is allowed otherwise."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text[:40]!r} is not a duration: use e.g. 30s, 10m, 1h30m, 500ms")
    return sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """The shortest exact-to-the-second spelling: 3600 -> 1h, 5400 -> 1h30m, 0.5 -> 500ms."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    rest = round(seconds)
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def _bounded(value: str) -> str:
    seconds = parse_duration(value)
    low, high = parse_duration(MIN_PROBE_DURATION), parse_duration(MAX_PROBE_DURATION)
    if not low <= seconds <= high:
        raise ValueError(
            f"{value!r} is out of range: from {MIN_PROBE_DURATION} to {MAX_PROBE_DURATION}"
        )
    return value


_check: Callable[[str], str] = _bounded
_CEL = (
    f"duration(self) >= duration('{MIN_PROBE_DURATION}') "
    f"&& duration(self) <= duration('{MAX_PROBE_DURATION}')"
)
_SCHEMA: Any = Field(
    min_length=2,
    max_length=32,
    json_schema_extra={
        "pattern": DURATION_PATTERN,
        "x-kubernetes-validations": [
            {
                "rule": _CEL,
                "message": f"must be from {MIN_PROBE_DURATION} to {MAX_PROBE_DURATION}",
            }
        ],
    },
)

ProbeDuration = Annotated[str, _SCHEMA, AfterValidator(_check)]
"""A debug session's length, e.g. 10m: from 1s to 168h."""
