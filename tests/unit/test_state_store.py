"""The persisted NodeState: atomic replacement, private file, unreadable files set aside."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.unit.agent_fakes import node_state, probe
from tracekeeper_agent.reconcile.state_store import STATE_FILE, StateStore
from tracekeeper_api.protocol import Persistence


def test_nothing_persisted_yet(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "absent").load() is None


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    state = node_state(3, probe(), probe("b", suspend=True))
    store.save(state)
    assert StateStore(tmp_path / "state").load() == state


def test_file_and_directory_are_private(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.save(node_state(1, probe()))
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700


def test_save_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(node_state(1, probe()))
    inode = os.stat(store.path).st_ino
    store.save(node_state(2, probe("b")))
    loaded = store.load()
    assert loaded is not None and loaded.revision == 2
    assert os.stat(store.path).st_ino != inode  # a new file renamed over, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_unreadable_state_is_set_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text('{"node": "n", "revision": -1}')
    assert store.load() is None
    assert not store.path.exists()
    assert (tmp_path / f"{STATE_FILE}.invalid").exists()
    store.path.write_text("{not json")
    assert store.load() is None


def test_failed_write_keeps_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    store.save(node_state(1, probe()))

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", broken_fsync)
        with pytest.raises(OSError, match="No space"):
            store.save(node_state(2, probe("b")))
    loaded = store.load()
    assert loaded is not None and loaded.revision == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    assert store.persisted().revision == 1
    assert store.persisted().error == "revision 2 not saved: [Errno 28] No space left on device"
    store.save(node_state(2, probe("b")))  # room again
    assert store.persisted() == Persistence(revision=2)


def test_the_revision_read_is_what_the_file_holds(tmp_path: Path) -> None:
    StateStore(tmp_path).save(node_state(7, probe()))
    store = StateStore(tmp_path)
    assert store.persisted().revision == 0
    store.load()
    assert store.persisted() == Persistence(revision=7) and store.holds(node_state(7))
