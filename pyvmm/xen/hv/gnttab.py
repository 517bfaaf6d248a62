"""The guest's grant table (versions 1 and 2), and grant mapping for the VMM's backends.

The guest shares pages with its backends by writing grant entries into a
table whose frames it maps into its own physical address space
(XENMEM_add_to_physmap, XENMAPSPACE_grant_table). A version 1 entry is

    0  u16 flags    GTF_* (type in bits 0-1, readonly, reading, writing, ...)
    2  u16 domid    the domain allowed to use the grant
    4  u32 frame    the guest frame number being shared

A version 2 entry (GNTTABOP_set_version(2)) is 16 bytes, 256 to a frame:

    0  u16 flags    as v1, plus GTF_sub_page; never GTF_reading/GTF_writing
    2  u16 domid
    4  u16 page_off, 6 u16 length   (GTF_sub_page: the part of the page granted)
    8  u64 frame

and the in-use bits live apart, in *status frames*: one u16 per entry
(2048 to a frame, GTF_reading | GTF_writing), which the guest maps with
XENMAPIDX_grant_table_status (and finds with GNTTABOP_get_status_frames).
Taking a v2 grant sets the status bits first, then reads the entry again
and backs out if the guest changed it meanwhile (Linux revokes by clearing
the flags, then looks at the status): either the guest sees the grant in
use, or the backend sees it revoked. Switching versions wipes the table but
for the toolstack's reserved entries (0-7), which are converted, and is
refused (-EBUSY) while any other entry is mapped, as in Xen; going back to
version 1 takes the status frames out of the guest (`on_status_frames_gone`).

The table lives in one anonymous mapping of `max_frames` pages that belongs
to the VMM, so the domain can put frame i into the guest with a KVM memslot
at whatever gfn the guest picks (`frame_host_address`).

Backends (the VMM acting as domain 0) `map` a reference to get a view of
the granted page. As Xen does, mapping marks the entry in use by setting
GTF_reading (and GTF_writing for a writable mapping) with a compare-and-swap
of flags and domid together that re-checks the entry each round: a guest
revoking the grant at the same moment (Linux clears the flags with a
compare-and-swap only when neither bit is set) either wins, and the map
fails, or finds the grant busy. The bits are cleared when the last mapping
of that kind is released.

Backends map full pages: a v2 sub-page grant can only be copied from or
to (inside its part of the page), as Xen allows; transitive grants (a
grant of a grant) are refused.

Errors reported to backends carry Xen's GNTST_* status. Xen answers every
bad entry with GNTST_general_error; the statuses here are more precise
(permission_denied for a grant that does not allow the access, bad_page for
a frame that is not guest RAM), which is all the backends ever look at.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import mmap
import struct
import threading
from typing import Callable, Iterable, Sequence

from pyvmm.core.memory import GuestMemory, GuestMemoryError
from pyvmm.core.ratelimit import DEFAULT_LOG_RATE, LogRate
from pyvmm.core.trace import NULL_TRACE, Tracer
from pyvmm.core import atomic
from ..errors import EACCES, EBUSY, EINVAL, ERANGE, XenError

log = logging.getLogger(__name__)
from ..abi import (
    PAGE_SIZE,
    GNTST_okay,
    GNTST_general_error,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_virt_addr,
    GNTST_bad_dev_addr,
    GNTST_no_device_space,
    GNTST_permission_denied,
    GNTST_bad_page,
    GNTST_bad_copy_arg,
    GNTST_address_too_big,
    GNTST_eagain,
    GNTST_no_space,
)
from pyvmm.core.snapshot import SnapshotError, check_version, natural, versioned

ENTRY_SIZE = 8
ENTRIES_PER_FRAME = PAGE_SIZE // ENTRY_SIZE
ENTRY_SIZE_V2 = 16
ENTRIES_PER_FRAME_V2 = PAGE_SIZE // ENTRY_SIZE_V2
STATUS_PER_FRAME = PAGE_SIZE // 2  # u16 each
DEFAULT_MAX_FRAMES = 64
# XENMAPSPACE_grant_table's index for status frame i (v2 only).
XENMAPIDX_grant_table_status = 0x8000_0000

# Grant entry flags (grant_table.h).
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GTF_IN_USE = GTF_reading | GTF_writing
GTF_transitive = 3  # a type, v2 only
GTF_sub_page = 1 << 8  # v2 only

# References the toolstack fills in before the guest boots.
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1


_STATUS_ERRNO = {GNTST_permission_denied: EACCES}

# Xen gives up after five compare-and-swap rounds: a guest that keeps
# changing the entry is misbehaving and must not hold the backend.
CMPXCHG_ATTEMPTS = 5

_ENTRY = struct.Struct("<HHI")
STATE_VERSION = 2  # 2: grant table v2 (its entries and status frames)
_ENTRY_V2 = struct.Struct("<HHIQ")  # flags, domid, sub-page (page_off | length << 16), frame
_MASK32 = 0xFFFF_FFFF


class GrantError(XenError):
    """A grant a backend may not use; `status` is Xen's GNTST_* code."""

    def __init__(self, status: int, message: str = ""):
        super().__init__(_STATUS_ERRNO.get(status, EINVAL), message)
        self.status = status


