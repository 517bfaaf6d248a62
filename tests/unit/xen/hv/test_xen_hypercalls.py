import errno
import logging
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyvmm.kvm.vcpu import Translation
from pyvmm.core.memory import GuestMemory
from pyvmm.xen import abi
from pyvmm.xen.errors import (
    EEXIST,
    EFAULT,
    EINVAL,
    ENOENT,
    ENOSYS,
    EOPNOTSUPP,
    EPERM,
    ESRCH,
    XenError,
)
from pyvmm.xen.hv.guest_access import GuestAccess
from pyvmm.xen.hv.hypercalls import HypercallDispatcher

PAGE = 4096
RAM = 1 << 20
BUF = 0x10000  # a scratch buffer in guest RAM (identity-mapped)
ARRAY = 0x20000  # a second one, for arrays
UNMAPPED = 0x30000  # a page the fake page tables do not map
READONLY = 0x31000  # a page mapped read-only
READONLY2 = 0x33000  # another, after a writable page
OUTSIDE = 0x4000_0000  # mapped, but not RAM
DOMID = 1
MS = 1_000_000


# --- fakes -----------------------------------------------------------------------------


class Recorder:
    """Records every method call; answers from `results` (values or
    callables) and raises what `raises` holds for a method name."""

    def __init__(self, **results):
        self.calls = []
        self.results = results
        self.raises = {}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args):
            self.calls.append((name, *args))
            if name in self.raises:
                raise self.raises[name]
            result = self.results.get(name)
            return result(*args) if callable(result) else result

        return method

    def names(self):
        return [call[0] for call in self.calls]


class FakeDomain(Recorder):
    def __init__(self):
        super().__init__(features=lambda submap: 0x305, hvm_get_param=lambda index: 0xFEFF9, watchdog=0,
                         vcpu_is_up=False)
        self.domid = DOMID
        self.vcpu_count = 2
        self.version = (4 << 16) | 17
        self.handle = bytes(range(1, 17))
        self.evtchn = Recorder(
            alloc_unbound=11, bind_interdomain=12, bind_virq=13, bind_ipi=14,
            status=SimpleNamespace(status=abi.EVTCHNSTAT_interdomain, vcpu=1, remote_dom=0, remote_port=77, virq=0, pirq=0),
            init_control=17,
        )
        self.evtchn.fifo_offered = False
        self.gnttab = Recorder(set_version=lambda v: v, get_version=1, query_size=(4, 64))


class FakeExit:
    def __init__(self, number, *params, longmode=True, cpl=0):
        self.input = number
        self.params = tuple(params) + (0,) * (6 - len(params))
        self.longmode = longmode
        self.cpl = cpl
        self.result = None


def identity(gva):
    page = gva & ~(PAGE - 1)
    if page == UNMAPPED:
        return Translation(0, False, False)
    return Translation(gva, True, page not in (READONLY, READONLY2))


@pytest.fixture
def memory():
    return GuestMemory([(0, RAM)])


@pytest.fixture
def domain():
    return FakeDomain()


@pytest.fixture
def hc(domain, memory):
    """call(number, *params, longmode=, cpl=, vcpu=) -> result."""
    dispatcher = HypercallDispatcher(domain)
    access = GuestAccess(identity, memory)

    def call(number, *params, longmode=True, cpl=0, vcpu=0):
        exit = FakeExit(number, *params, longmode=longmode, cpl=cpl)
        dispatcher.handle(exit, vcpu, access)
        assert isinstance(exit.result, int)
        return exit.result

    call.dispatcher = dispatcher
    return call


def put(memory, gva, layout, compat=False, **fields):
    memory.write(gva, layout.pack(layout.record(**fields), compat))


def get(memory, gva, layout, compat=False):
    return layout.unpack(memory.read(gva, layout.size(compat)), compat)


ABIS = pytest.mark.parametrize("compat", [False, True], ids=["64bit", "compat"])


# --- ABI layouts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,native,compat",
    [
        (abi.ADD_TO_PHYSMAP, 24, 16),
        (abi.ADD_TO_PHYSMAP_BATCH, 32, 20),
        (abi.SCHED_POLL, 24, 16),
        (abi.VCPU_SET_SINGLESHOT_TIMER, 16, 12),
        (abi.VCPU_REGISTER_VCPU_INFO, 16, 16),
        (abi.VCPU_REGISTER_AREA, 8, 8),
        (abi.HVM_PARAM, 16, 16),
        (abi.EVTCHN_STATUS, 24, 24),
        (abi.EVTCHN_BIND_INTERDOMAIN, 12, 12),
        (abi.GNTTAB_QUERY_SIZE, 16, 16),
        (abi.COMPILE_INFO, 144, 144),
        (abi.PLATFORM_PARAMETERS, 8, 4),
    ],
)
def test_struct_sizes_match_xen(layout, native, compat):
    assert (layout.size(False), layout.size(True)) == (native, compat)


def test_names():
    assert abi.hypercall_name(abi.HYPERCALL_event_channel_op) == "event_channel_op"
    assert abi.subop_name(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_cache_flush) == "cache_flush"
    assert abi.subop_name(abi.HYPERCALL_hvm_op, 0xFF) == "255"
    assert abi.hypercall_name(99) == "hypercall_99"
    assert abi.DOMID_SELF == 0x7FF0


# --- dispatch -------------------------------------------------------------------------


def test_user_mode_is_refused_without_latching_the_abi(hc, domain):
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_version, cpl=3, longmode=False) == -EPERM
    assert domain.calls == []


@pytest.mark.parametrize("longmode", [True, False])
def test_long_mode_is_noted_on_every_call(hc, domain, longmode):
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_version, longmode=longmode) == 0x40011
    assert domain.calls == [("note_long_mode", longmode)]


@pytest.mark.parametrize("number", [0, 11, 13, 26, 35, 41, 100, 127, 128, 1 << 40])
def test_unknown_hypercalls(hc, number):
    assert hc(number) == -ENOSYS


def test_compat_truncates_number_and_arguments(hc, memory):
    # High halves are garbage a 32-bit guest cannot even see.
    assert hc((1 << 32) | abi.HYPERCALL_xen_version, (7 << 32) | abi.XENVER_pagesize, longmode=False) == PAGE
    assert hc((1 << 32) | abi.HYPERCALL_xen_version, abi.XENVER_pagesize) == -ENOSYS
    memory.write(BUF, b"x" * 16)
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_extraversion, (5 << 32) | BUF, longmode=False) == 0
    assert memory.read(BUF, 3) == b".0\0"


def test_calls_are_counted(hc):
    hc(abi.HYPERCALL_xen_version, abi.XENVER_version)
    hc(abi.HYPERCALL_xen_version, abi.XENVER_version)
    hc(abi.HYPERCALL_physdev_op, abi.PHYSDEVOP_eoi)
    assert hc.dispatcher.counts() == {"xen_version": 2, "physdev_op": 1}


def test_unexpected_exceptions_become_einval_and_are_logged(hc, domain, caplog):
    domain.raises["sched_yield"] = RuntimeError("bug")
    with caplog.at_level(logging.ERROR):
        assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_yield) == -EINVAL
    assert "bug" in caplog.text
    domain.raises["note_long_mode"] = ValueError("also a bug")
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_yield) == -EINVAL


def test_unknown_subops_are_logged_with_their_name_and_rate_limited(hc, caplog):
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_get_pod_target, BUF) == -ENOSYS
    lines = [r for r in caplog.records if "get_pod_target" in r.getMessage()]
    assert 1 <= len(lines) <= 8


def test_throttle_keys_are_bounded(hc):
    for op in range(1000, 2000):
        hc(abi.HYPERCALL_physdev_op, op)
    assert len(hc.dispatcher._complain._seen) <= 257


# --- xen_version ------------------------------------------------------------------------


def test_xen_version_strings(hc, memory):
    memory.fill(BUF, 2048, 0xAA)
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_extraversion, BUF) == 0
    assert memory.read(BUF, 17) == b".0" + b"\0" * 14 + b"\xaa"
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_capabilities, BUF) == 0
    caps = memory.read(BUF, 1025)
    assert caps.startswith(b"xen-3.0-x86_64 ") and caps[1023:] == b"\0\xaa"
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_changeset, BUF) == 0
    assert memory.read(BUF, 64).rstrip(b"\0") == b"pyvmm"
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_compile_info, BUF) == 0
    info = get(memory, BUF, abi.COMPILE_INFO)
    assert info.compile_by.rstrip(b"\0") == b"pyvmm"
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_guest_handle, ARRAY) == 0
    assert memory.read(ARRAY, 16) == bytes(range(1, 17))  # the domain's UUID
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_commandline, ARRAY) == 0
    assert memory.read(ARRAY, 9) == b"<denied>\0"


@ABIS
def test_xen_version_platform_parameters(hc, memory, compat):
    memory.fill(BUF, 16, 0xAA)
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_platform_parameters, BUF, longmode=not compat) == 0
    size = 4 if compat else 8
    assert memory.read(BUF, size + 1) == bytes(size) + b"\xaa"


def test_xen_version_get_features(hc, domain, memory):
    put(memory, BUF, abi.FEATURE_INFO, submap_idx=0, submap=0xDEAD)
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_get_features, BUF) == 0
    assert get(memory, BUF, abi.FEATURE_INFO) == (0, 0x305)
    assert ("features", 0) in domain.calls
    put(memory, BUF, abi.FEATURE_INFO, submap_idx=1, submap=0xDEAD)
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_get_features, BUF) == -EINVAL
    assert get(memory, BUF, abi.FEATURE_INFO) == (1, 0xDEAD)


