"""QuietRelease: the compiler's memory is released once, after a burst of compiles."""

from __future__ import annotations

import threading

from tracekeeper_agent.bpf.compiler_memory import QuietRelease


def test_the_release_waits_for_compiles_to_stop() -> None:
    fired = threading.Event()
    calls: list[int] = []

    def release() -> None:
        calls.append(1)
        fired.set()

    quiet = QuietRelease(release, quiet=1.0)
    for _ in range(5):  # a burst of compiles: one release after the last
        quiet.compiled()
    assert fired.wait(5)
    quiet.close()
    assert calls == [1]


def test_closing_cancels_a_pending_release() -> None:
    calls: list[int] = []
    quiet = QuietRelease(lambda: calls.append(1), quiet=60)
    quiet.compiled()
    quiet.close()
    assert calls == []
