"""The save/restore contract (pyvmm/core/snapshot.py): every part listed as
stateful declares save_state() and restore_state(), so none can be left out
when snapshots are written; those not written yet refuse loudly."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from pyvmm.core.snapshot import STATEFUL, SnapshotError, check_version, versioned

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


def test_versions():
    state = versioned(2, armed=False)
    assert state == {"version": 2, "armed": False}
    assert check_version(state, "Part", 2) == 2
    assert check_version({"version": 1}, "Part", 2) == 1
    for bad in ({"version": 3}, {"version": 0}, {}, {"version": "1"}, {"version": True}, None):
        with pytest.raises(SnapshotError):
            check_version(bad, "Part", 2)