def test_xen_version_misc(hc):
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_pagesize, 0) == PAGE
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_pagesize, BUF) == -EINVAL
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_build_id, BUF) == -EPERM
    assert hc(abi.HYPERCALL_xen_version, abi.XENVER_commandline2, BUF) == -EPERM
    assert hc(abi.HYPERCALL_xen_version, 99, BUF) == -ENOSYS
    assert hc(abi.HYPERCALL_xen_version, 0xFFFF_FFFF, BUF) == -ENOSYS


@pytest.mark.parametrize("pointer", [UNMAPPED, READONLY, OUTSIDE, RAM - 2])
@pytest.mark.parametrize(
    "op", [abi.XENVER_extraversion, abi.XENVER_capabilities, abi.XENVER_get_features, abi.XENVER_compile_info]
)
def test_xen_version_bad_pointers(hc, memory, op, pointer):
    assert hc(abi.HYPERCALL_xen_version, op, pointer) == -EFAULT
    assert memory.read(RAM - 2, 2) == b"\0\0"


# --- console_io --------------------------------------------------------------------------


def test_console_write(hc, domain, memory):
    memory.write(PAGE * 3 - 3, b"hello")  # across a page boundary
    assert hc(abi.HYPERCALL_console_io, abi.CONSOLEIO_write, 5, PAGE * 3 - 3) == 0
    assert ("console_write", b"hello") in domain.calls


def test_console_limits(hc, domain):
    assert hc(abi.HYPERCALL_console_io, abi.CONSOLEIO_write, 2 << 30, BUF) == -EINVAL
    assert hc(abi.HYPERCALL_console_io, abi.CONSOLEIO_write, 10, UNMAPPED - 5) == -EFAULT
    assert "console_write" not in domain.names()
    assert hc(abi.HYPERCALL_console_io, abi.CONSOLEIO_write, 0, UNMAPPED) == 0
    assert hc(abi.HYPERCALL_console_io, abi.CONSOLEIO_read, 100, BUF) == 0
    assert hc(abi.HYPERCALL_console_io, 7, 1, BUF) == -ENOSYS


# --- vm_assist ---------------------------------------------------------------------------


def test_vm_assist_runstate_update_flag(hc, domain):
    assert hc(abi.HYPERCALL_vm_assist, abi.VMASST_CMD_enable, abi.VMASST_TYPE_runstate_update_flag) == 0
    assert hc(abi.HYPERCALL_vm_assist, abi.VMASST_CMD_disable, abi.VMASST_TYPE_runstate_update_flag) == 0
    assert [c for c in domain.calls if c[0] == "set_runstate_update_flag"] == [
        ("set_runstate_update_flag", True), ("set_runstate_update_flag", False)]


def test_vm_assist_refuses_other_assists_and_commands(hc, domain):
    assert hc(abi.HYPERCALL_vm_assist, abi.VMASST_CMD_enable, 1) == -EINVAL  # a PV-only assist
    assert hc(abi.HYPERCALL_vm_assist, 7, abi.VMASST_TYPE_runstate_update_flag) == -EINVAL
    assert hc(abi.HYPERCALL_vm_assist, abi.VMASST_CMD_enable, (1 << 32) | 1) == -EINVAL
    assert "set_runstate_update_flag" not in domain.names()
    domain.raises["set_runstate_update_flag"] = XenError(errno.EINVAL)  # KVM without the flag
    assert hc(abi.HYPERCALL_vm_assist, abi.VMASST_CMD_enable, abi.VMASST_TYPE_runstate_update_flag) == -EINVAL


# --- hvm_op ------------------------------------------------------------------------------


@ABIS
@pytest.mark.parametrize("domid", [DOMID, abi.DOMID_SELF])
def test_hvm_set_param(hc, domain, memory, compat, domid):
    value = (abi.HVM_PARAM_CALLBACK_TYPE_VECTOR << 56) | 0xF3
    put(memory, BUF, abi.HVM_PARAM, compat, domid=domid, index=abi.HVM_PARAM_CALLBACK_IRQ, value=value)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_set_param, BUF, longmode=not compat) == 0
    assert ("hvm_set_param", abi.HVM_PARAM_CALLBACK_IRQ, value) in domain.calls


@pytest.mark.parametrize(
    "domid,index,expected",
    [
        (0, abi.HVM_PARAM_CALLBACK_IRQ, -ESRCH),
        (7, abi.HVM_PARAM_STORE_EVTCHN, -ESRCH),
        (DOMID, abi.HVM_NR_PARAMS, -EINVAL),
        (DOMID, 0xFFFFFFFF, -EINVAL),
        (DOMID, abi.HVM_PARAM_NESTEDHVM, -EINVAL),
        (DOMID, abi.HVM_PARAM_STORE_PFN, -EPERM),
        (DOMID, abi.HVM_PARAM_IDENT_PT, -EPERM),
        (DOMID, abi.HVM_PARAM_ALTP2M, -EEXIST),
    ],
)
def test_hvm_set_param_refusals(hc, domain, memory, domid, index, expected):
    put(memory, BUF, abi.HVM_PARAM, domid=domid, index=index, value=1)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_set_param, BUF) == expected
    assert "hvm_set_param" not in domain.names()


@ABIS
def test_hvm_get_param(hc, domain, memory, compat):
    put(memory, BUF, abi.HVM_PARAM, compat, domid=abi.DOMID_SELF, index=abi.HVM_PARAM_STORE_PFN, value=0)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_get_param, BUF, longmode=not compat) == 0
    assert get(memory, BUF, abi.HVM_PARAM, compat) == (abi.DOMID_SELF, abi.HVM_PARAM_STORE_PFN, 0xFEFF9)


def test_hvm_get_param_refusals(hc, domain, memory):
    put(memory, BUF, abi.HVM_PARAM, domid=DOMID, index=abi.HVM_PARAM_IOREQ_PFN, value=5)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_get_param, BUF) == -EPERM
    put(memory, BUF, abi.HVM_PARAM, domid=3, index=abi.HVM_PARAM_STORE_PFN, value=5)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_get_param, BUF) == -ESRCH
    assert get(memory, BUF, abi.HVM_PARAM).value == 5
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_get_param, READONLY) == -EFAULT
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_get_param, UNMAPPED) == -EFAULT
    domain.raises["hvm_get_param"] = XenError(errno.ENOENT)
    put(memory, BUF, abi.HVM_PARAM, domid=DOMID, index=abi.HVM_PARAM_CONSOLE_PFN, value=5)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_get_param, BUF) == -ENOENT
    assert get(memory, BUF, abi.HVM_PARAM).value == 5
    assert "hvm_get_param" in domain.names()


def test_hvm_upcall_vector(hc, domain, memory):
    put(memory, BUF, abi.HVM_EVTCHN_UPCALL_VECTOR, vcpu=1, vector=0xF3)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_set_evtchn_upcall_vector, BUF) == 0
    assert ("set_evtchn_upcall_vector", 1, 0xF3) in domain.calls
    put(memory, BUF, abi.HVM_EVTCHN_UPCALL_VECTOR, vcpu=1, vector=0x0F)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_set_evtchn_upcall_vector, BUF) == -EINVAL
    put(memory, BUF, abi.HVM_EVTCHN_UPCALL_VECTOR, vcpu=2, vector=0xF3)
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_set_evtchn_upcall_vector, BUF) == -ENOENT
    assert domain.names().count("set_evtchn_upcall_vector") == 1


def test_hvm_other_ops(hc, domain, memory):
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_pagetable_dying, BUF) == -ENOSYS
    assert hc(abi.HYPERCALL_hvm_op, abi.HVMOP_flush_tlbs, 0) == -ENOSYS
    assert hc(abi.HYPERCALL_hvm_op, 0xFE, 0) == -ENOSYS
    # Xen ignores the bits above the op (its continuation state).
    put(memory, BUF, abi.HVM_PARAM, domid=DOMID, index=abi.HVM_PARAM_STORE_EVTCHN, value=3)
    assert hc(abi.HYPERCALL_hvm_op, 0x100 | abi.HVMOP_set_param, BUF) == 0


# --- vcpu_op -----------------------------------------------------------------------------


def test_vcpu_op_checks_the_vcpu_first(hc, domain):
    domain.results["vcpu_is_up"] = True
    for op in (abi.VCPUOP_is_up, abi.VCPUOP_stop_periodic_timer, 99):
        assert hc(abi.HYPERCALL_vcpu_op, op, 2, 0) == -ENOENT
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_is_up, (1 << 32) | 1, 0) == 1  # unsigned int vcpuid
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_is_up, 0xFFFFFFFF, 0) == -ENOENT
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_initialise, 1, BUF) == -ENOSYS
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_get_runstate_info, 1, BUF) == -ENOSYS


@ABIS
def test_register_vcpu_info(hc, domain, memory, compat):
    put(memory, BUF, abi.VCPU_REGISTER_VCPU_INFO, compat, mfn=0x42, offset=0x40, rsvd=0)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_vcpu_info, 1, BUF, longmode=not compat) == 0
    assert ("register_vcpu_info", 1, 0x42040) in domain.calls


@pytest.mark.parametrize(
    "mfn,offset",
    [(0x42, PAGE - 63), (0x42, PAGE), (0x42, 0xFFFFFFFF), (0x42, 0x44), (RAM // PAGE, 0), (1 << 63, 0), (1 << 52, 0)],
)
def test_register_vcpu_info_refusals(hc, domain, memory, mfn, offset):
    put(memory, BUF, abi.VCPU_REGISTER_VCPU_INFO, mfn=mfn, offset=offset, rsvd=0)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_vcpu_info, 0, BUF) == -EINVAL
    assert "register_vcpu_info" not in domain.names()


def test_register_vcpu_info_last_slot_and_bad_pointer(hc, domain, memory):
    put(memory, BUF, abi.VCPU_REGISTER_VCPU_INFO, mfn=0x42, offset=PAGE - 64, rsvd=0)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_vcpu_info, 0, BUF) == 0
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_vcpu_info, 0, UNMAPPED) == -EFAULT


