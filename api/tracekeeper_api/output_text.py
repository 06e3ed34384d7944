"""Text renderings of a probe's output, shared by the agent's standalone console and
`kubectl tracekeeper`: a table of the top counts, BCC-style log2 histograms, one line per
event, the per-node detail. Pure functions of values: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tracekeeper_api.durations import format_duration
from tracekeeper_api.output import GAP, RESUMED, ProbeNodes, ProbeTracepoints, ProbeValues
from tracekeeper_api.status import DebugSession, ProbeCostStatus

COLUMNS = ("pod", "container", "comm", "pid")
DEFAULT_TOP = 10
STARS = 40
"""Width of a histogram bar, as in BCC's tools."""


def columns(by: Sequence[str]) -> list[str]:
    """The key columns a probe shows, in a fixed order whatever the order of `by`."""
    return [c for c in COLUMNS if c in by]


def count_table(
    title: str,
    by: Sequence[str],
    rows: Sequence[tuple[tuple[str, ...], int]],
    *,
    top: int = DEFAULT_TOP,
) -> str:
    """A title line, then the `top` largest rows: key columns left-aligned, COUNT right."""
    cols = columns(by)
    shown = list(rows[:top])
    head = f"{title}: count by {', '.join(cols) or 'probe'}"
    if len(rows) > len(shown):
        head += f" (top {len(shown)} of {len(rows)})"
    table = [[c.upper() for c in cols] + ["COUNT"]]
    table += [[v or "-" for v in key] + [str(n)] for key, n in shown]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [head]
    for r in table:
        cells = [r[i].ljust(widths[i]) for i in range(len(cols))]
        cells.append(r[-1].rjust(widths[-1]))
        lines.append("  ".join(cells))
    if not shown:
        lines.append("(no hits yet)")
    return "\n".join(lines) + "\n"


def _stars(value: int, value_max: int, width: int) -> str:
    # BCC's _stars: proportional bar, at most `width` wide.
    n = min(width, int(width * value / value_max)) if value_max else 0
    return "*" * n


def log2_hist(buckets: Mapping[int, int], unit: str) -> str:
    """BCC's print_log2_hist for our slots: slot s holds [2**s, 2**(s+1)) and slot 0 holds
    0 and 1, i.e. BCC's index s + 1, so the rows read the same as BCC's tools."""
    nonzero = [s for s, n in buckets.items() if n > 0]
    if not nonzero:
        return ""
    top = max(nonzero)
    value_max = max(buckets.values())
    # BCC widens the columns when values pass 2**32.
    num, label, stars = (10, 19, STARS) if top + 1 <= 32 else (20, 29, STARS // 2)
    lines = [f"{' ' * (num - 5)}{unit:<{label}} : count     distribution"]
    for slot in range(top + 1):
        low, high = (0, 1) if slot == 0 else (1 << slot, (1 << (slot + 1)) - 1)
        n = buckets.get(slot, 0)
        bar = _stars(n, value_max, stars)
        lines.append(f"{low:>{num}} -> {high:<{num}} : {n:<8} |{bar:<{stars}}|")
    return "\n".join(lines) + "\n"


def histogram_text(
    title: str,
    by: Sequence[str],
    rows: Sequence[tuple[tuple[str, ...], Mapping[int, int]]],
    *,
    unit: str,
    top: int = DEFAULT_TOP,
) -> str:
    """A title line, then one log2 histogram per key (the `top` keys with most values)."""
    cols = columns(by)
    shown = list(rows[:top])
    head = f"{title}: histogram of {unit}"
    if cols:
        head += f" by {', '.join(cols)}"
    if len(rows) > len(shown):
        head += f" (top {len(shown)} of {len(rows)})"
    parts = [head + "\n"]
    for key, buckets in shown:
        if cols:
            parts.append(
                "\n" + ", ".join(f"{c} = {v or '-'}" for c, v in zip(cols, key, strict=True)) + "\n"
            )
        parts.append(log2_hist(buckets, unit))
    if not shown:
        parts.append("(no values yet)\n")
    return "".join(parts)


def values_text(values: ProbeValues, *, top: int = DEFAULT_TOP) -> str:
    """Merged values as the standalone console prints a probe (table or histograms)."""
    cols = columns(values.by)
    title = values.probe
    if values.nodes:
        title += f" ({len(values.nodes)} node{'s' if len(values.nodes) != 1 else ''})"
    if values.kind == "count":
        rows = [(tuple(r.key.get(c, "") for c in cols), r.count) for r in values.counts]
        return count_table(title, values.by, rows, top=top)
    if values.kind == "histogram":
        hrows = [(tuple(r.key.get(c, "") for c in cols), r.buckets) for r in values.histograms]
        return histogram_text(title, values.by, hrows, unit=values.unit or "value", top=top)
    e = values.events
    produced, d = (e.produced, e.drops) if e is not None else (0, None)
    return (
        f"{title}: events, {produced} produced, {d.rate_limited if d else 0} rate-limited, "
        f"{d.ring_full if d else 0} lost to a full ring, {d.backlog if d else 0} to slow "
        "readers (kubectl tracekeeper tail shows them)\n"
    )


BASE_EVENT_KEYS = frozenset(
    {"time", "probe", "namespace", "pod", "container", "pid", "tid", "comm", "cgroupId", "node"}
)


def record_line(record: Mapping[str, Any]) -> str:
    """One readable line: an event's time, node, pod, comm and captured fields; a gap or
    resumed record says so."""
    kind = record.get("type")
    if kind == GAP:
        drops = record.get("drops") or {}
        lost = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()) if v) or "none reported"
        return (
            f"{record.get('time', '')}  node={record.get('node', '')}  GAP: "
            f"{record.get('reason', '')}; {record.get('received', 0)} events received from "
            f"it so far; drops on the node: {lost}"
        )
    if kind == RESUMED:
        return f"{record.get('time', '')}  node={record.get('node', '')}  RESUMED"
    fields = "  ".join(f"{k}={v}" for k, v in record.items() if k not in BASE_EVENT_KEYS)
    line = (
        f"{record.get('time', '')}  node={record.get('node', '')}  pod={record.get('pod') or '-'}"
        f"  comm={record.get('comm', '')}  pid={record.get('pid', '')}"
    )
    return f"{line}  {fields}" if fields else line


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


