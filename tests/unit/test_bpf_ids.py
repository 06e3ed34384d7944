from __future__ import annotations

from pathlib import Path

import pytest

from tracekeeper_agent.host.bpf_ids import NotABpfObject, prog_id

PROG_FDINFO = """\
pos:\t0
flags:\t02000002
mnt_id:\t15
ino:\t1057
prog_type:\t5
prog_jited:\t1
prog_tag:\t3b185187f1855c4c
memlock:\t4096
prog_id:\t1234
run_time_ns:\t0
"""


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    fdinfo = tmp_path / "self" / "fdinfo"
    fdinfo.mkdir(parents=True)
    (fdinfo / "7").write_text(PROG_FDINFO)
    (fdinfo / "9").write_text("pos:\t0\nflags:\t02\nmnt_id:\t29\nino:\t5\n")
    return tmp_path


def test_ids(proc: Path) -> None:
    assert prog_id(7, proc=proc) == 1234


def test_not_bpf(proc: Path) -> None:
    with pytest.raises(NotABpfObject, match="prog_id"):
        prog_id(9, proc=proc)
    with pytest.raises(NotABpfObject, match="not open"):
        prog_id(100, proc=proc)