@pytest.fixture
def remapped(domain, memory):
    """A dispatcher whose page tables map the virtual page 0xa0000 to
    physical 0x5000, the next virtual page to 0x6000, then to 0x9000."""
    base = 0xA0000
    frames = {base: 0x5000, base + PAGE: 0x6000, base + 2 * PAGE: 0x9000}

    def translate(gva):
        page = gva & ~(PAGE - 1)
        if page in frames:
            return Translation(frames[page] + gva - page, True, True)
        return identity(gva)

    dispatcher = HypercallDispatcher(domain)
    access = GuestAccess(translate, memory)

    def call(number, *params, longmode=True):
        exit = FakeExit(number, *params, longmode=longmode)
        dispatcher.handle(exit, 0, access)
        return exit.result

    call.base = base
    return call


def test_register_time_area_translates_the_virtual_address(remapped, domain, memory):
    put(memory, BUF, abi.VCPU_REGISTER_AREA, addr=remapped.base + 0x20)
    assert remapped(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_vcpu_time_memory_area, 1, BUF) == 0
    assert ("register_vcpu_time_info", 1, 0x5020) in domain.calls
    # A pvclock area must not cross a page: KVM maps it as one.
    put(memory, BUF, abi.VCPU_REGISTER_AREA, addr=remapped.base + PAGE - 16)
    assert remapped(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_vcpu_time_memory_area, 1, BUF) == -EINVAL
    put(memory, BUF, abi.VCPU_REGISTER_AREA, addr=UNMAPPED + 8)
    assert remapped(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_vcpu_time_memory_area, 1, BUF) == -EFAULT
    put(memory, BUF, abi.VCPU_REGISTER_AREA, addr=0)
    assert remapped(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_vcpu_time_memory_area, 1, BUF) == 0
    assert domain.calls[-1] == ("register_vcpu_time_info", 1, abi.INVALID_GPA)


@ABIS
def test_register_runstate_area(remapped, domain, memory, compat):
    size = 44 if compat else 48

    def register(addr):
        memory.write(BUF, struct.pack("<Q", addr))
        return remapped(abi.HYPERCALL_vcpu_op, abi.VCPUOP_register_runstate_memory_area, 0, BUF, longmode=not compat)

    # Crossing into the physically following page is fine ...
    assert register(remapped.base + PAGE - 8) == 0
    assert domain.calls[-1] == ("register_runstate_area", 0, 0x6000 - 8)
    # ... into an unrelated one is not: KVM follows the area physically.
    assert register(remapped.base + 2 * PAGE - size + 4) == -EFAULT
    assert register(remapped.base + 2 * PAGE - size) == 0
    assert domain.calls[-1] == ("register_runstate_area", 0, 0x7000 - size)
    # A 32-bit guest's handle is the low half of the union.
    assert register((0xDEAD << 32) | (remapped.base + 0x10)) == (0 if compat else -EFAULT)
    if compat:
        assert domain.calls[-1] == ("register_runstate_area", 0, 0x5010)
    assert register(0) == 0
    assert domain.calls[-1] == ("register_runstate_area", 0, abi.INVALID_GPA)


def test_periodic_timer(hc, domain, memory):
    put(memory, BUF, abi.VCPU_SET_PERIODIC_TIMER, period_ns=MS)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_set_periodic_timer, 1, BUF) == 0
    assert ("set_periodic_timer", 1, MS) in domain.calls
    for bad in (MS - 1, 0, 1 << 63, (1 << 64) - 1):
        put(memory, BUF, abi.VCPU_SET_PERIODIC_TIMER, period_ns=bad)
        assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_set_periodic_timer, 1, BUF) == -EINVAL
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_stop_periodic_timer, 1, 0) == 0
    assert domain.names().count("set_periodic_timer") == 1
    assert ("stop_periodic_timer", 1) in domain.calls


@ABIS
def test_singleshot_timer(hc, domain, memory, compat):
    put(memory, BUF, abi.VCPU_SET_SINGLESHOT_TIMER, compat, timeout_abs_ns=5 * MS, flags=abi.VCPU_SSHOTTMR_future)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_set_singleshot_timer, 1, BUF, vcpu=1, longmode=not compat) == 0
    assert domain.calls[-1] == ("set_singleshot_timer", 1, 5 * MS, True)
    put(memory, BUF, abi.VCPU_SET_SINGLESHOT_TIMER, compat, timeout_abs_ns=5 * MS, flags=0)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_set_singleshot_timer, 1, BUF, vcpu=1, longmode=not compat) == 0
    assert domain.calls[-1] == ("set_singleshot_timer", 1, 5 * MS, False)


def test_singleshot_timer_rules(hc, domain, memory):
    put(memory, BUF, abi.VCPU_SET_SINGLESHOT_TIMER, timeout_abs_ns=5 * MS, flags=1)
    # Only a vCPU's own timer.
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_set_singleshot_timer, 1, BUF, vcpu=0) == -EINVAL
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_stop_singleshot_timer, 1, 0, vcpu=0) == -EINVAL
    assert "set_singleshot_timer" not in domain.names()
    # The domain knows the time: it says ETIME.
    domain.raises["set_singleshot_timer"] = XenError(errno.ETIME)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_set_singleshot_timer, 0, BUF) == -errno.ETIME
    del domain.raises["set_singleshot_timer"]
    # A negative s_time_t is in the past, never ETIME.
    put(memory, BUF, abi.VCPU_SET_SINGLESHOT_TIMER, timeout_abs_ns=(1 << 64) - 5, flags=1)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_set_singleshot_timer, 0, BUF) == 0
    assert domain.calls[-1] == ("set_singleshot_timer", 0, 1, False)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_set_singleshot_timer, 0, UNMAPPED) == -EFAULT
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_stop_singleshot_timer, 1, 0, vcpu=1) == 0
    assert domain.calls[-1] == ("stop_singleshot_timer", 1)


# --- sched_op ----------------------------------------------------------------------------


def test_sched_yield_and_block(hc, domain):
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_yield, 0, vcpu=1) == 0
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_block, 0, vcpu=0) == 0
    assert domain.calls[1:] == [("sched_yield", 1), ("note_long_mode", True), ("block", 0)]


@ABIS
def test_sched_shutdown(hc, domain, memory, compat):
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=abi.SHUTDOWN_crash)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown, BUF, longmode=not compat) == 0
    assert domain.calls[-1] == ("shutdown", abi.SHUTDOWN_crash)
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=abi.SHUTDOWN_MAX + 1)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown, BUF, longmode=not compat) == -EINVAL
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown, UNMAPPED, longmode=not compat) == -EFAULT
    assert domain.names().count("shutdown") == 1


def test_shutdown_code_overrides_a_later_reason(hc, domain, memory):
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=abi.SHUTDOWN_suspend)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown_code, BUF) == 0
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=abi.SHUTDOWN_reboot)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown_code, BUF) == 0  # the first code stays
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=abi.SHUTDOWN_poweroff)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown, BUF) == 0
    assert domain.calls[-1] == ("shutdown", abi.SHUTDOWN_suspend)


@pytest.mark.parametrize(
    "domid,reason,expected",
    [(DOMID, abi.SHUTDOWN_reboot, 0), (0, abi.SHUTDOWN_reboot, -EPERM), (9, 0, -ESRCH),
     (abi.DOMID_SELF, 0, -ESRCH), (DOMID, 200, -EINVAL)],
)
def test_sched_remote_shutdown(hc, domain, memory, domid, reason, expected):
    put(memory, BUF, abi.SCHED_REMOTE_SHUTDOWN, domain_id=domid, reason=reason)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_remote_shutdown, BUF) == expected
    assert (("shutdown", reason) in domain.calls) == (expected == 0)


@ABIS
def test_sched_poll(hc, domain, memory, compat):
    memory.write(PAGE * 5 - 4, struct.pack("<3I", 3, 9, 1023))  # across a page
    put(memory, BUF, abi.SCHED_POLL, compat, ports=PAGE * 5 - 4, nr_ports=3, timeout=7 * MS)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_poll, BUF, vcpu=1, longmode=not compat) == 0
    assert domain.calls[-1] == ("poll", 1, [3, 9, 1023], 7 * MS)


@pytest.mark.parametrize(
    "compat,ports,nr_ports,values,expected",
    [
        (False, ARRAY, abi.SCHED_POLL_MAX_PORTS + 1, [], -EINVAL),
        (False, ARRAY, 0xFFFFFFFF, [], -EINVAL),
        (False, UNMAPPED - 4, 2, [], -EFAULT),
        (False, OUTSIDE, 1, [], -EFAULT),
        (False, ARRAY, 2, [1, 4096], -EINVAL),
        (True, ARRAY, 2, [1, 1024], -EINVAL),
    ],
)
def test_sched_poll_refusals(hc, domain, memory, compat, ports, nr_ports, values, expected):
    memory.write(ARRAY, struct.pack(f"<{len(values)}I", *values))
    put(memory, BUF, abi.SCHED_POLL, compat, ports=ports, nr_ports=nr_ports, timeout=0)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_poll, BUF, longmode=not compat) == expected
    assert "poll" not in domain.names()


def test_sched_poll_max_ports_and_negative_timeout(hc, domain, memory):
    memory.write(ARRAY, struct.pack("<128I", *range(128)))
    put(memory, BUF, abi.SCHED_POLL, ports=ARRAY, nr_ports=128, timeout=(1 << 64) - 1)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_poll, BUF) == 0
    assert domain.calls[-1] == ("poll", 0, list(range(128)), 1)