class GrantTable:
    def __init__(self, memory: GuestMemory, *, max_frames: int = DEFAULT_MAX_FRAMES, backend_domid: int = 0,
                 log_rate: LogRate = DEFAULT_LOG_RATE, trace: Tracer = NULL_TRACE,
                 on_status_frames_gone: Callable[[], None] | None = None):
        """`on_status_frames_gone`: the guest went back to version 1 (called
        after the table's lock is released): take its status frames out of
        its physical address space, as Xen does."""
        if not 1 <= max_frames <= 1 << 16:
            raise ValueError(f"max_frames {max_frames} is not in 1..65536")
        if not 0 <= backend_domid <= 0xFFFF:
            raise ValueError(f"domid {backend_domid} does not fit 16 bits")
        self.memory = memory
        self.max_frames = max_frames  # the domain's max-grant-frames (pyvmm.limits)
        self._limited = log_rate.limited(log)  # lines whose rate the guest sets
        self._trace = trace  # the VM's
        self.backend_domid = backend_domid
        self.frame_count = 0  # frames the table has grown to (Xen's nr_grant_frames)
        self._mapping = mmap.mmap(-1, max_frames * PAGE_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._mapping))
        self._table = memoryview(self._mapping)
        # Entry ref is words 2*ref (flags | domid << 16) and 2*ref + 1 (frame);
        # each read is one aligned load. The atomic views update the first
        # word as a whole (taking a grant) and its flags half (giving it back).
        self._words = self._table.cast("I")
        self._entry_words = atomic.AtomicArray(self._base, 4)
        self._entry_halves = atomic.AtomicArray(self._base, 2)
        self._nr_entries = max_frames * ENTRIES_PER_FRAME
        self.version = 1
        self.max_status_frames = _status_frames(max_frames)
        self._status_mapping = mmap.mmap(-1, self.max_status_frames * PAGE_SIZE,
                                         flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._status_base = ctypes.addressof(ctypes.c_char.from_buffer(self._status_mapping))
        self._status = memoryview(self._status_mapping).cast("H")
        self._on_status_frames_gone = on_status_frames_gone
        self._reserved: dict[int, int] = {}
        # ref -> [mappings, writable mappings]; guarded by _lock. The
        # generation tells mappings made before a reset() from later ones.
        self._pins: dict[int, list[int]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def nr_entries(self) -> int:
        return self._nr_entries

    # --- for the domain and the hypercall layer -----------------------------

    def frame_host_address(self, index: int) -> int:
        """Host address of table frame `index`, or of status frame i for
        `XENMAPIDX_grant_table_status | i`, for a KVM memslot."""
        if isinstance(index, int) and index & XENMAPIDX_grant_table_status:
            status = index & ~XENMAPIDX_grant_table_status
            self._check_status_index(status)
            return self._status_base + status * PAGE_SIZE
        self._check_frame_index(index)
        return self._base + index * PAGE_SIZE

    def nr_status_frames(self) -> int:
        """Status frames the table has (Xen's nr_status_frames): none in v1."""
        if self.version != 2:
            return 0
        return _status_frames(self.frame_count)

    def note_frame_mapped(self, index: int) -> None:
        """The guest maps frame `index` (add_to_physmap): -EINVAL beyond max_frames.
        A status frame (v2 only) grows the table to the frames it covers."""
        if isinstance(index, int) and index & XENMAPIDX_grant_table_status:
            status = index & ~XENMAPIDX_grant_table_status
            with self._lock:
                self._check_status_index(status)
                covered = (status + 1) * STATUS_PER_FRAME // ENTRIES_PER_FRAME_V2
                self.frame_count = max(self.frame_count, min(self.max_frames, covered))
            return
        if isinstance(index, int) and not 0 <= index < self.max_frames:
            self._limited.warning("grant table: the guest asked for frame %d, beyond its %d (limit "
                                  "max-grant-frames): answered -EINVAL", index, self.max_frames,
                                  key="max-grant-frames")
        self._check_frame_index(index)
        with self._lock:
            self.frame_count = max(self.frame_count, index + 1)

    def grow(self, nr_frames: int) -> None:
        """GNTTABOP_setup_table: the table has at least `nr_frames` frames
        (their pages exist from the start: growing only counts them, for
        query_size, the refs a copy may name and the v2 status frames).
        -EINVAL beyond max_frames: the caller answers GNTST_general_error."""
        if not isinstance(nr_frames, int) or not 0 <= nr_frames <= self.max_frames:
            raise XenError(EINVAL, f"{nr_frames!r} grant frames: the table has at most {self.max_frames}")
        with self._lock:
            self.frame_count = max(self.frame_count, nr_frames)

    def set_version(self, version: int) -> int:
        """GNTTABOP_set_version; returns the version now in force.

        Whatever the outcome, the caller writes get_version() back into the
        guest's argument, as Xen does.
        """
        if version not in (1, 2):
            raise XenError(EINVAL, f"no grant table version {version}")
        with self._lock:
            old = self.version
            if version == old:
                return version
            busy = [ref for ref in self._pins if ref >= GNTTAB_NR_RESERVED_ENTRIES]
            if busy:
                raise XenError(EBUSY, f"grant refs {busy[:4]} are mapped: the version cannot change")
            kept = [self._entry(ref) for ref in range(GNTTAB_NR_RESERVED_ENTRIES)]
            if version == 1 and any(flags & GTF_type_mask == GTF_transitive
                                    or (flags & GTF_type_mask == GTF_permit_access and frame >> 32)
                                    for flags, _, frame in kept):
                raise XenError(ERANGE, "a reserved v2 entry has no v1 form")
            self._table[:] = bytes(len(self._table))
            self._status_mapping[:] = bytes(len(self._status_mapping))
            self.version = version
            self._nr_entries = self.max_frames * (ENTRIES_PER_FRAME if version == 1 else ENTRIES_PER_FRAME_V2)
            for ref, (flags, domid, frame) in enumerate(kept):
                if flags & GTF_type_mask == GTF_permit_access:
                    self._write_entry(ref, flags, domid, frame)
        self._limited.info("grant table: the guest switched to version %d", version)
        if old == 2 and self._on_status_frames_gone is not None:
            self._on_status_frames_gone()
        return version

    def get_version(self) -> int:
        return self.version

    def _entry(self, ref: int) -> tuple[int, int, int]:
        """(flags with the in-use bits, domid, frame) of entry `ref`, in either version (lock held)."""
        if self.version == 1:
            combo, frame = self._words[2 * ref], self._words[2 * ref + 1]
            return combo & 0xFFFF, combo >> 16, frame
        combo = self._words[4 * ref]
        frame = self._words[4 * ref + 2] | self._words[4 * ref + 3] << 32
        return (combo & 0xFFFF) | self._status[ref], combo >> 16, frame

    def _write_entry(self, ref: int, flags: int, domid: int, frame: int) -> None:
        """Entry `ref` in the current version; v2 keeps the in-use bits apart (lock held)."""
        if self.version == 1:
            _ENTRY.pack_into(self._table, ref * ENTRY_SIZE, flags, domid, frame)
        else:
            _ENTRY_V2.pack_into(self._table, ref * ENTRY_SIZE_V2, flags & ~GTF_IN_USE, domid, 0, frame)
            self._status[ref] = flags & GTF_IN_USE

    def query_size(self) -> tuple[int, int]:
        """GNTTABOP_query_size: (frames the table has grown to, max_frames)."""
        return self.frame_count, self.max_frames

    def reset(self) -> None:
        """Back to the boot state (guest reboot or soft reset).

        Mappings still held stay valid as views, but releasing them no longer
        touches the (new) entries.
        """
        with self._lock:
            self._table[:] = bytes(len(self._table))
            self._status_mapping[:] = bytes(len(self._status_mapping))
            self.version = 1
            self._nr_entries = self.max_frames * ENTRIES_PER_FRAME
            self.frame_count = 0
            self._pins.clear()
            self._generation += 1
            for ref, gfn in self._reserved.items():
                _ENTRY.pack_into(self._table, ref * ENTRY_SIZE, GTF_permit_access, self.backend_domid, gfn)

    # --- for the VMM's backends -----------------------------------------------

    def reserve(self, ref: int, frame_gfn: int) -> None:
        """Grant `frame_gfn` to the backend domain in reserved entry `ref`."""
        if not 0 <= ref < GNTTAB_NR_RESERVED_ENTRIES:
            raise ValueError(f"grant ref {ref} is not a reserved entry")
        if not 0 <= frame_gfn <= _MASK32:
            raise ValueError(f"gfn {frame_gfn:#x} does not fit a version 1 entry")
        with self._lock:
            self._reserved[ref] = frame_gfn
            self._write_entry(ref, GTF_permit_access, self.backend_domid, frame_gfn)

    def map(self, ref: int, writable: bool, *, grantee: int | None = None) -> "GrantMapping":
        """Map the page granted by `ref`; raises GrantError.

        Release the mapping (or use it as a context manager) when done: the
        guest cannot revoke the grant while it is held. `grantee`: the
        domain the entry must name (the backends' by default; the guest's
        own for its GNTTABOP_copy through a grant to itself).
        """
        writable = bool(writable)
        try:
            with self._lock:
                mapping = self._map(ref, writable, self._generation, grantee)
        except GrantError as error:
            if self._trace.grant:
                _trace_map(self._trace, ref, writable, error)
            raise
        if self._trace.grant:
            _trace_map(self._trace, ref, writable, mapping)
        return mapping

    def map_many(self, refs: Sequence[int], writable: bool) -> list["GrantMapping | GrantError"]:
        """map() of several references in one go (the receive buffers a
        network frontend posted): for each, its mapping or the GrantError
        that refused it. Every reference is checked as map() checks it, and
        one refused does not keep the others from being mapped."""
        writable = bool(writable)
        results: list[GrantMapping | GrantError] = []
        append = results.append
        map_one = self._map
        with self._lock:
            generation = self._generation
            for ref in refs:
                try:
                    append(map_one(ref, writable, generation))
                except GrantError as error:
                    append(error)
        if self._trace.grant:
            for ref, result in zip(refs, results):
                _trace_map(self._trace, ref, writable, result)
        return results

    def release_many(self, mappings: Iterable["GrantMapping"]) -> None:
        """GrantMapping.release() of several mappings in one go."""
        mappings = list(mappings)
        with self._lock:
            for mapping in mappings:
                self._release_locked(mapping)
        for mapping in mappings:
            mapping._release_view()

    def _map(self, ref: int, writable: bool, generation: int, grantee: int | None = None,
             sub_page: bool = False) -> "GrantMapping":
        """One mapping; the caller holds the lock. `grantee`: who takes the
        grant (default: the backends' domain 0). `sub_page`: a v2 sub-page
        grant may be taken (for a copy inside its part of the page)."""
        if not isinstance(ref, int) or not 0 <= ref < self._nr_entries:
            raise GrantError(GNTST_bad_gntref, f"grant ref {ref!r} is outside the table")
        self._pin(ref, writable, self.backend_domid if grantee is None else grantee, sub_page)
        gfn = self._entry(ref)[2]  # read after the entry is pinned, as Xen does
        try:
            view = self._page_view(gfn)
        except GrantError:
            self._unpin(ref, writable)
            raise
        if not writable:
            view = view.toreadonly()
        return GrantMapping(self, ref, gfn, writable, view, generation)

    def copy(self, ref: int, offset: int, data_or_length: bytes | bytearray | memoryview | int, *,
             to_guest: bool) -> bytes | None:
        """Copy into (to_guest) or out of the granted page, like GNTTABOP_copy.

        Reading takes a length and returns the bytes; writing takes the data.
        """
        length = data_or_length if isinstance(data_or_length, int) else len(memoryview(data_or_length).cast("B"))
        if not isinstance(offset, int) or offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            raise GrantError(GNTST_bad_copy_arg, f"copy of {length} bytes at {offset!r} leaves the page")
        if to_guest and isinstance(data_or_length, int):
            raise TypeError("copying to the guest needs data, not a length")
        if self._trace.grant:
            self._trace.emit("grant", "copy", ref=ref, offset=offset, length=length, to_guest=to_guest)
        try:
            with self._lock:
                mapping = self._map(ref, to_guest, self._generation, sub_page=True)
                part = self._sub_page(ref)
        except GrantError as error:
            if self._trace.grant:
                _trace_map(self._trace, ref, to_guest, error)
            raise
        with mapping:
            if part is not None and not (part[0] <= offset and offset + length <= part[0] + part[1]):
                raise GrantError(GNTST_general_error, f"grant ref {ref} grants bytes {part[0]}+{part[1]} only")
            if to_guest:
                mapping.view[offset : offset + length] = memoryview(data_or_length).cast("B")
                return None
            return bytes(mapping.view[offset : offset + length])

    # --- snapshot (pyvmm/core/snapshot.py) --------------------------------------------

    def save_state(self) -> dict:
        """The version in force, the frames the guest mapped, the reserved
        refs, and the table's entries (and in v2 its status frames): these
        frames are this part's memory, not guest RAM. Only frames holding a
        non-zero byte are saved.

        Where the guest mapped each frame is XenDomain's state. The backends'
        mappings (the pins) are saved by them; the in-use bits they set are
        saved as they are and cleared again on restore for the refs that
        were pinned, since the backends map those afresh."""
        with self._lock:
            used = max(self.frame_count, 1)  # frame 0 holds the reserved refs from boot on
            pins = {str(ref): list(counts) for ref, counts in sorted(self._pins.items())}
            return versioned(STATE_VERSION, grant_version=self.version, frame_count=self.frame_count,
                             reserved={str(ref): gfn for ref, gfn in sorted(self._reserved.items())},
                             frames=_nonzero_frames(self._table, used),
                             status_frames=_nonzero_frames(memoryview(self._status_mapping), self.nr_status_frames()),
                             pins=pins)

    def restore_state(self, state: dict) -> None:
        """Take the entries back into the freshly built table (no backend has
        mapped anything yet). max_frames comes from the config: a snapshot
        that used more frames than this VM allows is refused."""
        saved_version = check_version(state, "GrantTable", STATE_VERSION)
        version = state.get("grant_version")
        if version not in ((1, 2) if saved_version >= 2 else (1,)) or isinstance(version, bool):
            raise SnapshotError(f"GrantTable: grant table version {version!r} is not supported")
        frame_count, frames, reserved, pins = (state.get(key) for key in ("frame_count", "frames", "reserved", "pins"))
        status_frames = state.get("status_frames", {})
        if not natural(frame_count) or frame_count > self.max_frames:
            raise SnapshotError(f"GrantTable: {frame_count!r} frames in use, this VM allows {self.max_frames}")
        if not all(isinstance(value, dict) for value in (frames, reserved, pins, status_frames)):
            raise SnapshotError("GrantTable: frames, reserved refs or pins are missing")
        contents = _saved_frames(frames, max(frame_count, 1), "frame")
        nr_status = _status_frames(frame_count) if version == 2 else 0
        status_contents = _saved_frames(status_frames, nr_status, "status frame")
        if {_index(ref, GNTTAB_NR_RESERVED_ENTRIES): gfn for ref, gfn in reserved.items()} != self._reserved:
            raise SnapshotError("GrantTable: the snapshot's reserved refs are not this VM's")
        nr_entries = self.max_frames * (ENTRIES_PER_FRAME if version == 1 else ENTRIES_PER_FRAME_V2)
        pinned = []
        for key in pins:
            ref = _index(key, nr_entries)
            if ref is None:
                raise SnapshotError(f"GrantTable: bad pinned ref {key!r:.20}")
            pinned.append(ref)
        with self._lock:
            if self._pins:
                raise SnapshotError("GrantTable: restored after a backend mapped a grant")
            self._table[:] = bytes(len(self._table))
            self._status_mapping[:] = bytes(len(self._status_mapping))
            self.version, self._nr_entries = version, nr_entries
            for index, data in contents.items():
                self._table[index * PAGE_SIZE:(index + 1) * PAGE_SIZE] = data
            for index, data in status_contents.items():
                self._status_mapping[index * PAGE_SIZE:(index + 1) * PAGE_SIZE] = data
            for ref in pinned:
                # Our bits: the backends that held them set them again as they re-map.
                if version == 1:
                    self._entry_halves.fetch_and(4 * ref, 0xFFFF & ~GTF_IN_USE)
                else:
                    self._status[ref] &= 0xFFFF & ~GTF_IN_USE
            self.frame_count = frame_count

    # --- internals --------------------------------------------------------------

    def _check_status_index(self, index: int) -> None:
        if self.version != 2 or not 0 <= index < self.max_status_frames:
            raise XenError(EINVAL, f"no grant status frame {index} (version {self.version})")

    def _check_frame_index(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < self.max_frames:
            raise XenError(EINVAL, f"grant table frame {index!r} is not below {self.max_frames}")

    def _load_combo(self, ref: int) -> int:
        """flags | domid << 16 of entry `ref`, as one 32-bit word (both versions start so)."""
        return self._words[(4 if self.version == 2 else 2) * ref]

    def _sub_page(self, ref: int) -> tuple[int, int] | None:
        """(page_off, length) of a v2 sub-page grant (lock held)."""
        if self.version != 2 or not self._words[4 * ref] & GTF_sub_page:
            return None
        word = self._words[4 * ref + 1]
        return word & 0xFFFF, word >> 16

    def _pin(self, ref: int, writable: bool, grantee: int, sub_page: bool = False) -> None:
        pins = self._pins.get(ref)
        if pins is None or (writable and not pins[1]):
            if self.version == 2:
                self._set_in_use_v2(ref, writable, pins is not None, sub_page, grantee)
            else:
                self._set_in_use(ref, writable, grantee)
        elif grantee != self.backend_domid and self._load_combo(ref) >> 16 != grantee:
            # Pinned already, by a backend: the guest's own copy must not ride on that pin.
            raise GrantError(GNTST_permission_denied, f"grant ref {ref} is not for domain {grantee}")
        if pins is None:
            pins = self._pins[ref] = [0, 0]
        pins[0] += 1
        pins[1] += writable

    def _set_in_use(self, ref: int, writable: bool, grantee: int) -> None:
        # Flags and domid are swapped as one word, so the guest cannot slip a
        # change of either between our check and our update.
        seen = self._load_combo(ref)
        for _ in range(CMPXCHG_ATTEMPTS):
            flags, domid = seen & 0xFFFF, seen >> 16
            if flags & GTF_type_mask != GTF_permit_access:
                raise GrantError(GNTST_permission_denied, f"grant ref {ref} does not permit access")
            if domid != grantee:
                raise GrantError(GNTST_permission_denied, f"grant ref {ref} is for domain {domid}")
            if writable and flags & GTF_readonly:
                raise GrantError(GNTST_permission_denied, f"grant ref {ref} is read-only")
            wanted = flags | GTF_reading | (GTF_writing if writable else 0)
            swapped, seen = self._entry_words.compare_exchange(2 * ref, seen, wanted | domid << 16)
            if swapped:
                return
        raise GrantError(GNTST_general_error, f"grant ref {ref} keeps changing")

    def _grant_refusal(self, ref: int, combo: int, writable: bool, sub_page: bool, grantee: int) -> str | None:
        """Why a v2 entry (flags | domid << 16) cannot be used by `grantee`, or None."""
        flags, domid = combo & 0xFFFF, combo >> 16
        if flags & GTF_type_mask != GTF_permit_access:
            return f"grant ref {ref} does not permit access"
        if domid != grantee:
            return f"grant ref {ref} is for domain {domid}"
        if writable and flags & GTF_readonly:
            return f"grant ref {ref} is read-only"
        if flags & GTF_sub_page and not sub_page:
            return f"grant ref {ref} grants part of a page: it cannot be mapped"
        return None

    def _set_in_use_v2(self, ref: int, writable: bool, reading_held: bool, sub_page: bool, grantee: int) -> None:
        # Status first, then the entry again: a guest revoking at the same
        # time clears the flags and then looks at the status, so one of us
        # sees the other.
        why = self._grant_refusal(ref, self._words[4 * ref], writable, sub_page, grantee)
        if why is not None:
            raise GrantError(GNTST_permission_denied, why)
        bits = GTF_reading | (GTF_writing if writable else 0)
        address = self._status_base + 2 * ref
        atomic.fetch_or(address, 2, bits)
        why = self._grant_refusal(ref, self._words[4 * ref], writable, sub_page, grantee)
        if why is not None:
            taken = GTF_writing if reading_held else bits
            atomic.fetch_and(address, 2, 0xFFFF & ~taken)
            raise GrantError(GNTST_general_error, f"{why} (changed while being taken)")

    def _unpin(self, ref: int, writable: bool) -> None:
        pins = self._pins[ref]
        pins[0] -= 1
        pins[1] -= writable
        clear = 0
        if not pins[1]:
            clear |= GTF_writing
        if not pins[0]:
            clear |= GTF_reading
            del self._pins[ref]
        if clear and self.version == 2:
            atomic.fetch_and(self._status_base + 2 * ref, 2, 0xFFFF & ~clear)
        elif clear:
            self._entry_halves.fetch_and(4 * ref, 0xFFFF & ~clear)

    def _page_view(self, gfn: int) -> memoryview:
        # Grant frames (in the platform BAR) and MMIO are not RAM: refused.
        # RAM regions are page-aligned, so a page of RAM lies in one region
        # and view() refuses exactly what is not RAM.
        try:
            return self.memory.view(gfn * PAGE_SIZE, PAGE_SIZE)
        except GuestMemoryError:
            raise GrantError(GNTST_bad_page, f"gfn {gfn:#x} is not guest RAM") from None

    def _release(self, mapping: "GrantMapping") -> bool:
        with self._lock:
            return self._release_locked(mapping)

    def _release_locked(self, mapping: "GrantMapping") -> bool:
        if mapping.released:
            return False
        mapping.released = True
        if self._trace.grant:
            self._trace.emit("grant", "unmap", ref=mapping.ref, writable=mapping.writable)
        if mapping.generation == self._generation:
            self._unpin(mapping.ref, mapping.writable)
        return True


def _status_frames(table_frames: int) -> int:
    """The v2 status frames that cover `table_frames` frames of entries (Xen's grant_to_status_frames)."""
    return -(-table_frames * ENTRIES_PER_FRAME_V2 // STATUS_PER_FRAME)


def _nonzero_frames(memory, count: int) -> dict[str, str]:
    """{index: base64 page} of the first `count` pages of `memory` that hold a non-zero byte."""
    frames = {}
    for index in range(count):
        data = bytes(memory[index * PAGE_SIZE:(index + 1) * PAGE_SIZE])
        if any(data):
            frames[str(index)] = base64.b64encode(data).decode("ascii")
    return frames


def _saved_frames(frames: dict, count: int, what: str) -> dict[int, bytes]:
    """The pages of a saved {index: base64 page} below `count` (SnapshotError)."""
    contents = {}
    for key, text in frames.items():
        index = _index(key, count)
        try:
            data = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
        except ValueError:
            data = b""
        if index is None or len(data) != PAGE_SIZE:
            raise SnapshotError(f"GrantTable: bad {what} {key!r:.20}")
        contents[index] = data
    return contents


def _index(key, end: int) -> int | None:
    """A saved dict key that must be a decimal index below `end`, or None."""
    if not isinstance(key, str) or not key.isdecimal() or len(key) > 10:
        return None
    value = int(key)
    return value if value < end else None


def _trace_map(trace: Tracer, ref: int, writable: bool, result: "GrantMapping | GrantError") -> None:
    if isinstance(result, GrantError):
        trace.emit("grant", "map", ref=ref, writable=writable, error=str(result))
    else:
        trace.emit("grant", "map", ref=ref, writable=writable, gfn=result.gfn)


class GrantMapping:
    """One backend mapping of a granted page.

    `view` is exactly the 4 KiB page, read-only unless mapped writable. It
    stops working once the mapping is released.
    """

    __slots__ = ("table", "ref", "gfn", "writable", "view", "generation", "released")

    def __init__(self, table: GrantTable, ref: int, gfn: int, writable: bool, view: memoryview, generation: int):
        self.table = table
        self.ref = ref
        self.gfn = gfn
        self.writable = writable
        self.view = view
        self.generation = generation
        self.released = False

    def release(self) -> None:
        """Clear the in-use flags (when no other mapping needs them); idempotent."""
        if self.table._release(self):
            self._release_view()

    def _release_view(self) -> None:
        try:
            self.view.release()
        except BufferError:
            # Something still holds a buffer exported from the view; the
            # grant is given back all the same.
            pass

    def __enter__(self) -> "GrantMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else ("rw" if self.writable else "ro")
        return f"GrantMapping(ref={self.ref}, gfn={self.gfn:#x}, {state})"
