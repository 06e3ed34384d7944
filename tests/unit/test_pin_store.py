"""PinStore's bookkeeping over directories (the pins themselves need bpffs: kernel tier)."""

from __future__ import annotations

from pathlib import Path

from tracekeeper_agent.bpf.pinned_programs import PinStore


def test_leftovers_are_taken_by_source_hash_and_the_rest_dropped(tmp_path: Path) -> None:
    for name in ("aa-0", "aa-1", "bb-0", "not-a-program", "identity"):
        (tmp_path / name).mkdir()
    (tmp_path / "bb-0" / "link-0").write_text("")  # as a pin would be
    store = PinStore(tmp_path)
    assert store.leftovers == 3
    first, second = store.take("aa"), store.take("aa")
    assert first is not None and second is not None and first.directory != second.directory
    assert store.take("aa") is None and store.take("cc") is None
    # New pins never reuse a leftover's directory, taken or not.
    assert store.new("aa").directory.name == "aa-2"
    assert store.new("bb").directory.name == "bb-1"
    assert store.drop_leftovers() == 1
    assert not (tmp_path / "bb-0").exists()
    assert {p.name for p in tmp_path.iterdir()} == {
        "aa-0", "aa-1", "aa-2", "bb-1", "not-a-program", "identity"
    }  # fmt: skip
    assert store.drop_leftovers() == 0
