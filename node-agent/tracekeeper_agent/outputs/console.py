"""Standalone-mode output (`tracekeeper-agent run -f probe.yaml -o table|json`).

Counts become a table of the top keys, histograms log2 bars drawn like BCC's
print_log2_hist, events JSON lines. The renderers are pure functions of samples; only
`run_console` reads programs and writes to a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TextIO

from tracekeeper_agent.active import ActiveProbe
from tracekeeper_agent.outputs.events import EventHub, encode, rfc3339
from tracekeeper_agent.outputs.metrics import KeyLabels, key_labels
from tracekeeper_agent.ports import Attributor, CountSample, HistogramSample
from tracekeeper_api.output_text import (
    COLUMNS,
    DEFAULT_TOP,
    columns,
    count_table,
    histogram_text,
)

OutputFormat = Literal["table", "json"]


def _pick(labels: KeyLabels, cols: Sequence[str]) -> tuple[str, ...]:
    return tuple(labels[COLUMNS.index(c)] for c in cols)


def aggregate_counts(
    samples: Sequence[CountSample], by: Sequence[str], namespace: str, attributor: Attributor
) -> list[tuple[tuple[str, ...], int]]:
    """Counts summed per shown key (container cgroups of one pod add up under `by: [pod]`),
    largest first."""
    cols = columns(by)
    rows: dict[tuple[str, ...], int] = {}
    for s in samples:
        key = _pick(key_labels(s.key, by, namespace, attributor), cols)
        rows[key] = rows.get(key, 0) + s.value
    return sorted(rows.items(), key=lambda kv: (-kv[1], kv[0]))


def aggregate_histograms(
    samples: Sequence[HistogramSample], by: Sequence[str], namespace: str, attributor: Attributor
) -> list[tuple[tuple[str, ...], dict[int, int]]]:
    """Buckets summed per shown key, the key with most values first."""
    cols = columns(by)
    rows: dict[tuple[str, ...], dict[int, int]] = {}
    for s in samples:
        key = _pick(key_labels(s.key, by, namespace, attributor), cols)
        buckets = rows.setdefault(key, {})
        for slot, n in s.buckets.items():
            buckets[slot] = buckets.get(slot, 0) + n
    return sorted(rows.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))


def unit_of(probe: ActiveProbe) -> str:
    """What a histogram's values are: nanoseconds for syscall latency, else the field."""
    spec = probe.assignment.spec
    if spec.syscall is not None and spec.syscall.latency:
        return "nsecs"
    return spec.output.value or "value"


def render_probe(probe: ActiveProbe, attributor: Attributor, *, top: int = DEFAULT_TOP) -> str:
    """One probe's current output as text (reads the program's maps)."""
    by, ns = probe.plan.by, probe.namespace
    kind = probe.plan.output_kind
    if kind == "count":
        rows = aggregate_counts(probe.read_counts(), by, ns, attributor)
        return count_table(probe.id, by, rows, top=top)
    if kind == "histogram":
        hists = aggregate_histograms(probe.read_histograms(), by, ns, attributor)
        return histogram_text(probe.id, by, hists, unit=unit_of(probe), top=top)
    c = probe.read_counters()
    return (
        f"{probe.id}: events (JSON lines), {c.matched - c.sampled_out} produced, "
        f"{c.rate_limited} rate-limited, {c.ring_full} lost to a full ring\n"
    )


def render_frame(
    probes: Sequence[ActiveProbe], attributor: Attributor, *, wall_ns: int, top: int = DEFAULT_TOP
) -> str:
    """Every probe's output under a timestamp line, as a refresh prints it."""
    parts = [f"--- {rfc3339(wall_ns)[:19]}Z ---\n"]
    parts += [render_probe(p, attributor, top=top) for p in probes]
    return "\n".join(parts)


def snapshot(probe: ActiveProbe, attributor: Attributor, *, wall_ns: int) -> dict[str, Any]:
    """One probe's counts or histograms as a JSON object (for `-o json`)."""
    by, ns = probe.plan.by, probe.namespace
    cols = columns(by)
    out: dict[str, Any] = {"time": rfc3339(wall_ns), "probe": probe.id}
    if probe.plan.output_kind == "count":
        rows = aggregate_counts(probe.read_counts(), by, ns, attributor)
        out["counts"] = [{**dict(zip(cols, k, strict=True)), "count": n} for k, n in rows]
    elif probe.plan.output_kind == "histogram":
        hists = aggregate_histograms(probe.read_histograms(), by, ns, attributor)
        out["unit"] = unit_of(probe)
        out["histograms"] = [
            {
                **dict(zip(cols, k, strict=True)),
                # Upper bound (exclusive) of each slot -> count, like the metrics' `le`.
                "buckets": {str(2 ** (s + 1)): n for s, n in sorted(b.items()) if n},
            }
            for k, b in hists
        ]
    else:
        c = probe.read_counters()
        out["events"] = {
            "produced": c.matched - c.sampled_out,
            "rateLimited": c.rate_limited,
            "ringFull": c.ring_full,
        }
    return out


async def run_console(
    probes: Callable[[], Sequence[ActiveProbe]],
    attributor: Attributor,
    hub: EventHub,
    *,
    output: OutputFormat,
    out: TextIO,
    stop: asyncio.Event,
    interval: float = 1.0,
    top: int = DEFAULT_TOP,
) -> None:
    """Print events as they come and every probe's output each `interval` until `stop`,
    then once more (the totals)."""

    def frame() -> None:
        now = time.time_ns()
        current = [p for p in probes() if output == "table" or p.plan.output_kind != "events"]
        if output == "table":
            out.write(render_frame(current, attributor, wall_ns=now, top=top))
        else:
            out.writelines(encode(snapshot(p, attributor, wall_ns=now)) for p in current)
        out.flush()

    # Subscribe before the first await: events of probes loaded already must not be missed.
    subscription = hub.subscribe(None)

    async def print_events() -> None:
        async with subscription as sub:
            async for chunk in sub:
                out.write(chunk.decode(errors="replace"))
                out.flush()

    printer = asyncio.create_task(print_events())
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if not stop.is_set():
                frame()
    finally:
        printer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await printer
        subscription.close()  # also when the printer was cancelled before it started
    frame()
