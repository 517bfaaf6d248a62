"""The save/restore contract (pyvmm/core/snapshot.py): every part listed as
stateful declares save_state() and restore_state(), so none can be left out
when snapshots are written; those not written yet refuse loudly."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from pyvmm.core.snapshot import STATEFUL, SavesNoStateYet, SnapshotError, Stateful, check_version, versioned

ARCHITECTURE = Path(__file__).resolve().parents[3] / "docs" / "ARCHITECTURE.md"


def stateful_class(entry: str) -> type:
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("entry", STATEFUL)
def test_every_stateful_part_declares_both_methods(entry):
    cls = stateful_class(entry)
    for method in ("save_state", "restore_state"):
        assert callable(getattr(cls, method, None)), f"{entry} has no {method}()"
    assert list(inspect.signature(cls.save_state).parameters) == ["self"]
    assert list(inspect.signature(cls.restore_state).parameters) == ["self", "state"]


@pytest.mark.parametrize("entry", STATEFUL)
def test_every_stateful_part_is_in_the_architecture_document(entry):
    assert f"`{entry.split(':')[1]}`" in ARCHITECTURE.read_text(), f"docs/ARCHITECTURE.md does not list {entry}"


def test_parts_not_written_yet_refuse():
    class Part(SavesNoStateYet):
        pass

    part = Part()
    assert isinstance(part, Stateful)
    with pytest.raises(SnapshotError, match="Part cannot save its state yet"):
        part.save_state()
    with pytest.raises(SnapshotError, match="Part cannot restore"):
        part.restore_state({"version": 1})


def test_written_ones_are_not_marked_as_waiting():
    written = [entry for entry in STATEFUL if not issubclass(stateful_class(entry), SavesNoStateYet)]
    assert "pyvmm.xen.hv.timers:UserTimer" in written
    assert [entry for entry in STATEFUL if entry.startswith("pyvmm.xen.")] == \
        [entry for entry in written if entry.startswith("pyvmm.xen.")]  # every Xen part is written


def test_versions():
    state = versioned(2, armed=False)
    assert state == {"version": 2, "armed": False}
    assert check_version(state, "Part", 2) == 2
    assert check_version({"version": 1}, "Part", 2) == 1
    for bad in ({"version": 3}, {"version": 0}, {}, {"version": "1"}, {"version": True}, None):
        with pytest.raises(SnapshotError):
            check_version(bad, "Part", 2)