def test_sched_other_ops(hc):
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_pin_override, BUF) == -ENOSYS
    assert hc(abi.HYPERCALL_sched_op, 0x1234, BUF) == -ENOSYS


@ABIS
def test_sched_watchdog_goes_to_the_domain(hc, domain, memory, compat):
    # struct sched_watchdog {uint32_t id, timeout}: the same in both ABIs.
    domain.results["watchdog"] = lambda wid, timeout: 2 if wid == 0 else 0
    put(memory, BUF, abi.SCHED_WATCHDOG, id=0, timeout=30)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_watchdog, BUF, longmode=not compat) == 2
    put(memory, BUF, abi.SCHED_WATCHDOG, id=2, timeout=0)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_watchdog, BUF, longmode=not compat) == 0
    assert [call for call in domain.calls if call[0] == "watchdog"] == [("watchdog", 0, 30), ("watchdog", 2, 0)]
    domain.raises["watchdog"] = XenError(EINVAL)
    put(memory, BUF, abi.SCHED_WATCHDOG, id=0xFFFFFFFF, timeout=0)  # Linux's xen_wdt probes so
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_watchdog, BUF, longmode=not compat) == -EINVAL
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_watchdog, UNMAPPED, longmode=not compat) == -EFAULT


def test_sched_shutdown_returns_the_domains_answer(hc, domain, memory):
    # A suspend pyvmm cannot carry out is answered 1, "suspend cancelled".
    domain.results["shutdown"] = lambda reason: 1 if reason == abi.SHUTDOWN_suspend else None
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=abi.SHUTDOWN_suspend)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown, BUF) == 1
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=abi.SHUTDOWN_soft_reset)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown, BUF) == 0


@pytest.mark.parametrize("runs_on", [abi.SHUTDOWN_suspend, abi.SHUTDOWN_soft_reset])
def test_a_domain_that_runs_on_forgets_its_shutdown_code(hc, domain, memory, runs_on):
    # Xen's domain_resume() clears the code: after a cancelled suspend or a
    # soft reset (kexec) the next kernel's own shutdown reason counts.
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=runs_on)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown_code, BUF) == 0
    put(memory, BUF, abi.SCHED_SHUTDOWN, reason=abi.SHUTDOWN_poweroff)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown, BUF) == 0
    assert domain.calls[-1] == ("shutdown", runs_on)
    assert hc(abi.HYPERCALL_sched_op, abi.SCHEDOP_shutdown, BUF) == 0
    assert domain.calls[-1] == ("shutdown", abi.SHUTDOWN_poweroff)


# --- event_channel_op --------------------------------------------------------------------


def test_evtchn_alloc_unbound(hc, domain, memory):
    put(memory, BUF, abi.EVTCHN_ALLOC_UNBOUND, dom=abi.DOMID_SELF, remote_dom=0, port=0)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_alloc_unbound, BUF) == 0
    assert domain.evtchn.calls == [("alloc_unbound", DOMID, 0)]
    assert get(memory, BUF, abi.EVTCHN_ALLOC_UNBOUND) == (abi.DOMID_SELF, 0, 11)


def test_evtchn_binds(hc, domain, memory):
    put(memory, BUF, abi.EVTCHN_BIND_INTERDOMAIN, remote_dom=abi.DOMID_SELF, remote_port=5, local_port=0)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_bind_interdomain, BUF) == 0
    assert get(memory, BUF, abi.EVTCHN_BIND_INTERDOMAIN).local_port == 12
    put(memory, BUF, abi.EVTCHN_BIND_VIRQ, virq=abi.VIRQ_TIMER, vcpu=1, port=0)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_bind_virq, BUF) == 0
    assert get(memory, BUF, abi.EVTCHN_BIND_VIRQ).port == 13
    put(memory, BUF, abi.EVTCHN_BIND_IPI, vcpu=1, port=0)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_bind_ipi, BUF) == 0
    assert get(memory, BUF, abi.EVTCHN_BIND_IPI).port == 14
    assert domain.evtchn.calls == [("bind_interdomain", DOMID, 5), ("bind_virq", 0, 1), ("bind_ipi", 1)]


@pytest.mark.parametrize(
    "op,layout,fields,expected",
    [
        (abi.EVTCHNOP_bind_virq, abi.EVTCHN_BIND_VIRQ, dict(virq=abi.NR_VIRQS, vcpu=0, port=0), -EINVAL),
        (abi.EVTCHNOP_bind_virq, abi.EVTCHN_BIND_VIRQ, dict(virq=0, vcpu=2, port=0), -ENOENT),
        (abi.EVTCHNOP_bind_ipi, abi.EVTCHN_BIND_IPI, dict(vcpu=0xFFFFFFFF, port=0), -ENOENT),
        (abi.EVTCHNOP_bind_vcpu, abi.EVTCHN_BIND_VCPU, dict(port=3, vcpu=2), -ENOENT),
    ],
)
def test_evtchn_vcpu_and_virq_checks(hc, domain, memory, op, layout, fields, expected):
    put(memory, BUF, layout, **fields)
    before = memory.read(BUF, layout.size(False))
    assert hc(abi.HYPERCALL_event_channel_op, op, BUF) == expected
    assert domain.evtchn.calls == []
    assert memory.read(BUF, layout.size(False)) == before


@pytest.mark.parametrize("op,name", [(abi.EVTCHNOP_close, "close"), (abi.EVTCHNOP_send, "send"), (abi.EVTCHNOP_unmask, "unmask")])
def test_evtchn_port_ops(hc, domain, memory, op, name):
    put(memory, BUF, abi.EVTCHN_PORT, port=9)
    assert hc(abi.HYPERCALL_event_channel_op, op, BUF) == 0
    assert domain.evtchn.calls == [(name, 9)]
    domain.evtchn.raises[name] = XenError(EINVAL)
    assert hc(abi.HYPERCALL_event_channel_op, op, BUF) == -EINVAL
    assert hc(abi.HYPERCALL_event_channel_op, op, UNMAPPED) == -EFAULT


def test_evtchn_bind_vcpu_and_reset(hc, domain, memory):
    put(memory, BUF, abi.EVTCHN_BIND_VCPU, port=3, vcpu=1)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_bind_vcpu, BUF) == 0
    put(memory, BUF, abi.EVTCHN_RESET, dom=abi.DOMID_SELF)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_reset, BUF) == 0
    assert domain.evtchn.calls == [("bind_vcpu", 3, 1), ("reset", DOMID)]


@pytest.mark.parametrize(
    "status,u0,u1",
    [
        (SimpleNamespace(status=abi.EVTCHNSTAT_interdomain, vcpu=1, remote_dom=0, remote_port=77, virq=0, pirq=0), 0, 77),
        (SimpleNamespace(status=abi.EVTCHNSTAT_unbound, vcpu=0, remote_dom=0x7FF0, remote_port=0, virq=0, pirq=0), 0x7FF0, 0),
        (SimpleNamespace(status=abi.EVTCHNSTAT_virq, vcpu=1, remote_dom=0, remote_port=0, virq=abi.VIRQ_TIMER, pirq=0), 0, 0),
        (SimpleNamespace(status=abi.EVTCHNSTAT_virq, vcpu=1, remote_dom=0, remote_port=0, virq=abi.VIRQ_CONSOLE, pirq=0), 2, 0),
        (SimpleNamespace(status=abi.EVTCHNSTAT_pirq, vcpu=0, remote_dom=0, remote_port=0, virq=0, pirq=33), 33, 0),
        (SimpleNamespace(status=abi.EVTCHNSTAT_ipi, vcpu=1, remote_dom=5, remote_port=5, virq=5, pirq=5), 0, 0),
        (SimpleNamespace(status=abi.EVTCHNSTAT_closed, vcpu=0, remote_dom=5, remote_port=5, virq=5, pirq=5), 0, 0),
    ],
)
def test_evtchn_status(hc, domain, memory, status, u0, u1):
    domain.evtchn.results["status"] = status
    put(memory, BUF, abi.EVTCHN_STATUS, dom=abi.DOMID_SELF, port=4, status=99, vcpu=99, u0=99, u1=99)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_status, BUF) == 0
    assert domain.evtchn.calls == [("status", DOMID, 4)]
    assert get(memory, BUF, abi.EVTCHN_STATUS) == (abi.DOMID_SELF, 4, status.status, status.vcpu, u0, u1)


def test_evtchn_errors_leave_the_struct_alone(hc, domain, memory):
    domain.evtchn.raises["alloc_unbound"] = XenError(errno.ENOSPC)
    put(memory, BUF, abi.EVTCHN_ALLOC_UNBOUND, dom=DOMID, remote_dom=0, port=0x5A5A)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_alloc_unbound, BUF) == -errno.ENOSPC
    assert get(memory, BUF, abi.EVTCHN_ALLOC_UNBOUND).port == 0x5A5A


def test_evtchn_read_only_struct_faults_before_allocating(hc, domain):
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_alloc_unbound, READONLY) == -EFAULT
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_status, READONLY) == -EFAULT
    assert domain.evtchn.calls == []


@pytest.mark.parametrize(
    "op", [abi.EVTCHNOP_init_control, abi.EVTCHNOP_bind_pirq, abi.EVTCHNOP_reset_cont, 15, 0xFFFFFFFF]
)
def test_evtchn_fifo_not_offered_and_unknown_ops(hc, domain, op):
    assert hc(abi.HYPERCALL_event_channel_op, op, BUF) == -ENOSYS
    assert domain.evtchn.calls == []


