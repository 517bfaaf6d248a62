"""The snapshot file: a small header, the saved state as JSON, guest RAM, a trailer.

    0                  the header: the fixed fields below, then the header's
                       own JSON (pyvmm's version, the host's CPU, the disks,
                       where each RAM region lies), padded to whole pages
    header_size        the state: UTF-8 JSON, its SHA-256 in the header
    memory_offset      guest RAM, page aligned: each region at its own offset,
                       in the header; pages of zeros are never written, so
                       they are holes of a sparse file and read back as zeros
    file_length - 16   the trailer: TRAILER_MAGIC, then the file's length

The header is written last: a snapshot that failed or is still being
written has none and is refused as incomplete, and the trailer and the
length in the header make a truncated copy one that is refused too. RAM
is not checksummed (that would read all of it on every restore, which a
restore must never do: RAM is mapped from the file and paged in on
demand, `GuestMemory.from_file`); the state, which is read whole, is.

A snapshot is written only into an empty regular file (stale bytes left in
a hole would become guest memory). `FORMAT_VERSION` changes whenever this
layout or the meaning of the header changes; a file of another format is
refused, whichever pyvmm wrote it. What the state holds, part by part, is
versioned by each part (pyvmm/core/snapshot.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import stat
import struct
from dataclasses import dataclass

from .memory import GuestMemory
from .snapshot import SnapshotError

MAGIC = b"PYVMM-SN"
TRAILER_MAGIC = b"PYVMMEND"
FORMAT_VERSION = 1

PAGE = mmap.PAGESIZE
# magic, format version, header size, header JSON length, state offset, state
# length, state SHA-256, memory offset, memory length, file length
_FIXED = struct.Struct("<8sIIQQQ32sQQQ")
_TRAILER = struct.Struct("<8sQ")
FIXED_SIZE = _FIXED.size  # 96
TRAILER_SIZE = _TRAILER.size  # 16

CHUNK = 1 << 20  # RAM is compared with zeros this much at a time, then page by page where it is not
MAX_WRITE = 16 << 20  # the longest run of pages one pwrite() takes


class SnapshotFileError(SnapshotError):
    """A file that is not a snapshot this pyvmm can restore: the message is one line, naming the file."""


def _align(value: int, to: int = PAGE) -> int:
    return (value + to - 1) // to * to


# --- comparing with zeros, fast ------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_ZEROS = (ctypes.c_char * CHUNK)()  # never written: a chunk of zeros to compare with
_ZEROS_ADDRESS = ctypes.addressof(_ZEROS)


def nonzero_runs(address: int, size: int, page: int = PAGE):
    """(start, end) offsets of the runs of pages in [address, address + size)
    that are not all zeros, in order, each at most MAX_WRITE long. Reading
    a private mapping's untouched pages maps the kernel's zero page: a
    snapshot makes the guest no bigger."""
    run_start = None
    offset = 0
    while offset < size:
        length = min(CHUNK, size - offset)
        if _memcmp(address + offset, _ZEROS_ADDRESS, length) == 0:
            if run_start is not None:
                yield run_start, offset
                run_start = None
            offset += length
            continue
        end = offset + length
        while offset < end:
            if _memcmp(address + offset, _ZEROS_ADDRESS, page) == 0:
                if run_start is not None:
                    yield run_start, offset
                    run_start = None
            else:
                if run_start is None:
                    run_start = offset
                elif offset - run_start >= MAX_WRITE:
                    yield run_start, offset
                    run_start = offset
            offset += page
    if run_start is not None:
        yield run_start, size


# --- writing --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Written:
    file_length: int  # the file's size, holes included
    data_bytes: int  # RAM bytes written (the pages that are not zeros)
    state_bytes: int


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        if done <= 0:
            raise OSError("pwrite wrote nothing")
        view = view[done:]
        offset += done


def check_empty_file(fd: int) -> None:
    """SnapshotError unless `fd` is an empty regular file, open for writing."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError("a snapshot is written into a regular file (it is mapped back when restored)")
    if info.st_size:
        raise SnapshotError(f"the snapshot file must be empty; it has {info.st_size} bytes")


def write_snapshot(fd: int, header: dict, state: dict, memory: GuestMemory) -> Written:
    """Write a snapshot into `fd`, an empty regular file: the state, RAM
    (zero pages left out), the trailer, and the header last."""
    check_empty_file(fd)
    state_bytes = json.dumps(state, separators=(",", ":"), allow_nan=False).encode()
    regions = []
    relative = 0
    for region in memory.regions:
        regions.append({"gpa": region.gpa, "size": region.size, "offset": relative})
        relative += region.size
    memory_length = relative
    header = {**header, "format": FORMAT_VERSION, "regions": regions}
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    header_size = _align(FIXED_SIZE + len(header_bytes))
    memory_offset = _align(header_size + len(state_bytes))
    file_length = memory_offset + memory_length + TRAILER_SIZE

    _pwrite_all(fd, state_bytes, header_size)
    data = 0
    for region, entry in zip(memory.regions, regions):
        base = memory_offset + entry["offset"]
        view = memoryview(region.mapping)
        try:
            for touched, touched_end in region.touched_runs():
                for start, end in nonzero_runs(region.host_address + touched, touched_end - touched):
                    _pwrite_all(fd, view[touched + start:touched + end], base + touched + start)
                    data += end - start
        finally:
            view.release()
    _pwrite_all(fd, _TRAILER.pack(TRAILER_MAGIC, file_length), file_length - TRAILER_SIZE)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, header_size, len(header_bytes), header_size, len(state_bytes),
                        hashlib.sha256(state_bytes).digest(), memory_offset, memory_length, file_length)
    _pwrite_all(fd, fixed + header_bytes, 0)
    return Written(file_length, data, len(state_bytes))


