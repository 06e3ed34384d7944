"""tracekeeper-agent's pure parts: durations, listen addresses, standalone files -> state."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracekeeper_agent.service.cli import (
    EXIT_USAGE,
    build_parser,
    check_listeners,
    main,
    parse_duration,
    parse_listen,
)
from tracekeeper_agent.service.standalone import StandaloneError, outcome_lines, standalone_state
from tracekeeper_api.protocol import NodeReport, ProbeOutcome
from tracekeeper_api.resources import load_documents

PROBE = """
apiVersion: tracekeeper.dev/v1alpha1
kind: TraceProbe
metadata: {name: opens}
spec:
  tracepoint: syscalls:sys_enter_openat
  %s
"""

FILTER = """
---
apiVersion: tracekeeper.dev/v1alpha1
kind: TraceFilter
metadata: {name: mine}
spec:
  %s
"""


def state_of(text: str) -> object:
    return standalone_state(list(load_documents(text, "f.yaml")), node="host", source="f.yaml")


def test_parse_duration() -> None:
    assert parse_duration("10s") == 10
    assert parse_duration("1.5m") == 90
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2h") == 7200
    assert parse_duration("3") == 3
    for bad in ("0s", "-1s", "ten", "5d", ""):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9440") == ("0.0.0.0", 9440)
    assert parse_listen("[::]:9440") == ("::", 9440)
    assert parse_listen(":9440") == ("0.0.0.0", 9440)
    for bad in ("9440", "host:", "host:99999", "host:x"):
        with pytest.raises(ValueError, match="host:port"):
            parse_listen(bad)


def test_metrics_listener_is_off_unless_given_and_needs_its_own_port() -> None:
    assert build_parser().parse_args(["serve"]).metrics_listen is None
    check_listeners(("0.0.0.0", 9440), ("0.0.0.0", 9441))
    check_listeners(("10.0.0.1", 9440), ("10.0.0.2", 9440))  # two addresses, one port each
    for api, metrics in [
        (("0.0.0.0", 9440), ("0.0.0.0", 9440)),
        (("0.0.0.0", 9440), ("127.0.0.1", 9440)),
        (("127.0.0.1", 9440), ("::", 9440)),
    ]:
        with pytest.raises(ValueError, match="takes the API's port"):
            check_listeners(api, metrics)


@pytest.mark.parametrize(
    ("metrics_listen", "message"),
    [("9441", "not host:port"), ("0.0.0.0:9440", "takes the API's port")],
)
def test_serve_refuses_a_bad_metrics_listener_before_starting(
    metrics_listen: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--node-name", "n1", "--listen", "0.0.0.0:9440"]
    assert main([*argv, "--metrics-listen", metrics_listen]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_inline_host_filter_becomes_targets() -> None:
    state = standalone_state(
        list(
            load_documents(
                PROBE % "filter: {pids: [42], followChildren: true, processNames: [nginx]}",
                "f.yaml",
            )
        ),
        node="host",
        source="f.yaml",
    )
    (probe,) = state.probes
    assert probe.id == "default/opens"
    assert probe.targets.pids == [42] and probe.targets.follow_children
    assert probe.targets.process_names == ["nginx"]
    assert probe.allow_program and state.node == "host" and state.revision == 1


def test_filter_ref_is_resolved_within_the_file() -> None:
    text = PROBE % "filterRef: mine" + FILTER % "{hostWide: true, processNames: [cat]}"
    state = standalone_state(list(load_documents(text, "f.yaml")), node="h", source="f.yaml")
    assert state.probes[0].targets.host_wide
    assert state.probes[0].targets.process_names == ["cat"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("filterRef: other", "spec.filterRef 'other' names no TraceFilter of namespace default"),
        ("filter: {podSelector: {}}", "spec.filter.podSelector selects Kubernetes pods"),
        ("filter: {containers: [app]}", "spec.filter.containers selects Kubernetes pods"),
        ("filter: {processNames: [cat]}", "spec.filter selects no host process"),
        ("output: {kind: count}", "no filter or filterRef"),
    ],
)
def test_what_standalone_mode_refuses(body: str, message: str) -> None:
    with pytest.raises(StandaloneError, match="TraceProbe default/opens") as info:
        state_of(PROBE % body + FILTER % "{pids: [1]}")
    assert message in str(info.value)


def test_a_referenced_filter_is_named_in_errors() -> None:
    with pytest.raises(StandaloneError, match=r"TraceFilter default/mine: spec.podSelector"):
        state_of(PROBE % "filterRef: mine" + FILTER % "{podSelector: {}}")


def test_a_file_without_probes_is_refused() -> None:
    with pytest.raises(StandaloneError, match="no TraceProbe"):
        state_of(FILTER % "{pids: [1]}")


def test_names_that_are_no_probe_id_are_refused() -> None:
    text = (PROBE % "filter: {pids: [1]}").replace("name: opens", "name: Opens")
    with pytest.raises(StandaloneError, match=r"probes\.0\.id"):
        state_of(text)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: Pod\n", "kind must be TraceProbe or TraceFilter"),
        ("spec: [unclosed\n", "while parsing"),
        (PROBE % "filter: {podSelector: {}}", "podSelector"),
    ],
)
def test_run_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "probe.yaml"
    path.write_text(content)
    assert main(["run", "-f", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("tracekeeper-agent: ") and message in err
    assert "Traceback" not in err


def test_run_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-f", str(tmp_path / "absent.yaml")]) == EXIT_USAGE
    assert "No such file" in capsys.readouterr().err


def test_outcome_lines() -> None:
    report = NodeReport(
        node="h",
        revision=1,
        boot_id="b",
        probes=[
            ProbeOutcome(
                id="default/a",
                spec_hash="x",
                state="Loaded",
                reason="Loaded",
                program_ids=[7, 8],
                filter_entries=2,
            ),
            ProbeOutcome(
                id="default/b",
                spec_hash="x",
                state="Unsupported",
                reason="Unsupported",
                message="no kprobes",
            ),
        ],
    )
    assert outcome_lines(report) == [
        "default/a: Loaded (program ids 7, 8; 2 filter entries)",
        "default/b: Unsupported (Unsupported: no kprobes)",
    ]


RAW_PROGRAM = """
apiVersion: tracekeeper.dev/v1alpha1
kind: TraceProbe
metadata: {name: raw}
spec:
  program:
    source: |
      TRACEPOINT_PROBE(sched, sched_process_exec) { tk_count(tk_admit()); return 0; }
  filter: {hostWide: true}
  output: {kind: count}
"""


def test_render_prints_the_c_a_probe_compiles_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "raw.yaml"
    path.write_text(RAW_PROGRAM)
    assert main(["render", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("/* tracekeeper program: program of default/raw */\n")
    assert "#define TK_OUTPUT_COUNT 1\n" in out  # whom it traces is map contents
    assert "tk_admit(void)" in out  # the prelude
    assert out.rstrip().endswith(
        "TRACEPOINT_PROBE(sched, sched_process_exec) { tk_count(tk_admit()); return 0; }"
    )
