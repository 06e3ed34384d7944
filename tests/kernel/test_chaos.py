"""Issue 18's chaos on the agent, with real BPF programs: each scenario of
reliability.agent_chaos (SIGKILL while tracing, mid-compile and mid-push, a full state
directory, the cgroup tree removed under a loaded probe) must hold its checks. Resume times
are printed, never asserted (`make reliability` compares them with the 2 s goal)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from reliability import agent_chaos
from reliability.agent_chaos import Figures

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("scenario", agent_chaos.ALL, ids=lambda s: s.__name__)
def test_the_agent_survives(
    scenario: Callable[[Path, Path], Figures], tmp_path: Path, cgroup_root: Path
) -> None:
    figures = scenario(tmp_path, cgroup_root)
    print(f"\n{figures}")
    assert figures.leaked == 0