# --- reading --------------------------------------------------------------------------------

@dataclass
class SnapshotFile:
    """An open snapshot whose header and trailer were checked: `state()`
    reads (and checks) the state, `map_memory()` maps RAM from it."""

    path: str
    fd: int
    header: dict
    header_size: int
    state_offset: int
    state_length: int
    state_digest: bytes
    memory_offset: int
    memory_length: int
    file_length: int

    @property
    def regions(self) -> list[tuple[int, int, int]]:
        """(gpa, size, absolute file offset) of each RAM region."""
        return [(r["gpa"], r["size"], self.memory_offset + r["offset"]) for r in self.header["regions"]]

    def state(self) -> dict:
        data = os.pread(self.fd, self.state_length, self.state_offset)
        if len(data) != self.state_length or hashlib.sha256(data).digest() != self.state_digest:
            raise SnapshotFileError(f"{self.path}: corrupt: its saved state does not match its checksum")
        try:
            state = json.loads(data.decode())
        except (UnicodeDecodeError, ValueError) as error:
            raise SnapshotFileError(f"{self.path}: corrupt: its saved state is not JSON ({error})") from None
        if not isinstance(state, dict):
            raise SnapshotFileError(f"{self.path}: corrupt: its saved state is not a JSON object")
        return state

    def map_memory(self) -> GuestMemory:
        return GuestMemory.from_file(self.fd, self.regions)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SnapshotFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_snapshot(path: str | os.PathLike, opener=None) -> SnapshotFile:
    """Open and check a snapshot; SnapshotFileError says in one line what
    is wrong with it. `opener(path, flags)` opens it (os.open by default)."""
    name = os.fspath(path)
    try:
        fd = (opener or os.open)(name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise SnapshotFileError(f"{name}: {error.strerror}") from None
    try:
        return _check(name, fd)
    except BaseException:
        os.close(fd)
        raise


def _check(name: str, fd: int) -> SnapshotFile:
    def refuse(why: str):
        raise SnapshotFileError(f"{name}: {why}")

    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        refuse("not a regular file")
    size = info.st_size
    if size == 0:
        refuse("empty: not a snapshot (or one that was never written)")
    fixed = os.pread(fd, FIXED_SIZE, 0)
    if len(fixed) < FIXED_SIZE:
        refuse(f"not a pyvmm snapshot (only {size} bytes)")
    (magic, version, header_size, header_length, state_offset, state_length, digest, memory_offset,
     memory_length, file_length) = _FIXED.unpack(fixed)
    if magic != MAGIC:
        if not fixed.strip(b"\0"):
            refuse("incomplete: its header was never written (the snapshot failed or is still being written)")
        refuse("not a pyvmm snapshot")
    if version != FORMAT_VERSION:
        writer = _writer(fd, header_size, header_length)
        refuse(f"written in snapshot format {version}{writer}; this pyvmm ({_pyvmm_version()}) "
               f"reads format {FORMAT_VERSION}")
    if size < file_length:
        refuse(f"truncated: {size} of its {file_length} bytes")
    if size > file_length:
        refuse(f"corrupt: {size - file_length} bytes after its end")
    if header_size % PAGE or header_size < FIXED_SIZE + header_length or header_size > file_length:
        refuse("corrupt: bad header size")
    trailer = os.pread(fd, TRAILER_SIZE, file_length - TRAILER_SIZE)
    if len(trailer) != TRAILER_SIZE or _TRAILER.unpack(trailer) != (TRAILER_MAGIC, file_length):
        refuse("corrupt: its trailer is missing or wrong")
    try:
        header = json.loads(os.pread(fd, header_length, FIXED_SIZE).decode())
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as error:
        refuse(f"corrupt: its header is not JSON ({error})")
    if not (header_size <= state_offset and state_offset + state_length <= memory_offset
            and memory_offset % PAGE == 0 and memory_offset + memory_length + TRAILER_SIZE == file_length):
        refuse("corrupt: its parts overlap or lie outside it")
    _check_regions(refuse, header.get("regions"), memory_length)
    return SnapshotFile(name, fd, header, header_size, state_offset, state_length, digest, memory_offset,
                        memory_length, file_length)


def _check_regions(refuse, regions, memory_length: int) -> None:
    if not isinstance(regions, list) or not regions:
        refuse("corrupt: no RAM regions in its header")
    expected = 0
    last_end = -1
    for region in regions:
        if not isinstance(region, dict) or not all(isinstance(region.get(k), int) and not isinstance(region.get(k), bool)
                                                   and region.get(k) >= 0 for k in ("gpa", "size", "offset")):
            refuse("corrupt: a RAM region of its header is malformed")
        gpa, size, offset = region["gpa"], region["size"], region["offset"]
        if size == 0 or gpa % PAGE or size % PAGE or offset != expected or gpa < last_end:
            refuse("corrupt: its RAM regions are not laid out one after another, page aligned")
        expected += size
        last_end = gpa + size
    if expected != memory_length:
        refuse("corrupt: its RAM regions do not add up to its memory length")


def _writer(fd: int, header_size: int, header_length: int) -> str:
    """' by pyvmm X' when an unknown format's header still says who wrote it."""
    try:
        header = json.loads(os.pread(fd, min(header_length, 1 << 20), FIXED_SIZE).decode())
        return f" by pyvmm {header['pyvmm']}" if isinstance(header.get("pyvmm"), str) else ""
    except Exception:  # noqa: BLE001 - an unknown format's header may be anything
        return ""


def _pyvmm_version() -> str:
    from .. import __version__

    return __version__
