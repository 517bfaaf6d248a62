"""The guest's GNTTABOP_copy: between its own frames (DOMID_SELF gmfns) and
grants in its own table, with Xen's per-copy GNTST_* statuses."""

import struct

import pytest

from pyvmm.core.memory import GuestMemory
from pyvmm.kvm.vcpu import Translation
from pyvmm.xen import abi
from pyvmm.xen.errors import EFAULT, EINVAL
from pyvmm.xen.hv.gnttab import GTF_permit_access, GTF_readonly, GTF_reading, GrantTable
from pyvmm.xen.hv.guest_access import GuestAccess
from pyvmm.xen.hv.hypercalls import PREEMPT_BATCH, HypercallDispatcher

PAGE = 4096
RAM = 1 << 20
OPS = 0x10000  # the copy structures
SRC, DST = 0x40, 0x41  # two RAM frames
UNMAPPED = 0x30000
DOMID = 1
OK = abi.GNTST_okay
SELF = abi.DOMID_SELF


class Domain:
    """What a copy needs of the domain: its grant table, its RAM pages, preemption."""

    def __init__(self, memory):
        self.domid = DOMID
        self.vcpu_count = 1
        self.memory = memory
        self.gnttab = GrantTable(memory, max_frames=4)
        self.gnttab.note_frame_mapped(0)
        self.holes = set()  # frames with no RAM showing (ballooned, overlaid)
        self.preempted = 0
        self.stopping = False

    def note_long_mode(self, long_mode):
        pass

    def ram_page(self, gfn):
        if gfn in self.holes or (gfn + 1) * PAGE > RAM:
            return None
        return self.memory.view(gfn * PAGE, PAGE)

    def preempt(self, vcpu):
        self.preempted += 1
        return self.stopping

    def grant(self, ref, gfn, domid=DOMID, flags=GTF_permit_access):
        struct.pack_into("<HHI", self.gnttab._table, ref * 8, flags, domid, gfn)

    def entry_flags(self, ref):
        return struct.unpack_from("<H", self.gnttab._table, ref * 8)[0]


class Exit:
    def __init__(self, *params, longmode=True):
        self.input = abi.HYPERCALL_grant_table_op
        self.params = tuple(params) + (0,) * (6 - len(params))
        self.longmode = longmode
        self.cpl = 0
        self.result = None


@pytest.fixture
def memory():
    return GuestMemory([(0, RAM)])


@pytest.fixture
def domain(memory):
    return Domain(memory)


@pytest.fixture
def copy(domain, memory):
    """copy([op dict, ...], compat=False) -> (result, [status, ...])."""
    dispatcher = HypercallDispatcher(domain)
    access = GuestAccess(lambda gva: Translation(gva, (gva & ~0xFFF) != UNMAPPED, True), memory)

    def run(ops, compat=False, count=None, at=OPS):
        size = abi.GNTTAB_COPY.size(compat)
        for i, op in enumerate(ops):
            fields = dict(source_u=SRC, source_domid=SELF, source_offset=0, dest_u=DST, dest_domid=SELF,
                          dest_offset=0, len=16, flags=0, status=99)
            fields.update(op)
            memory.write(at + i * size, abi.GNTTAB_COPY.pack(abi.GNTTAB_COPY.record(**fields), compat))
        exit = Exit(abi.GNTTABOP_copy, at, len(ops) if count is None else count, longmode=not compat)
        dispatcher.handle(exit, 0, access)
        statuses = [abi.GNTTAB_COPY.unpack(memory.read(at + i * size, size), compat).status for i in range(len(ops))]
        return exit.result, statuses

    return run


ABIS = pytest.mark.parametrize("compat", [False, True], ids=["64bit", "compat"])


def test_layout():
    assert abi.GNTTAB_COPY.size(False) == 40 and abi.GNTTAB_COPY.size(True) == 24


@ABIS
def test_frame_to_frame(copy, memory, compat):
    memory.write(SRC * PAGE + 100, b"0123456789")
    assert copy([dict(source_offset=100, dest_offset=4000, len=10)], compat) == (0, [OK])
    assert memory.read(DST * PAGE + 4000, 10) == b"0123456789"