@pytest.mark.parametrize("gfn,offset,vcpu,expected", [
    (0x10, 0, 0, -ENOSYS),  # valid: FIFO is simply not offered
    ((1 << 64) - 2, 0, 0, -EINVAL),  # no such frame (XSA-188's probe)
    (RAM >> 12, 0, 0, -EINVAL),  # beyond RAM
    (0x10, 4, 0, -EINVAL),  # misaligned control block
    (0x10, 4096 - 64, 0, -EINVAL),  # runs past the page
    (0x10, 0, 2, -ENOENT),  # no such vCPU
])
def test_evtchn_init_control_checks_arguments_as_xen(hc, domain, memory, gfn, offset, vcpu, expected):
    put(memory, BUF, abi.EVTCHN_INIT_CONTROL, control_gfn=gfn, offset=offset, vcpu=vcpu, link_bits=0)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_init_control, BUF) == expected
    assert abi.EVTCHN_INIT_CONTROL.size(False) == abi.EVTCHN_INIT_CONTROL.size(True) == 24


def test_evtchn_fifo_ops_reach_the_event_channels(hc, domain, memory):
    domain.evtchn.fifo_offered = True
    put(memory, BUF, abi.EVTCHN_INIT_CONTROL, control_gfn=0x1234, offset=64, vcpu=1, link_bits=0)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_init_control, BUF) == 0
    assert get(memory, BUF, abi.EVTCHN_INIT_CONTROL).link_bits == 17
    put(memory, BUF, abi.EVTCHN_EXPAND_ARRAY, array_gfn=0x5678)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_expand_array, BUF) == 0
    put(memory, BUF, abi.EVTCHN_SET_PRIORITY, port=9, priority=3)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_set_priority, BUF) == 0
    assert domain.evtchn.calls == [("init_control", 1, 0x1234, 64), ("expand_array", 0x5678), ("set_priority", 9, 3)]
    domain.evtchn.raises["expand_array"] = XenError(EOPNOTSUPP)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_expand_array, BUF) == -EOPNOTSUPP
    # A refused init_control leaves the guest's structure alone.
    domain.evtchn.raises["init_control"] = XenError(EINVAL)
    put(memory, BUF, abi.EVTCHN_INIT_CONTROL, control_gfn=0x1234, offset=64, vcpu=1, link_bits=0)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_init_control, BUF) == -EINVAL
    assert get(memory, BUF, abi.EVTCHN_INIT_CONTROL).link_bits == 0


# --- grant_table_op ----------------------------------------------------------------------


def test_gnttab_set_version(hc, domain, memory):
    put(memory, BUF, abi.GNTTAB_SET_VERSION, version=1)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_set_version, BUF, 1) == 0
    assert domain.gnttab.calls == [("set_version", 1)]
    # A refused change still reports the version in use.
    domain.gnttab.raises["set_version"] = XenError(ENOSYS)
    put(memory, BUF, abi.GNTTAB_SET_VERSION, version=2)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_set_version, BUF, 1) == -ENOSYS
    assert get(memory, BUF, abi.GNTTAB_SET_VERSION).version == 1
    put(memory, BUF, abi.GNTTAB_SET_VERSION, version=3)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_set_version, BUF, 1) == -EINVAL
    assert get(memory, BUF, abi.GNTTAB_SET_VERSION).version == 1
    assert domain.gnttab.names() == ["set_version", "set_version", "get_version", "get_version"]


def test_gnttab_get_version(hc, memory):
    put(memory, BUF, abi.GNTTAB_GET_VERSION, dom=abi.DOMID_SELF, version=0)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_get_version, BUF, 1) == 0
    assert get(memory, BUF, abi.GNTTAB_GET_VERSION).version == 1
    put(memory, BUF, abi.GNTTAB_GET_VERSION, dom=5, version=0)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_get_version, BUF, 1) == -ESRCH
    put(memory, BUF, abi.GNTTAB_GET_VERSION, dom=0, version=0)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_get_version, BUF, 1) == -EPERM
    assert get(memory, BUF, abi.GNTTAB_GET_VERSION).version == 0


@pytest.mark.parametrize(
    "dom,expected",
    [(DOMID, (DOMID, 4, 64, abi.GNTST_okay)), (abi.DOMID_SELF, (abi.DOMID_SELF, 4, 64, 0)),
     (0, (0, 9, 9, abi.GNTST_permission_denied)), (42, (42, 9, 9, abi.GNTST_bad_domain))],
)
def test_gnttab_query_size(hc, memory, dom, expected):
    put(memory, BUF, abi.GNTTAB_QUERY_SIZE, dom=dom, nr_frames=9, max_nr_frames=9, status=5)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_query_size, BUF, 1) == 0
    assert get(memory, BUF, abi.GNTTAB_QUERY_SIZE) == expected


@pytest.mark.parametrize(
    "cmd,count,expected",
    [
        (abi.GNTTABOP_query_size, 0, -EINVAL),
        (abi.GNTTABOP_query_size, 2, -EINVAL),
        (abi.GNTTABOP_set_version, 0xFFFFFFFF, -EINVAL),
        (abi.GNTTABOP_map_grant_ref, 0x7FFFFFFF, -ENOSYS),  # no loop over a huge count
        (abi.GNTTABOP_copy, 0x80000000, -EINVAL),
        (abi.GNTTABOP_setup_table, 0, -EINVAL),
        (abi.GNTTABOP_setup_table, 2, -EINVAL),
        (abi.GNTTABOP_query_size | (1 << 12), 1, -EINVAL),  # continuation bits
        (0x123, 1, -ENOSYS),
    ],
)
def test_gnttab_refusals(hc, domain, memory, cmd, count, expected):
    put(memory, BUF, abi.GNTTAB_QUERY_SIZE, dom=DOMID, nr_frames=9, max_nr_frames=9, status=5)
    assert hc(abi.HYPERCALL_grant_table_op, cmd, BUF, count) == expected
    assert domain.gnttab.calls == []
    assert get(memory, BUF, abi.GNTTAB_QUERY_SIZE).status == 5


@ABIS
def test_gnttab_get_status_frames(hc, domain, memory, compat):
    domain.gnttab.results["nr_status_frames"] = 2
    domain.results["grant_status_gfns"] = lambda count: [0x1234, (1 << 64) - 1][:count]
    ok = dict(nr_frames=2, dom=abi.DOMID_SELF, status=5, frame_list=ARRAY)
    put(memory, BUF, abi.GNTTAB_GET_STATUS_FRAMES, compat, **ok)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_get_status_frames, BUF, 1, longmode=not compat) == 0
    assert get(memory, BUF, abi.GNTTAB_GET_STATUS_FRAMES, compat).status == abi.GNTST_okay
    assert struct.unpack("<2Q", bytes(memory.view(ARRAY, 16))) == (0x1234, (1 << 64) - 1)
    for fields, status in [(dict(nr_frames=3), abi.GNTST_general_error),  # more than the table has
                           (dict(dom=0), abi.GNTST_permission_denied), (dict(dom=9), abi.GNTST_bad_domain),
                           (dict(frame_list=READONLY), abi.GNTST_bad_virt_addr)]:
        put(memory, BUF, abi.GNTTAB_GET_STATUS_FRAMES, compat, **{**ok, **fields})
        assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_get_status_frames, BUF, 1, longmode=not compat) == 0
        assert get(memory, BUF, abi.GNTTAB_GET_STATUS_FRAMES, compat).status == status, fields
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_get_status_frames, READONLY, 1) == -EFAULT


INVALID_GFN = (1 << 64) - 1


def setup_table(memory, compat, dom=abi.DOMID_SELF, nr_frames=3, frame_list=ARRAY, status=5):
    """struct gnttab_setup_table by hand, padding filled with junk: dom u16
    at 0, nr_frames u32 at 4, status i16 at 8, the frame_list handle at 16
    (64-bit) or 12 (compat)."""
    if compat:
        data = struct.pack("<HHIhHI", dom, 0xAAAA, nr_frames, status, 0xBBBB, frame_list)
    else:
        data = struct.pack("<HHIhHIQ", dom, 0xAAAA, nr_frames, status, 0xBBBB, 0xCCCCCCCC, frame_list)
    memory.write(BUF, data)
    return data


def setup_status(memory):
    return struct.unpack_from("<h", memory.read(BUF + 8, 2))[0]


def frame_list(memory, compat, count, at=ARRAY):
    item = 4 if compat else 8
    return [int.from_bytes(memory.read(at + i * item, item), "little") for i in range(count)]


@ABIS
def test_gnttab_setup_table_tells_where_frames_are_mapped(hc, domain, memory, compat):
    assert abi.GNTTAB_SETUP_TABLE.size(compat) == (16 if compat else 24)
    domain.results["grant_frame_gfns"] = lambda count: [0x1234, INVALID_GFN, 0xFEFF0][:count]
    memory.write(ARRAY, b"\x55" * 32)
    data = setup_table(memory, compat)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1, longmode=not compat) == 0
    assert setup_status(memory) == abi.GNTST_okay
    invalid = 0xFFFFFFFF if compat else INVALID_GFN  # all ones in the guest's xen_pfn_t
    assert frame_list(memory, compat, 3) == [0x1234, invalid, 0xFEFF0]
    item = 4 if compat else 8
    assert memory.read(ARRAY + 3 * item, 4) == b"\x55" * 4  # nothing past nr_frames
    # Only the status changed (the padding and the handle are as the guest left them).
    assert memory.read(BUF, len(data)) == data[:8] + struct.pack("<h", 0) + data[10:]
    assert domain.gnttab.calls[-1] == ("grow", 3)
    assert ("grant_frame_gfns", 3) in domain.calls


@ABIS
def test_gnttab_setup_table_with_no_frames(hc, domain, memory, compat):
    domain.results["grant_frame_gfns"] = lambda count: []
    setup_table(memory, compat, nr_frames=0, frame_list=UNMAPPED)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1, longmode=not compat) == 0
    assert setup_status(memory) == abi.GNTST_okay


