"""The snapshot file (pyvmm/core/snapfile.py): what is written is read back,
RAM sparse and mapped copy-on-write, and every damaged file is refused in
one line that names it."""

from __future__ import annotations

import json
import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.core import snapfile
from pyvmm.core.memory import GuestMemory
from pyvmm.core.snapfile import SnapshotFileError, nonzero_runs, open_snapshot, write_snapshot
from pyvmm.core.snapshot import SnapshotError

PAGE = mmap.PAGESIZE
MiB = 1 << 20


def memory_with(pages: dict[int, bytes], ranges=((0, 4 * MiB), (8 * MiB, 2 * MiB))) -> GuestMemory:
    memory = GuestMemory(list(ranges))
    for gpa, data in pages.items():
        memory.write(gpa, data)
    return memory


def write(path, memory, header=None, state=None) -> snapfile.Written:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        return write_snapshot(fd, header or {"pyvmm": "test"}, state or {"version": 1, "parts": {}}, memory)
    finally:
        os.close(fd)


@pytest.fixture
def snapshot(tmp_path):
    memory = memory_with({0x1000: b"first page", 3 * MiB + 5: b"x" * 9000, 9 * MiB: b"\xff" * PAGE})
    path = tmp_path / "vm.snap"
    written = write(path, memory, {"pyvmm": "test", "name": "vm"}, {"version": 1, "parts": {"a": {"b": [1, 2]}}})
    return path, memory, written


def test_what_is_written_is_read_back(snapshot):
    path, memory, written = snapshot
    with open_snapshot(path) as file:
        assert file.header["name"] == "vm" and file.header["format"] == snapfile.FORMAT_VERSION
        assert file.state() == {"version": 1, "parts": {"a": {"b": [1, 2]}}}
        assert [(gpa, size) for gpa, size, _ in file.regions] == [(0, 4 * MiB), (8 * MiB, 2 * MiB)]
        assert all(offset % PAGE == 0 for _, _, offset in file.regions)
        restored = file.map_memory()
    for region, again in zip(memory.regions, restored.regions):
        assert bytes(again.mapping) == bytes(region.mapping)
    assert written.file_length == os.path.getsize(path)


def test_zero_pages_are_holes(snapshot):
    path, _, written = snapshot
    # "first page", two pages of x's crossing a page boundary (three pages), one page of 0xff
    assert written.data_bytes == 5 * PAGE
    assert os.stat(path).st_blocks * 512 < 64 * 1024 + written.state_bytes + written.data_bytes


def test_restored_memory_is_copy_on_write_and_shareable(snapshot):
    path, _, _ = snapshot
    with open_snapshot(path) as one, open_snapshot(path) as two:
        first, second = one.map_memory(), two.map_memory()
    first.write(0x1000, b"changed")
    assert first.read(0x1000, 10) == b"changedage"
    assert second.read(0x1000, 10) == b"first page"
    with open_snapshot(path) as again:
        assert again.map_memory().read(0x1000, 10) == b"first page"  # the file never changes


def test_only_an_empty_regular_file_is_written(tmp_path):
    path = tmp_path / "used"
    path.write_bytes(b"old bytes would show through the holes")
    fd = os.open(path, os.O_RDWR)
    with pytest.raises(SnapshotError, match="must be empty"):
        write_snapshot(fd, {}, {}, memory_with({}))
    os.close(fd)
    read_end, write_end = os.pipe()
    with pytest.raises(SnapshotError, match="regular file"):
        write_snapshot(write_end, {}, {}, memory_with({}))
    os.close(read_end)
    os.close(write_end)


def refusal(path) -> str:
    with pytest.raises(SnapshotFileError) as error:
        open_snapshot(path).state()
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def patch(path, offset, data):
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(data)


def test_a_truncated_file_is_refused(snapshot):
    path, _, written = snapshot
    os.truncate(path, written.file_length - 4096)
    assert "truncated" in refusal(path)
    os.truncate(path, 50)
    assert "not a pyvmm snapshot" in refusal(path)