@ABIS
def test_through_grants_to_itself(copy, domain, memory, compat):
    domain.grant(10, SRC, flags=GTF_permit_access | GTF_readonly)
    domain.grant(11, DST)
    memory.write(SRC * PAGE, b"granted")
    ops = [dict(source_u=10, dest_u=11, flags=abi.GNTCOPY_source_gref | abi.GNTCOPY_dest_gref, len=7,
                source_domid=DOMID, dest_domid=SELF)]
    assert copy(ops, compat) == (0, [OK])
    assert memory.read(DST * PAGE, 7) == b"granted"
    assert not domain.entry_flags(10) & GTF_reading and not domain.gnttab._pins  # released


def test_statuses_in_xen_order(copy, domain):
    domain.grant(10, SRC, flags=GTF_permit_access | GTF_readonly)
    domain.grant(12, SRC, domid=0)  # for domain 0, not for us
    domain.holes.add(0x50)
    gref_both = abi.GNTCOPY_source_gref | abi.GNTCOPY_dest_gref
    cases = [
        (dict(source_domid=DOMID), abi.GNTST_permission_denied),  # a frame only through DOMID_SELF
        (dict(dest_domid=7, flags=abi.GNTCOPY_dest_gref), abi.GNTST_bad_domain),
        (dict(source_u=0x50), abi.GNTST_bad_page),  # ballooned or overlaid
        (dict(dest_u=RAM // PAGE), abi.GNTST_bad_page),  # beyond RAM
        (dict(dest_u=1 << 52), abi.GNTST_bad_page),
        (dict(source_u=5000, flags=abi.GNTCOPY_source_gref), abi.GNTST_bad_gntref),  # beyond the table's 1 frame
        (dict(source_u=12, flags=abi.GNTCOPY_source_gref), abi.GNTST_general_error),  # not granted to us
        (dict(source_u=30, flags=abi.GNTCOPY_source_gref), abi.GNTST_general_error),  # not granted at all
        (dict(dest_u=10, flags=abi.GNTCOPY_dest_gref), abi.GNTST_general_error),  # read-only grant
        (dict(source_u=1, source_domid=0, flags=abi.GNTCOPY_source_gref), abi.GNTST_general_error),
        (dict(source_offset=4090, len=7), abi.GNTST_bad_copy_arg),
        (dict(dest_offset=0xFFFF, len=1), abi.GNTST_bad_copy_arg),
        (dict(source_u=0x50, dest_offset=4095, len=2), abi.GNTST_bad_page),  # the pages come before the range
        (dict(source_u=10, dest_u=10, flags=gref_both, len=1), abi.GNTST_general_error),
        (dict(flags=0xFFFC, len=0), OK),  # other flag bits are ignored, as Xen does
    ]
    result, statuses = copy([op for op, _ in cases])
    assert result == 0
    assert statuses == [status for _, status in cases]
    assert not domain.gnttab._pins and not domain.entry_flags(10) & GTF_reading


def test_an_unreadable_structure_ends_the_call_with_efault(copy, memory):
    memory.write(DST * PAGE, b"\0" * 16)
    memory.write(SRC * PAGE, b"x" * 16)
    size = abi.GNTTAB_COPY.size(False)
    result, statuses = copy([{}], count=2, at=UNMAPPED - size)  # the second lies in an unmapped page
    assert result == -EFAULT and statuses == [OK]
    assert memory.read(DST * PAGE, 16) == b"x" * 16


def test_overlapping_copy_within_a_page(copy, memory):
    memory.write(SRC * PAGE, b"abcdef")
    assert copy([dict(dest_u=SRC, dest_offset=2, len=4)]) == (0, [OK])
    assert memory.read(SRC * PAGE, 6) == b"ababcd"


def test_a_large_batch_is_preempted_and_stops_with_the_vm(copy, domain):
    count = 3 * PREEMPT_BATCH + 1
    result, statuses = copy([{}] * count)
    assert result == 0 and statuses == [OK] * count and domain.preempted == 3
    domain.stopping = True
    result, statuses = copy([{}] * count)
    assert result < 0 and statuses[PREEMPT_BATCH - 1] == OK


def test_count_checks(copy):
    assert copy([], count=1 << 31)[0] == -EINVAL  # a negative count
    assert copy([], count=0) == (0, [])