@ABIS
@pytest.mark.parametrize(
    "fields,status",
    [
        (dict(dom=0), abi.GNTST_permission_denied),  # Xen's XSM check refuses domain 0 to a guest
        (dict(dom=9), abi.GNTST_bad_domain),  # no such domain
        (dict(dom=abi.DOMID_IO), abi.GNTST_bad_domain),
        (dict(nr_frames=65), abi.GNTST_general_error),  # beyond max-grant-frames (64)
        (dict(nr_frames=0xFFFFFFFF), abi.GNTST_general_error),
    ],
)
def test_gnttab_setup_table_refusals_leave_the_table_alone(hc, domain, memory, compat, fields, status):
    domain.results["grant_frame_gfns"] = lambda count: [0x1234] * count
    memory.write(ARRAY, b"\x55" * 8)
    setup_table(memory, compat, **fields)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1, longmode=not compat) == 0
    assert setup_status(memory) == status
    assert "grow" not in domain.gnttab.names() and "grant_frame_gfns" not in domain.names()
    assert memory.read(ARRAY, 8) == b"\x55" * 8


def test_gnttab_setup_table_own_domid_and_the_limit(hc, domain, memory):
    domain.results["grant_frame_gfns"] = lambda count: [7] * count
    setup_table(memory, False, dom=DOMID, nr_frames=64)  # exactly max-grant-frames
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1) == 0
    assert setup_status(memory) == abi.GNTST_okay
    assert frame_list(memory, False, 64) == [7] * 64
    assert domain.gnttab.calls[-1] == ("grow", 64)


def test_gnttab_setup_table_compat_limit_is_xens_translation_area(hc, domain, memory):
    """A 32-bit guest gets at most 1021 frames, whatever max-grant-frames says."""
    domain.gnttab.results["query_size"] = (4, 4096)
    domain.results["grant_frame_gfns"] = lambda count: [7] * count
    setup_table(memory, True, nr_frames=1022)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1, longmode=False) == 0
    assert setup_status(memory) == abi.GNTST_general_error
    assert "grow" not in domain.gnttab.names()
    setup_table(memory, True, nr_frames=1021)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1, longmode=False) == 0
    assert setup_status(memory) == abi.GNTST_okay
    setup_table(memory, False, nr_frames=1022)  # a 64-bit guest has no such limit
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1) == 0
    assert setup_status(memory) == abi.GNTST_okay


def test_gnttab_setup_table_compat_gfn_too_big(hc, domain, memory):
    domain.results["grant_frame_gfns"] = lambda count: [0x1234, 1 << 32, 0x5678]
    memory.write(ARRAY, b"\x55" * 12)
    setup_table(memory, True)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1, longmode=False) == 0
    assert setup_status(memory) == abi.GNTST_address_too_big
    assert frame_list(memory, True, 3) == [0x1234, 0x55555555, 0x55555555]  # stopped there, never truncated
    setup_table(memory, False)  # a 64-bit guest's xen_pfn_t holds it
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1) == 0
    assert frame_list(memory, False, 3) == [0x1234, 1 << 32, 0x5678]


@ABIS
def test_gnttab_setup_table_unwritable_frame_list(hc, domain, memory, compat):
    """Xen does not check an HVM guest's handle beforehand: a list it cannot
    write is GNTST_bad_virt_addr, the frames before the fault written."""
    domain.results["grant_frame_gfns"] = lambda count: [0x1234] * count
    for at in (READONLY, UNMAPPED, OUTSIDE):
        setup_table(memory, compat, frame_list=at)
        assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1, longmode=not compat) == 0
        assert setup_status(memory) == abi.GNTST_bad_virt_addr, hex(at)
    item = 4 if compat else 8
    start = UNMAPPED - item  # the first frame fits below the unmapped page
    memory.write(start, b"\x55" * item)
    setup_table(memory, compat, frame_list=start)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1, longmode=not compat) == 0
    assert setup_status(memory) == abi.GNTST_bad_virt_addr
    assert frame_list(memory, compat, 1, at=start) == [0x1234]


@ABIS
def test_gnttab_setup_table_bad_structure(hc, domain, memory, compat):
    domain.results["grant_frame_gfns"] = lambda count: [0x1234] * count
    for at in (UNMAPPED, OUTSIDE):
        assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, at, 1, longmode=not compat) == -EFAULT
    assert domain.gnttab.calls == []
    # Readable but not writable: Xen does the work, then cannot write the status back.
    memory.write(READONLY, struct.pack("<HHIhHIQ", abi.DOMID_SELF, 0, 2, 5, 0, ARRAY, ARRAY))
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, READONLY, 1, longmode=not compat) == -EFAULT
    assert setup_status_at(memory, READONLY) == 5
    # The status writable, the rest of the structure not: Xen's compat
    # wrapper copies the whole structure back, the 64-bit path the status alone.
    at = READONLY2 - 10
    memory.write(at, struct.pack("<HHIhHIQ", abi.DOMID_SELF, 0, 2, 5, 0, ARRAY, ARRAY))
    expected = -EFAULT if compat else 0
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, at, 1, longmode=not compat) == expected
    assert setup_status_at(memory, at) == (5 if compat else abi.GNTST_okay)


def setup_status_at(memory, at):
    return struct.unpack_from("<h", memory.read(at + 8, 2))[0]


def test_gnttab_setup_table_grows_a_real_table(hc, domain, memory):
    """With the real grant table: the frames count from the call on, as
    GNTTABOP_query_size and the refs a copy may name see them."""
    from pyvmm.xen.hv.gnttab import GrantTable

    domain.gnttab = GrantTable(memory, max_frames=8)
    domain.results["grant_frame_gfns"] = lambda count: [INVALID_GFN] * count
    setup_table(memory, False, nr_frames=5)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1) == 0
    assert setup_status(memory) == abi.GNTST_okay
    assert domain.gnttab.query_size() == (5, 8)
    assert frame_list(memory, False, 5) == [INVALID_GFN] * 5
    setup_table(memory, False, nr_frames=2)  # never shrinks
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1) == 0
    assert domain.gnttab.query_size() == (5, 8)
    setup_table(memory, False, nr_frames=9)
    assert hc(abi.HYPERCALL_grant_table_op, abi.GNTTABOP_setup_table, BUF, 1) == 0
    assert setup_status(memory) == abi.GNTST_general_error
    assert domain.gnttab.query_size() == (5, 8)


def test_gnttab_bad_pointers(hc, domain):
    for op in (abi.GNTTABOP_set_version, abi.GNTTABOP_get_version, abi.GNTTABOP_query_size):
        assert hc(abi.HYPERCALL_grant_table_op, op, READONLY, 1) == -EFAULT
        assert hc(abi.HYPERCALL_grant_table_op, op, OUTSIDE, 1) == -EFAULT
    assert domain.gnttab.calls == []


# --- memory_op ---------------------------------------------------------------------------


@ABIS
def test_add_to_physmap(hc, domain, memory, compat):
    put(memory, BUF, abi.ADD_TO_PHYSMAP, compat, domid=abi.DOMID_SELF, size=0, space=abi.XENMAPSPACE_shared_info, idx=0, gpfn=0xFEFFA)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap, BUF, longmode=not compat) == 0
    put(memory, BUF, abi.ADD_TO_PHYSMAP, compat, domid=DOMID, size=0, space=abi.XENMAPSPACE_grant_table, idx=3, gpfn=0xF0003)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap, BUF, longmode=not compat) == 0
    assert [c for c in domain.calls if c[0].startswith("map_")] == [
        ("map_shared_info", 0xFEFFA), ("map_grant_frame", 3, 0xF0003)]


@pytest.mark.parametrize(
    "domid,space,idx,gpfn,expected",
    [
        (DOMID, abi.XENMAPSPACE_shared_info, 1, 0x100, -EINVAL),
        (DOMID, abi.XENMAPSPACE_grant_table, abi.XENMAPIDX_grant_table_status, 0x100, -EINVAL),
        (DOMID, abi.XENMAPSPACE_grant_table, 1 << 40, 0x100, -EINVAL),
        (DOMID, abi.XENMAPSPACE_grant_table, 0, 1 << 60, -EINVAL),
        (DOMID, abi.XENMAPSPACE_gmfn, 5, 0x100, -EINVAL),
        (DOMID, abi.XENMAPSPACE_gmfn_range, 5, 0x100, -EINVAL),
        (DOMID, abi.XENMAPSPACE_dev_mmio, 5, 0x100, -EINVAL),
        (DOMID, 0xFFFFFFFF, 5, 0x100, -EINVAL),
        (DOMID, abi.XENMAPSPACE_gmfn_foreign, 5, 0x100, -ENOSYS),
        (0, abi.XENMAPSPACE_shared_info, 0, 0x100, -ESRCH),
        (abi.DOMID_IO, abi.XENMAPSPACE_shared_info, 0, 0x100, -ESRCH),
    ],
)
def test_add_to_physmap_refusals(hc, domain, memory, domid, space, idx, gpfn, expected):
    put(memory, BUF, abi.ADD_TO_PHYSMAP, domid=domid, size=0, space=space, idx=idx, gpfn=gpfn)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap, BUF) == expected
    assert not any(name.startswith("map_") for name in domain.names())


