"""Standalone-mode text: golden tables and log2 histograms, and the refresh loop."""

from __future__ import annotations

import asyncio
import io
import json

from tests.unit.output_fakes import FakeAttributor, FakeProgram, make_probe, raw_event, until
from tracekeeper_agent.outputs.console import (
    aggregate_counts,
    aggregate_histograms,
    render_frame,
    run_console,
    snapshot,
)
from tracekeeper_agent.outputs.events import EventHub
from tracekeeper_agent.ports import (
    CountSample,
    HistogramSample,
    KernelCounters,
    PodIdentity,
    SampleKey,
)
from tracekeeper_api.output_text import count_table, histogram_text, log2_hist

PODS = FakeAttributor(
    {
        11: PodIdentity("team-a", "web-0", "app"),
        12: PodIdentity("team-a", "web-0", "sidecar"),
        13: PodIdentity("team-a", "web-1", "app"),
    }
)

COUNTS = [
    CountSample(SampleKey(cgroup_id=11, comm="nginx"), 1234),
    CountSample(SampleKey(cgroup_id=12, comm="nginx"), 6),
    CountSample(SampleKey(cgroup_id=13, comm="nginx"), 77),
    CountSample(SampleKey(cgroup_id=99, comm="cron"), 3),
    CountSample(SampleKey(cgroup_id=11, comm="sh"), 2),
]

TABLE = """\
team-a/opens: count by pod, comm (top 3 of 4)
POD    COMM   COUNT
web-0  nginx   1240
web-1  nginx     77
-      cron       3
"""

HISTOGRAM = """\
team-a/read-latency: histogram of nsecs by pod

pod = web-0
     nsecs               : count     distribution
         0 -> 1          : 1        |**                                      |
         2 -> 3          : 0        |                                        |
         4 -> 7          : 0        |                                        |
         8 -> 15         : 4        |********                                |
        16 -> 31         : 0        |                                        |
        32 -> 63         : 20       |****************************************|
        64 -> 127        : 9        |******************                      |
       128 -> 255        : 0        |                                        |
       256 -> 511        : 1        |**                                      |

pod = web-1
     nsecs               : count     distribution
         0 -> 1          : 0        |                                        |
         2 -> 3          : 3        |****************************************|
"""


def test_count_table_golden() -> None:
    rows = aggregate_counts(COUNTS, ("comm", "pod"), "team-a", PODS)
    assert count_table("team-a/opens", ("comm", "pod"), rows, top=3) == TABLE


def test_count_table_without_keys_and_empty() -> None:
    rows = aggregate_counts([CountSample(SampleKey(), 5)], (), "team-a", PODS)
    assert count_table("team-a/all", (), rows) == "team-a/all: count by probe\nCOUNT\n    5\n"
    assert count_table("team-a/pids", ("pid",), []) == (
        "team-a/pids: count by pid\nPID  COUNT\n(no hits yet)\n"
    )


def test_histogram_golden() -> None:
    samples = [
        HistogramSample(SampleKey(cgroup_id=11), {0: 1, 3: 4, 5: 20}),
        HistogramSample(SampleKey(cgroup_id=12), {6: 9, 8: 1}),  # web-0 too: summed
        HistogramSample(SampleKey(cgroup_id=13), {1: 3}),
    ]
    rows = aggregate_histograms(samples, ("pod",), "team-a", PODS)
    text = histogram_text("team-a/read-latency", ("pod",), rows, unit="nsecs")
    assert text == HISTOGRAM


def test_log2_hist_widens_past_2_to_the_32() -> None:
    text = log2_hist({33: 2, 0: 1}, "bytes")
    lines = text.splitlines()
    assert lines[0] == "               bytes                         : count     distribution"
    assert lines[1] == f"{0:>20} -> {1:<20} : 1        |**********          |"
    assert lines[-1] == f"{2**33:>20} -> {2**34 - 1:<20} : 2        |********************|"
    assert log2_hist({}, "nsecs") == ""


def test_frame_and_json_snapshot_read_the_programs() -> None:
    probe = make_probe("team-a/opens", FakeProgram(counts=COUNTS), by=("pod",))
    frame = render_frame([probe], PODS, wall_ns=1_700_000_000_000_000_000, top=2)
    assert frame.startswith("--- 2023-11-14T22:13:20Z ---\n")
    assert (
        "team-a/opens: count by pod (top 2 of 3)\nPOD    COUNT\nweb-0   1242\nweb-1     77\n"
        in frame
    )
    lat = make_probe(
        "team-a/lat",
        FakeProgram(histograms=[HistogramSample(SampleKey(cgroup_id=13), {4: 2})]),
        kind="histogram",
    )
    assert snapshot(lat, PODS, wall_ns=0) == {
        "time": "1970-01-01T00:00:00.000000000Z",
        "probe": "team-a/lat",
        "unit": "nsecs",
        "histograms": [{"pod": "web-1", "buckets": {"32": 2}}],
    }


async def test_run_console_prints_events_and_frames_until_stopped() -> None:
    events_program = FakeProgram(counters=KernelCounters())
    counter = make_probe("team-a/opens", FakeProgram(counts=COUNTS[:1]), by=("pod",))
    execs = make_probe("team-a/execs", events_program, kind="events")
    hub = EventHub(PODS)
    await hub.sync([execs])
    out = io.StringIO()
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_console(
            lambda: [counter, execs], PODS, hub, output="json", out=out, stop=stop, interval=0.05
        )
    )
    await asyncio.sleep(0)  # the console subscribes in its first step; it gets what is read after
    events_program.emit([raw_event(n, cgroup_id=11) for n in range(3)])
    await until(lambda: out.getvalue().count('"seq"') == 3)
    await until(lambda: '"counts"' in out.getvalue())
    stop.set()
    await task
    await hub.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["seq"] for e in lines if "seq" in e] == [0, 1, 2]
    assert all(e["pod"] == "web-0" for e in lines if "seq" in e)
    snapshots = [e for e in lines if "counts" in e]
    assert snapshots[-1]["counts"] == [{"pod": "web-0", "count": 1234}]
    # In JSON mode events probes appear as their events only, not as snapshots.
    assert {e["probe"] for e in snapshots} == {"team-a/opens"}