def test_bytes_after_the_end_are_refused(snapshot):
    path, _, written = snapshot
    os.truncate(path, written.file_length + 1)
    assert "after its end" in refusal(path)


def test_an_unfinished_or_foreign_file_is_refused(snapshot, tmp_path):
    path, _, _ = snapshot
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert "empty" in refusal(empty)
    patch(path, 0, bytes(snapfile.FIXED_SIZE))  # the header is written last: a crash leaves none
    assert "incomplete" in refusal(path)
    other = tmp_path / "other"
    other.write_bytes(b"\x7fELF" + bytes(200))
    assert refusal(other).endswith("not a pyvmm snapshot")


def test_another_format_is_refused_naming_both(snapshot):
    path, _, _ = snapshot
    patch(path, 8, struct.pack("<I", snapfile.FORMAT_VERSION + 1))
    message = refusal(path)
    assert f"format {snapfile.FORMAT_VERSION + 1} by pyvmm test" in message
    assert f"reads format {snapfile.FORMAT_VERSION}" in message


def test_a_damaged_state_or_header_is_refused(snapshot):
    path, _, _ = snapshot
    with open_snapshot(path) as file:
        state_offset, header_size = file.state_offset, file.header_size
    patch(path, state_offset + 3, b"#")
    assert "does not match its checksum" in refusal(path)
    patch(path, snapfile.FIXED_SIZE, b"!")
    assert "header is not JSON" in refusal(path)


def test_a_damaged_trailer_is_refused(snapshot):
    path, _, written = snapshot
    patch(path, written.file_length - snapfile.TRAILER_SIZE, b"NOTTHEND")
    assert "trailer" in refusal(path)


def test_regions_that_do_not_add_up_are_refused(snapshot, tmp_path):
    path, _, _ = snapshot
    with open_snapshot(path) as file:
        header = dict(file.header)
        length = len(json.dumps(file.header, separators=(",", ":")))
    header["regions"] = [dict(r) for r in header["regions"]]
    header["regions"][1]["offset"] += PAGE
    text = json.dumps(header, separators=(",", ":"))[:length].ljust(length)
    patch(path, snapfile.FIXED_SIZE, text.encode())
    assert "RAM regions" in refusal(path)


def test_a_missing_file_is_one_line(tmp_path):
    assert "No such file" in refusal(tmp_path / "nothing")


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 1023), max_size=40), st.integers(1, 255))
def test_nonzero_runs_are_exactly_the_pages_that_are_not_zero(pages, byte):
    memory = GuestMemory([(0, 1024 * PAGE)])
    for page in pages:
        memory.write(page * PAGE + (page * 37) % PAGE, bytes([byte]))
    region = memory.regions[0]
    found = set()
    for start, end in nonzero_runs(region.host_address, region.size):
        assert start % PAGE == 0 and end % PAGE == 0 and end - start <= snapfile.MAX_WRITE
        found |= set(range(start // PAGE, end // PAGE))
    assert found == pages
    touched = set()
    for start, end in region.touched_runs():
        touched |= set(range(start // PAGE, end // PAGE))
    assert pages <= touched


def test_untouched_memory_is_never_read(tmp_path):
    """Pages the guest never touched are not even faulted in: /proc/self/pagemap says so."""
    memory = GuestMemory([(0, 256 * MiB)])
    memory.write(100 * MiB, b"data")
    region = memory.regions[0]
    runs = list(region.touched_runs())
    assert sum(end - start for start, end in runs) <= 2 * PAGE
    write(tmp_path / "big.snap", memory)
    assert list(region.touched_runs()) == runs


def test_long_runs_are_split():
    memory = GuestMemory([(0, 40 * MiB)])
    memory.fill(0, 40 * MiB, 1)
    region = memory.regions[0]
    runs = list(nonzero_runs(region.host_address, region.size))
    assert runs[0] == (0, snapfile.MAX_WRITE) and runs[-1][1] == 40 * MiB
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