def test_add_to_physmap_domain_errors_and_bad_pointer(hc, domain, memory):
    domain.raises["map_grant_frame"] = XenError(EINVAL)
    put(memory, BUF, abi.ADD_TO_PHYSMAP, domid=DOMID, size=0, space=abi.XENMAPSPACE_grant_table, idx=999, gpfn=1)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap, BUF) == -EINVAL
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap, UNMAPPED) == -EFAULT
    # Xen's continuation index: ignored when small, refused when it overflows.
    put(memory, BUF, abi.ADD_TO_PHYSMAP, domid=DOMID, size=0, space=abi.XENMAPSPACE_shared_info, idx=0, gpfn=1)
    assert hc(abi.HYPERCALL_memory_op, (1 << 16) << 6 | abi.XENMEM_add_to_physmap, BUF) == -errno.EDOM
    assert hc(abi.HYPERCALL_memory_op, (5 << 6) | abi.XENMEM_add_to_physmap, BUF) == 0


@ABIS
def test_remove_from_physmap(hc, domain, memory, compat):
    put(memory, BUF, abi.REMOVE_FROM_PHYSMAP, compat, domid=abi.DOMID_SELF, gpfn=0x1234)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_remove_from_physmap, BUF, longmode=not compat) == 0
    assert domain.calls[-1] == ("remove_from_physmap", 0x1234)
    domain.raises["remove_from_physmap"] = XenError(EINVAL)  # not an overlay page
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_remove_from_physmap, BUF, longmode=not compat) == -EINVAL
    put(memory, BUF, abi.REMOVE_FROM_PHYSMAP, compat, domid=0, gpfn=0x1234)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_remove_from_physmap, BUF, longmode=not compat) == -ESRCH
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_remove_from_physmap, UNMAPPED, longmode=not compat) == -EFAULT
    assert abi.REMOVE_FROM_PHYSMAP.size(False) == 16 and abi.REMOVE_FROM_PHYSMAP.size(True) == 8


@ABIS
@pytest.mark.parametrize("op,method", [(abi.XENMEM_decrease_reservation, "decrease_reservation"),
                                       (abi.XENMEM_populate_physmap, "populate_physmap")])
def test_reservation_counts_extents_done(hc, domain, memory, compat, op, method):
    item = "I" if compat else "Q"
    memory.write(ARRAY, struct.pack(f"<4{item}", 0x20, 0x22, 0x24, 0x26))

    def extents_done(gpfns, order):  # the extent at 0x24 cannot be done
        return gpfns.index(0x24) if 0x24 in gpfns else len(gpfns)

    domain.results[method] = extents_done

    def call(nr, order=1, domid=abi.DOMID_SELF, start=0, extents=ARRAY, flags=0):
        put(memory, BUF, abi.MEMORY_RESERVATION, compat, extent_start=extents, nr_extents=nr,
            extent_order=order, mem_flags=flags, domid=domid)
        return hc(abi.HYPERCALL_memory_op, start << 6 | op, BUF, longmode=not compat)

    assert call(4) == 2
    assert [c for c in domain.calls if c[0] == method] == [(method, [0x20, 0x22, 0x24, 0x26], 1)]  # one batch
    assert call(2, start=1) == 2  # Xen's continuation index counts in the result
    assert call(2, start=5) == 5  # nothing left to do
    calls = len(domain.calls)
    # What Xen refuses before looking at the extents: the continuation index, nothing done.
    assert call(4, order=10) == 0  # larger than a guest may ask
    assert call(4, start=1, domid=0) == 1  # another domain (Xen: not found, or not allowed)
    assert call(4, flags=abi.PAGE_SHIFT) == 0  # pages below 4 KiB of address width
    assert hc(abi.HYPERCALL_memory_op, 3 << 6 | op, UNMAPPED, longmode=not compat) == 3  # an unreadable request
    assert [c for c in domain.calls[calls:] if c[0] == method] == []
    assert call(4, flags=abi.PAGE_SHIFT + 1) == 2  # a width the pages fit in is no reason to refuse
    assert call(4, extents=UNMAPPED) == 0  # an unreadable list stops at once, as in Xen
    assert call(4, flags=abi.XENMEMF_populate_on_demand) == (0 if method == "populate_physmap" else 2)
    if method == "populate_physmap":
        memory.write(ARRAY, struct.pack(f"<{item}", 0x21))
        assert call(1) == 0  # an extent is aligned to its size
    assert abi.MEMORY_RESERVATION.size(False) == 32 and abi.MEMORY_RESERVATION.size(True) == 20


@ABIS
def test_increase_reservation_gives_nothing(hc, domain, memory, compat):
    memory.write(ARRAY, struct.pack("<4Q", 0x20, 0x21, 0x22, 0x23))
    put(memory, BUF, abi.MEMORY_RESERVATION, compat, extent_start=ARRAY, nr_extents=4, extent_order=0, mem_flags=0,
        domid=abi.DOMID_SELF)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_increase_reservation, BUF, longmode=not compat) == 0
    assert hc(abi.HYPERCALL_memory_op, 2 << 6 | abi.XENMEM_increase_reservation, BUF, longmode=not compat) == 2
    assert not {"decrease_reservation", "populate_physmap"} & set(domain.names())


def test_a_reservation_list_running_into_an_unmapped_page_stops_there(hc, domain, memory):
    memory.write(UNMAPPED - 12, struct.pack("<3I", 0x10, 0x11, 0x12))  # 0x12: the last entry before the page
    domain.results["decrease_reservation"] = lambda gpfns, order: len(gpfns)
    put(memory, BUF, abi.MEMORY_RESERVATION, True, extent_start=UNMAPPED - 12, nr_extents=5, extent_order=0,
        mem_flags=0, domid=abi.DOMID_SELF)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_decrease_reservation, BUF, longmode=False) == 3
    assert [c for c in domain.calls if c[0] == "decrease_reservation"] == [("decrease_reservation",
                                                                            [0x10, 0x11, 0x12], 0)]


@ABIS
def test_add_to_physmap_batch(hc, domain, memory, compat):
    item = "I" if compat else "Q"
    memory.write(ARRAY, struct.pack(f"<3{item}", 0, 1, 7))
    memory.write(ARRAY + 0x100, struct.pack(f"<3{item}", 0xA0, 0xA1, 0xA2))
    memory.write(ARRAY + 0x200, b"\xff" * 16)
    domain.raises["map_grant_frame"] = XenError(EINVAL)
    put(memory, BUF, abi.ADD_TO_PHYSMAP_BATCH, compat, domid=DOMID, space=abi.XENMAPSPACE_grant_table,
        size=3, res0=0, idxs=ARRAY, gpfns=ARRAY + 0x100, errs=ARRAY + 0x200)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap_batch, BUF, longmode=not compat) == 0
    assert struct.unpack("<4i", memory.read(ARRAY + 0x200, 16)) == (-EINVAL, -EINVAL, -EINVAL, -1)
    assert [c for c in domain.calls if c[0] == "map_grant_frame"] == [
        ("map_grant_frame", 0, 0xA0), ("map_grant_frame", 1, 0xA1), ("map_grant_frame", 7, 0xA2)]
    del domain.raises["map_grant_frame"]
    put(memory, BUF, abi.ADD_TO_PHYSMAP_BATCH, compat, domid=DOMID, space=abi.XENMAPSPACE_shared_info,
        size=2, res0=0, idxs=ARRAY, gpfns=ARRAY + 0x100, errs=ARRAY + 0x200)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap_batch, BUF, longmode=not compat) == 0
    assert struct.unpack("<2i", memory.read(ARRAY + 0x200, 8)) == (0, -EINVAL)


@pytest.mark.parametrize(
    "space,res0,idxs,errs,expected",
    [
        (abi.XENMAPSPACE_gmfn_range, 0, ARRAY, ARRAY + 0x200, -EOPNOTSUPP),
        (abi.XENMAPSPACE_gmfn_foreign, 0, ARRAY, ARRAY + 0x200, -ENOSYS),
        (abi.XENMAPSPACE_shared_info, 1, ARRAY, ARRAY + 0x200, -EINVAL),
        (abi.XENMAPSPACE_shared_info, 0, UNMAPPED, ARRAY + 0x200, -EFAULT),
        (abi.XENMAPSPACE_shared_info, 0, ARRAY, READONLY, -EFAULT),
        (abi.XENMAPSPACE_shared_info, 0, ARRAY, RAM - 4, -EFAULT),
    ],
)
def test_add_to_physmap_batch_refusals(hc, domain, memory, space, res0, idxs, errs, expected):
    put(memory, BUF, abi.ADD_TO_PHYSMAP_BATCH, domid=DOMID, space=space, size=2, res0=res0,
        idxs=idxs, gpfns=ARRAY + 0x100, errs=errs)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap_batch, BUF) == expected
    assert not any(name.startswith("map_") for name in domain.names())


def test_add_to_physmap_batch_largest_size(hc, domain, memory):
    # 65535 entries: bounded work, and the arrays run past RAM here.
    put(memory, BUF, abi.ADD_TO_PHYSMAP_BATCH, domid=DOMID, space=abi.XENMAPSPACE_shared_info,
        size=0xFFFF, res0=0, idxs=RAM - 0x1000, gpfns=ARRAY, errs=ARRAY)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_add_to_physmap_batch, BUF) == -EFAULT


@pytest.mark.parametrize(
    "op", [abi.XENMEM_memory_map, abi.XENMEM_maximum_ram_page, abi.XENMEM_current_reservation,
           abi.XENMEM_get_pod_target, abi.XENMEM_acquire_resource, 63]
)
def test_memory_ops_not_provided(hc, op):
    assert hc(abi.HYPERCALL_memory_op, op, BUF) == -ENOSYS


# --- physdev_op, vm_assist, set_timer_op -------------------------------------------------


@pytest.mark.parametrize("op", [abi.PHYSDEVOP_map_pirq, abi.PHYSDEVOP_eoi, abi.PHYSDEVOP_get_free_pirq, 999])
def test_physdev_op_is_not_provided(hc, op):
    assert hc(abi.HYPERCALL_physdev_op, op, BUF) == -ENOSYS


