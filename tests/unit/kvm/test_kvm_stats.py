"""KVM's binary statistics (KVM_GET_STATS_FD): the descriptors parsed from bytes laid out as the kernel does."""

import os
import struct

import pytest

from pyvmm.kvm import stats


def _blob(counters: dict[str, int], name_size: int = 48) -> bytes:
    """Header, descriptors and data as a stats fd holds them."""
    desc_offset = 24 + 16  # an id string between header and descriptors, as the kernel puts it
    step = 16 + name_size
    data_offset = desc_offset + len(counters) * step
    descriptors, data = b"", b""
    for index, (name, value) in enumerate(counters.items()):
        descriptors += struct.pack("<IhHII", 0, 0, 1, index * 8, 0) + name.encode().ljust(name_size, b"\0")
        data += struct.pack("<Q", value)
    header = struct.pack("<6I", 0, name_size, len(counters), 24, desc_offset, data_offset)
    return header + b"kvm-1234/vcpu-0".ljust(16, b"\0") + descriptors + data


def test_parse_finds_the_wanted_counters_only():
    blob = _blob({"halt_successful_poll": 1, "exits": 77, "io_exits": 5, "halt_exits": 9})
    data_offset, offsets = stats.parse_descriptors(blob)
    assert data_offset == 24 + 16 + 4 * 64
    assert offsets == {"exits": 8, "io_exits": 16, "halt_exits": 24}


def test_counters_read_their_values(tmp_path):
    blob = _blob({"exits": 77, "unrelated": 3, "halt_exits": 9})
    path = tmp_path / "stats"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    data_offset, offsets = stats.parse_descriptors(blob)
    counters = stats.VcpuCounters(fd, data_offset, offsets)
    assert counters.read() == {"exits": 77, "halt_exits": 9}
    counters.close()
    assert counters.read() == {}


@pytest.mark.parametrize("blob", [b"", struct.pack("<6I", 0, 0, 1, 24, 24, 100),
                                  struct.pack("<6I", 0, 48, 10, 24, 24, 1000) + b"\0" * 64])
def test_a_header_that_does_not_add_up_is_refused(blob):
    with pytest.raises(ValueError):
        stats.parse_descriptors(blob)
