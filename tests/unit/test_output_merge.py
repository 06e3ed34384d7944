"""The output API's merging across nodes, the plugin's renderings, and its error sentences."""

from __future__ import annotations

from kubectl_tracekeeper.output_client import Target, explain
from tracekeeper_api.output import (
    CountRow,
    EventTotals,
    HistogramRow,
    ProbeNodes,
    ProbeValues,
    gap_record,
    merge_values,
    node_detail,
    tag_event,
)
from tracekeeper_api.output_text import nodes_text, record_line, values_text
from tracekeeper_api.protocol import EventDrops, ProbeOutcome


def counts(probe: str, rows: dict[str, int]) -> ProbeValues:
    return ProbeValues(
        probe=probe, kind="count", by=["pod"],
        counts=[CountRow(key={"pod": p}, count=n) for p, n in rows.items()],
    )  # fmt: skip


def test_counts_of_equal_keys_add_up_largest_first() -> None:
    merged = merge_values(
        "a/p", {"n2": counts("a/p", {"web-1": 5, "x": 1}), "n1": counts("a/p", {"x": 9})}
    )
    assert [(r.key, r.count) for r in merged.counts] == [({"pod": "x"}, 10), ({"pod": "web-1"}, 5)]
    assert merged.nodes == ["n1", "n2"]


def test_histogram_buckets_and_event_totals_add_up() -> None:
    def hist(buckets: dict[int, int]) -> ProbeValues:
        row = HistogramRow(key={"pod": "w"}, buckets=buckets)
        return ProbeValues(probe="a/h", kind="histogram", by=["pod"], unit="nsecs",
                           histograms=[row])  # fmt: skip

    merged = merge_values("a/h", {"n1": hist({3: 1, 4: 2}), "n2": hist({4: 5})})
    assert merged.histograms[0].buckets == {3: 1, 4: 7} and merged.unit == "nsecs"

    def ev(n: int) -> ProbeValues:
        drops = EventDrops(rate_limited=n, ring_full=1, backlog=0)
        return ProbeValues(probe="a/e", kind="events", events=EventTotals(produced=n, drops=drops))

    totals = merge_values("a/e", {"n1": ev(3), "n2": ev(4)}).events
    assert totals is not None and totals.produced == 7 and totals.drops.ring_full == 2


def test_no_node_merges_to_nothing() -> None:
    assert merge_values("a/p", {}).counts == []


def test_events_get_their_node_and_a_captured_type_field_moves_aside() -> None:
    tagged = tag_event({"time": "t", "probe": "a/p", "type": 3}, "n1")
    assert tagged == {"time": "t", "probe": "a/p", "field_type": 3, "node": "n1"}
    assert "type" not in tagged


def test_text_renderings() -> None:
    line = record_line({"time": "T", "node": "n1", "pod": "web-0", "comm": "cat", "pid": 7,
                        "probe": "a/p", "filename": "/bin/cat"})  # fmt: skip
    assert line == "T  node=n1  pod=web-0  comm=cat  pid=7  filename=/bin/cat"
    gap = gap_record("a/p", "n2", "T", "agent stream failed", 4, EventDrops(ring_full=2))
    assert record_line(gap) == (
        "T  node=n2  GAP: agent stream failed; 4 events received from it so far; "
        "drops on the node: ringFull 2"
    )
    table = values_text(merge_values("a/p", {"n1": counts("a/p", {"web-0": 12, "web-1": 3})}))
    assert table == "a/p (1 node): count by pod\nPOD    COUNT\nweb-0     12\nweb-1      3\n"
    outcome = ProbeOutcome(id="a/p", spec_hash="h", state="Failed", reason="AttachFailed",
                           message="no symbol foo")  # fmt: skip
    details = [node_detail("n1", outcome, None), node_detail("n2", None, "agent unreachable")]
    nodes = ProbeNodes(probe="a/p", nodes=details)
    text = nodes_text(nodes)
    assert "n1    Failed       AttachFailed" in text and "n1: no symbol foo" in text
    assert "n2: agent unreachable" in text and "Unreachable" in text


def test_plugin_error_sentences() -> None:
    t = Target("team-a", "web")
    body = (
        b'{"kind":"Status","message":"User \\"bob\\" cannot get resource \\"traceprobes/values\\""}'
    )
    assert 'forbidden: User "bob" cannot get resource "traceprobes/values"' in str(
        explain(403, body, t, "GET")
    )
    found = b'{"kind":"Status","reason":"NotFound","details":{"kind":"traceprobes"}}'
    assert (
        str(explain(404, found, t, "GET")) == "traceprobe team-a/web not found (namespace team-a)"
    )
    assert "is not installed" in str(explain(404, b"404 page not found", t, "GET"))
    assert "unavailable" in str(explain(503, b"", t, "GET"))
    assert "is not Ready: runs on no node" in str(
        explain(409, b'{"message":"runs on no node"}', t, "GET")
    )