def test_set_timer_op(hc, domain):
    assert hc(abi.HYPERCALL_set_timer_op, 5 * MS, vcpu=1) == 0
    assert domain.calls[-1] == ("set_timer_op", 1, 5 * MS)
    assert hc(abi.HYPERCALL_set_timer_op, 0) == 0
    assert domain.calls[-1] == ("set_timer_op", 0, 0)
    # A 32-bit guest splits the time over two registers.
    assert hc(abi.HYPERCALL_set_timer_op, 0x89ABCDEF, 0x1, longmode=False) == 0
    assert domain.calls[-1] == ("set_timer_op", 0, 0x1_89AB_CDEF)
    # Without a clock a negative time can only be "already past".
    assert hc(abi.HYPERCALL_set_timer_op, (1 << 64) - 1) == 0
    assert domain.calls[-1] == ("set_timer_op", 0, 1)


def test_set_timer_op_absurd_timeouts_become_100ms(domain, memory):
    now = 10**12
    dispatcher = HypercallDispatcher(domain, xen_time_ns=lambda: now)
    access = GuestAccess(identity, memory)

    def timer_op(*params, longmode=True):
        exit = FakeExit(abi.HYPERCALL_set_timer_op, *params, longmode=longmode)
        dispatcher.handle(exit, 0, access)
        assert exit.result == 0
        return domain.calls[-1][2]

    assert timer_op(now + 5 * MS) == now + 5 * MS
    assert timer_op(now - 5 * MS) == now - 5 * MS  # past: fires at once
    assert timer_op(now + (1 << 50) - 1) == now + (1 << 50) - 1
    assert timer_op(now + (1 << 50)) == now + 100 * MS
    assert timer_op((1 << 64) - 1) == now + 100 * MS
    assert timer_op(0xFFFFFFFF, 0xFFFFFFFF, longmode=False) == now + 100 * MS


# --- hostile guests ----------------------------------------------------------------------

_handled = [abi.HYPERCALL_set_timer_op, abi.HYPERCALL_xen_version, abi.HYPERCALL_console_io,
            abi.HYPERCALL_memory_op, abi.HYPERCALL_grant_table_op, abi.HYPERCALL_vcpu_op,
            abi.HYPERCALL_sched_op, abi.HYPERCALL_event_channel_op, abi.HYPERCALL_physdev_op,
            abi.HYPERCALL_hvm_op]
_u64 = st.integers(0, (1 << 64) - 1)
_pointer = st.one_of(st.sampled_from([0, BUF, BUF + 0xFC0, UNMAPPED, READONLY, OUTSIDE, RAM - 8]), _u64)
_param = st.one_of(st.integers(0, 40), _pointer, _u64)
# Mostly plausible shapes (op, pointer, ...), sometimes anything at all.
_params = st.one_of(
    st.tuples(st.integers(0, 30), _pointer, _param, _param, _param, _param),
    st.tuples(st.integers(0, 30), st.integers(0, 3), _pointer, _param, _param, _param),
    st.lists(_param, min_size=6, max_size=6),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    number=st.one_of(st.sampled_from(_handled), _u64),
    params=_params,
    longmode=st.booleans(),
    buffer=st.binary(min_size=64, max_size=64),
    fail=st.sampled_from([None, XenError(EINVAL), XenError(ENOSYS)]),
)
# increase_reservation with the largest continuation index: Xen answers with that index.
@example(number=abi.HYPERCALL_memory_op, params=[(1 << 64) - 1 - abi.MEMOP_CMD_MASK, 0, 0, 0, 0, 0],
         longmode=True, buffer=bytes(64), fail=None)
def test_hostile_hypercalls_always_get_an_answer(memory, number, params, longmode, buffer, fail):
    domain = FakeDomain()
    if fail is not None:
        for name in ("shutdown", "poll", "map_grant_frame", "hvm_get_param", "register_vcpu_info"):
            domain.raises[name] = fail
        domain.evtchn.raises["status"] = fail
        domain.gnttab.raises["set_version"] = fail
    memory.write(BUF, buffer)
    memory.write(BUF + 0xFC0, buffer)  # a struct may run into the next page
    dispatcher = HypercallDispatcher(domain, xen_time_ns=lambda: 10**12)
    exit = FakeExit(number, *params, longmode=longmode)
    dispatcher.handle(exit, 1, GuestAccess(identity, memory))
    assert isinstance(exit.result, int)
    # An error, or a count; memory_op's reservations answer with Xen's
    # continuation index (cmd >> MEMOP_EXTENT_SHIFT), as Xen does, so up to 2^58.
    largest = 1 << (64 - abi.MEMOP_EXTENT_SHIFT) if number == abi.HYPERCALL_memory_op else 1 << 32
    assert -4096 < exit.result < largest
    assert memory.read(READONLY, 64) == bytes(64)
    # Refusing is fine; tripping over our own code is not.
    assert not [key for key in dispatcher._complain._seen if isinstance(key, tuple) and key[0] == "crash"]


# --- --stats: event-channel sends counted per vCPU ----------------------------------


def test_counted_sends_go_to_the_sending_vcpus_counters(hc, domain, memory):
    from pyvmm.core.stats import Counters

    vcpus = [Counters(), Counters()]
    hc.dispatcher.count_sends(vcpus)
    put(memory, BUF, abi.EVTCHN_PORT, port=9)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_send, BUF, vcpu=1) == 0
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_send, BUF, vcpu=1) == 0
    domain.evtchn.raises["send"] = XenError(EINVAL)
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_send, BUF, vcpu=0) == -EINVAL
    assert [name for name in domain.evtchn.names() if name == "send"] == ["send"] * 3
    assert vcpus[1].counters[("evtchn-send", "port 9: interdomain (to a backend)")][0] == 2
    assert vcpus[0].counters[("evtchn-send", "port 9: interdomain (to a backend)")][0] == 1  # refused, still counted
    # The other sub-ops are handled as before.
    assert hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_unmask, BUF) == 0
    assert domain.evtchn.calls[-1] == ("unmask", 9)


def test_counted_send_names_a_loopback_and_a_bad_port(hc, domain, memory):
    from pyvmm.core.stats import Counters

    vcpus = [Counters()]
    hc.dispatcher.count_sends(vcpus)
    domain.evtchn.results["status"] = SimpleNamespace(status=abi.EVTCHNSTAT_interdomain, vcpu=0, remote_dom=DOMID,
                                                      remote_port=4, virq=0, pirq=0)
    put(memory, BUF, abi.EVTCHN_PORT, port=3)
    hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_send, BUF)
    domain.evtchn.raises["status"] = XenError(EINVAL)
    hc(abi.HYPERCALL_event_channel_op, abi.EVTCHNOP_send, BUF)
    assert {detail for _, detail in vcpus[0].counters} == {"port 3: interdomain (loopback)", "invalid port"}


def test_reservation_refuses_more_extents_than_xen_can_count(hc, domain, memory):
    domain.results["decrease_reservation"] = lambda gpfns, order: len(gpfns)
    put(memory, BUF, abi.MEMORY_RESERVATION, extent_start=ARRAY, nr_extents=(0xFFFF_FFFF >> 6) + 1,
        extent_order=0, mem_flags=0, domid=abi.DOMID_SELF)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_decrease_reservation, BUF) == 0
    assert "decrease_reservation" not in domain.names()


def test_a_long_reservation_stops_for_a_pause_and_ends_when_the_vm_stops(hc, domain, memory):
    memory.write(ARRAY, struct.pack("<1300Q", *range(0x40, 0x40 + 1300)))
    domain.results["populate_physmap"] = lambda gpfns, order: len(gpfns)
    stopping = []
    domain.results["preempt"] = lambda vcpu: len(stopping) > 0
    put(memory, BUF, abi.MEMORY_RESERVATION, extent_start=ARRAY, nr_extents=1300,
        extent_order=0, mem_flags=0, domid=abi.DOMID_SELF)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_populate_physmap, BUF, vcpu=1) == 1300
    # Batches of 512 (a page of Linux's frame numbers), a pause let in between them.
    assert [len(c[1]) for c in domain.calls if c[0] == "populate_physmap"] == [512, 512, 276]
    assert domain.names().count("preempt") == 2
    assert ("preempt", 1) in domain.calls
    stopping.append(True)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_populate_physmap, BUF) == 512


def test_vcpu_up_down_is_up(hc, domain):
    domain.results["vcpu_is_up"] = lambda vcpu: vcpu == 0
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_is_up, 0, 0) == 1
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_is_up, 1, 0) == 0
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_down, 1, 0) == 0
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_up, 1, 0, vcpu=0) == 0
    assert [c for c in domain.calls if c[0] in ("vcpu_down", "vcpu_up")] == [("vcpu_down", 1), ("vcpu_up", 1)]
    domain.raises["vcpu_up"] = XenError(EINVAL)
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_up, 1, 0) == -EINVAL
    assert hc(abi.HYPERCALL_vcpu_op, abi.VCPUOP_down, 5, 0) == -ENOENT


def test_a_reservation_list_with_a_bad_entry_stops_there(hc, domain, memory):
    memory.write(ARRAY, struct.pack("<4Q", 0x10, 0x11, 1 << 41, 0x12))
    domain.results["decrease_reservation"] = lambda gpfns, order: len(gpfns)
    put(memory, BUF, abi.MEMORY_RESERVATION, extent_start=ARRAY, nr_extents=4,
        extent_order=0, mem_flags=0, domid=abi.DOMID_SELF)
    assert hc(abi.HYPERCALL_memory_op, abi.XENMEM_decrease_reservation, BUF) == 2
    assert [c for c in domain.calls if c[0] == "decrease_reservation"] == [("decrease_reservation", [0x10, 0x11], 0)]