NODE_COLUMNS = ("NODE", "STATE", "REASON", "PROGRAMS", "FILTER ENTRIES", "PODS", "DROPS",
                "NS/CALL", "KERNEL MEM", "KERNEL")  # fmt: skip


def nodes_text(nodes: ProbeNodes) -> str:
    """The per-node table, then each failing node's full message."""
    if not nodes.nodes:
        return "NODES: none runs this probe\n"
    rows: list[list[str]] = [list(NODE_COLUMNS)]
    for n in nodes.nodes:
        d, c = n.drops, n.cost
        rows.append(
            [
                n.node,
                n.state,
                n.reason,
                ",".join(str(i) for i in n.program_ids) or "-",
                str(n.filter_entries),
                str(n.pods),
                f"{d.rate_limited}/{d.ring_full}/{d.backlog}",
                _ns(c.ns_per_run) if c is not None else "-",
                bytes_text(c.kernel_memory_bytes) if c is not None else "-",
                n.kernel.release if n.kernel is not None and n.kernel.release else "-",
            ]
        )
    lines = _table(rows)
    lines.append("(DROPS: rate limit / ring full / backlog)")
    for n in nodes.nodes:
        if n.message:
            lines.append(f"{n.node}: {n.message}")
    return "\n".join(lines) + "\n"


def tracepoints_text(listing: ProbeTracepoints) -> str:
    """Each tracepoint matching, and which of the probe's nodes have it."""
    nodes = sorted(listing.nodes)
    have: dict[str, list[str]] = {}
    for node in nodes:
        for name in listing.nodes[node].names:
            have.setdefault(name, []).append(node)
    rows = [["TRACEPOINT", "NODES"]]
    for name in sorted(have):
        rows.append([name, "all" if have[name] == nodes else ",".join(have[name])])
    lines = _table(rows) if have else [f"no tracepoint matches {listing.match!r} on any node"]
    for node in nodes:
        t = listing.nodes[node]
        if t.truncated:
            lines.append(f"{node}: {t.total} match, the first {len(t.names)} listed")
    for node, why in sorted(listing.unavailable.items()):
        lines.append(f"{node}: not asked: {why}")
    return "\n".join(lines) + "\n"


def _ns(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def bytes_text(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def cost_text(cost: ProbeCostStatus) -> str:
    """status.cost in one line."""
    parts = [
        f"{_ns(cost.ns_per_call)} ns per call" if cost.ns_per_call is not None
        else "ns per call unknown (no run yet, or run-time statistics off)",
        f"{bytes_text(cost.kernel_memory_bytes)} kernel memory",
    ]  # fmt: skip
    if cost.matched_per_second is not None:
        parts.append(f"{cost.matched_per_second:g} matched/s")
    if cost.events_per_second:
        parts.append(f"{cost.events_per_second:g} events/s")
    where = f"{cost.nodes} node{'s' if cost.nodes != 1 else ''}"
    return f"COST: {', '.join(parts)} (over {where}, read at {cost.updated_at})\n"


def conditions_text(conditions: Sequence[Mapping[str, Any]]) -> str:
    """A TraceProbe's status.conditions as a table."""
    if not conditions:
        return "CONDITIONS: none yet (the operator has not reported)\n"
    rows = [["TYPE", "STATUS", "REASON", "MESSAGE"]]
    rows += [
        [
            str(c.get("type", "")),
            str(c.get("status", "")),
            str(c.get("reason", "")),
            str(c.get("message", "")),
        ]
        for c in conditions
    ]
    return "\n".join(_table(rows)) + "\n"


def session_text(session: DebugSession, now: datetime) -> str:
    """A debug session in one or a few lines: how long is left, or what it counted."""
    if session.final is not None or (
        session.expires_at is not None and _at(session.expires_at) <= now
    ):
        text = f"SESSION: {session.duration}, ended at {session.expires_at}\n"
        final = session.final
        if final is not None:
            top = ", ".join(
                f"{' '.join(f'{k}={v}' for k, v in sorted(r.key.items())) or 'all'} {r.count}"
                for r in final.top
            )
            text += f"  final values (read at {final.read_at}): total {final.total}"
            text += f"; top: {top}\n" if top else "\n"
            if final.unread:
                text += f"  not read (agent unreachable): {', '.join(final.unread)}\n"
        return text
    if session.started_at is None or session.expires_at is None:
        return f"SESSION: {session.duration}, starts when the probe is first Ready\n"
    left = format_duration(max(0.0, (_at(session.expires_at) - now).total_seconds()))
    return (
        f"SESSION: {session.duration} from {session.started_at}: {left} left "
        f"(unloaded at {session.expires_at})\n"
    )


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
