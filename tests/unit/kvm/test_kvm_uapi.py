"""The cffi declarations must match the kernel's x86-64 layouts byte for byte,
and the ioctl numbers must be the kernel's (values from linux/kvm.h and
KVM's API documentation)."""

import pytest

from pyvmm.kvm import uapi
from pyvmm.kvm.uapi import ffi

SIZES = {
    "struct kvm_regs": 144,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_msr_list": 4,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_irq_level": 8,
    "struct kvm_msi": 32,
    "struct kvm_irqfd": 32,
    "struct kvm_ioeventfd": 64,
    "struct kvm_pit_config": 64,
    "struct kvm_enable_cap": 104,
    "struct kvm_irq_routing_entry": 48,
    "struct kvm_irq_routing": 8,
    "struct kvm_irq_routing_xen_evtchn": 12,
    "struct kvm_msr_filter_range": 24,
    "struct kvm_msr_filter": 392,
    "struct kvm_xen_hvm_config": 56,
    "struct kvm_xen_hvm_attr": 72,
    "struct kvm_xen_vcpu_attr": 72,
    "struct kvm_translation": 24,
    "struct kvm_guest_debug": 72,
    "struct kvm_lapic_state": 1024,
    "struct kvm_sregs2": 320,
    "struct kvm_xsave": 4096,
    "struct kvm_xcrs": 392,
    "struct kvm_vcpu_events": 64,
    "struct kvm_debugregs": 128,
    "struct kvm_irqchip": 520,
    "struct kvm_pit_channel_state": 24,
    "struct kvm_pit_state2": 112,
    "struct kvm_mp_state": 4,
    "struct kvm_clock_data": 48,
    "struct kvm_debug_exit_arch": 32,
    "struct kvm_run": 2352,
}


@pytest.mark.parametrize("ctype,size", SIZES.items())
def test_struct_size(ctype, size):
    assert ffi.sizeof(ctype) == size


OFFSETS = [
    ("struct kvm_regs", ("rip",), 128),
    ("struct kvm_regs", ("rflags",), 136),
    ("struct kvm_segment", ("selector",), 12),
    ("struct kvm_segment", ("type",), 14),
    ("struct kvm_segment", ("unusable",), 22),
    ("struct kvm_sregs", ("tr",), 144),
    ("struct kvm_sregs", ("gdt",), 192),
    ("struct kvm_sregs", ("idt",), 208),
    ("struct kvm_sregs", ("cr0",), 224),
    ("struct kvm_sregs", ("efer",), 264),
    ("struct kvm_sregs", ("apic_base",), 272),
    ("struct kvm_sregs", ("interrupt_bitmap",), 280),
    ("struct kvm_fpu", ("last_ip",), 136),
    ("struct kvm_fpu", ("xmm",), 152),
    ("struct kvm_fpu", ("mxcsr",), 408),
    ("struct kvm_msrs", ("entries",), 8),
    ("struct kvm_msr_entry", ("data",), 8),
    ("struct kvm_cpuid2", ("entries",), 8),
    ("struct kvm_cpuid_entry2", ("edx",), 24),
    ("struct kvm_userspace_memory_region", ("guest_phys_addr",), 8),
    ("struct kvm_userspace_memory_region", ("userspace_addr",), 24),
    ("struct kvm_irq_level", ("level",), 4),
    ("struct kvm_irqfd", ("resamplefd",), 12),
    ("struct kvm_ioeventfd", ("len",), 16),
    ("struct kvm_ioeventfd", ("fd",), 20),
    ("struct kvm_ioeventfd", ("flags",), 24),
    ("struct kvm_enable_cap", ("args",), 8),
    ("struct kvm_clock_data", ("realtime",), 16),
    ("struct kvm_clock_data", ("host_tsc",), 24),
    ("struct kvm_sregs2", ("apic_base",), 272),
    ("struct kvm_sregs2", ("flags",), 280),
    ("struct kvm_sregs2", ("pdptrs",), 288),
    ("struct kvm_xcrs", ("xcrs",), 8),
    ("struct kvm_xcrs", ("padding",), 264),
    ("struct kvm_vcpu_events", ("interrupt",), 8),
    ("struct kvm_vcpu_events", ("nmi",), 12),
    ("struct kvm_vcpu_events", ("sipi_vector",), 16),
    ("struct kvm_vcpu_events", ("flags",), 20),
    ("struct kvm_vcpu_events", ("smi",), 24),
    ("struct kvm_vcpu_events", ("triple_fault",), 28),
    ("struct kvm_vcpu_events", ("exception_has_payload",), 55),
    ("struct kvm_vcpu_events", ("exception_payload",), 56),
    ("struct kvm_debugregs", ("dr6",), 32),
    ("struct kvm_debugregs", ("flags",), 48),
    ("struct kvm_irqchip", ("chip",), 8),
    ("struct kvm_pit_channel_state", ("count_load_time",), 16),
    ("struct kvm_pit_state2", ("flags",), 72),
    ("struct kvm_irq_routing_entry", ("u",), 16),
    ("struct kvm_irq_routing_entry", ("u", "msi", "data"), 24),
    ("struct kvm_irq_routing_entry", ("u", "xen_evtchn", "priority"), 24),
    ("struct kvm_msr_filter", ("ranges",), 8),
    ("struct kvm_msr_filter_range", ("bitmap",), 16),
    # Xen (see the reference tables)
    ("struct kvm_xen_hvm_config", ("msr",), 4),
    ("struct kvm_xen_hvm_config", ("blob_addr_32",), 8),
    ("struct kvm_xen_hvm_config", ("blob_addr_64",), 16),
    ("struct kvm_xen_hvm_config", ("blob_size_32",), 24),
    ("struct kvm_xen_hvm_config", ("blob_size_64",), 25),
    ("struct kvm_xen_hvm_attr", ("u",), 8),
    ("struct kvm_xen_hvm_attr", ("u", "shared_info", "gfn"), 8),
    ("struct kvm_xen_hvm_attr", ("u", "evtchn", "type"), 12),
    ("struct kvm_xen_hvm_attr", ("u", "evtchn", "flags"), 16),
    ("struct kvm_xen_hvm_attr", ("u", "evtchn", "deliver", "port", "port"), 20),
    ("struct kvm_xen_hvm_attr", ("u", "evtchn", "deliver", "port", "vcpu"), 24),
    ("struct kvm_xen_hvm_attr", ("u", "evtchn", "deliver", "port", "priority"), 28),
    ("struct kvm_xen_hvm_attr", ("u", "evtchn", "deliver", "eventfd", "fd"), 24),
    ("struct kvm_xen_vcpu_attr", ("u", "runstate", "state_entry_time"), 16),
    ("struct kvm_xen_vcpu_attr", ("u", "runstate", "time_offline"), 48),
    ("struct kvm_xen_vcpu_attr", ("u", "timer", "priority"), 12),
    ("struct kvm_xen_vcpu_attr", ("u", "timer", "expires_ns"), 16),
    # kvm_run
    ("struct kvm_run", ("immediate_exit",), 1),
    ("struct kvm_run", ("exit_reason",), 8),
    ("struct kvm_run", ("cr8",), 16),
    ("struct kvm_run", ("apic_base",), 24),
    ("struct kvm_run", ("io", "direction"), 32),
    ("struct kvm_run", ("io", "size"), 33),
    ("struct kvm_run", ("io", "port"), 34),
    ("struct kvm_run", ("io", "count"), 36),
    ("struct kvm_run", ("io", "data_offset"), 40),
    ("struct kvm_run", ("mmio", "phys_addr"), 32),
    ("struct kvm_run", ("mmio", "data"), 40),
    ("struct kvm_run", ("mmio", "len"), 48),
    ("struct kvm_run", ("mmio", "is_write"), 52),
    ("struct kvm_run", ("msr", "error"), 32),
    ("struct kvm_run", ("msr", "reason"), 40),
    ("struct kvm_run", ("msr", "index"), 44),
    ("struct kvm_run", ("msr", "data"), 48),
    ("struct kvm_run", ("xen", "type"), 32),
    ("struct kvm_run", ("xen", "u", "hcall", "longmode"), 40),
    ("struct kvm_run", ("xen", "u", "hcall", "cpl"), 44),
    ("struct kvm_run", ("xen", "u", "hcall", "input"), 48),
    ("struct kvm_run", ("xen", "u", "hcall", "result"), 56),
    ("struct kvm_run", ("xen", "u", "hcall", "params"), 64),
    ("struct kvm_run", ("internal", "data"), 40),
    ("struct kvm_run", ("system_event", "data"), 40),
    ("struct kvm_run", ("fail_entry", "cpu"), 40),
    ("struct kvm_run", ("debug", "arch", "pc"), 40),
    ("struct kvm_run", ("kvm_valid_regs",), 288),
    ("struct kvm_run", ("kvm_dirty_regs",), 296),
    ("struct kvm_run", ("s",), 304),
]


@pytest.mark.parametrize("ctype,fields,offset", OFFSETS, ids=lambda v: ".".join(v) if isinstance(v, tuple) else str(v))
def test_field_offset(ctype, fields, offset):
    assert ffi.offsetof(ctype, *fields) == offset


IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_SET_GSI_ROUTING": 0x4008AE6A,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_XEN_HVM_CONFIG": 0x4038AE7A,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_X86_SET_MSR_FILTER": 0x4188AEC6,
    "KVM_XEN_HVM_GET_ATTR": 0xC048AEC8,
    "KVM_XEN_HVM_SET_ATTR": 0x4048AEC9,
    "KVM_XEN_VCPU_GET_ATTR": 0xC048AECA,
    "KVM_XEN_VCPU_SET_ATTR": 0x4048AECB,
    "KVM_XEN_HVM_EVTCHN_SEND": 0x400CAED0,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_TRANSLATE": 0xC018AE85,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
    # the snapshot's (values from linux/kvm.h, checked with the C header)
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_SET_TSC_KHZ": 0xAEA2,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_SREGS2": 0x8140AECC,
    "KVM_SET_SREGS2": 0x4140AECD,
    "KVM_GET_XSAVE2": 0x9000AECF,
    "KVM_GET_STATS_FD": 0xAECE,
}


@pytest.mark.parametrize("name,number", IOCTLS.items())
def test_ioctl_number(name, number):
    request = getattr(uapi, name)
    assert request == number
    assert request.name == name


def test_every_declared_ioctl_is_checked():
    declared = {n for n, v in vars(uapi).items() if isinstance(v, uapi.Ioctl)}
    assert declared == set(IOCTLS)


def test_exit_reasons_match_the_kernel():
    assert (uapi.KVM_EXIT_IO, uapi.KVM_EXIT_HLT, uapi.KVM_EXIT_MMIO) == (2, 5, 6)
    assert (uapi.KVM_EXIT_SHUTDOWN, uapi.KVM_EXIT_FAIL_ENTRY, uapi.KVM_EXIT_INTERNAL_ERROR) == (8, 9, 17)
    assert (uapi.KVM_EXIT_X86_RDMSR, uapi.KVM_EXIT_X86_WRMSR, uapi.KVM_EXIT_XEN) == (29, 30, 34)


def test_xen_settable_flags_exclude_capability_only_bits():
    assert uapi.KVM_XEN_HVM_SETTABLE_FLAGS == 0b1010_0010
    assert not uapi.KVM_XEN_HVM_SETTABLE_FLAGS & uapi.KVM_XEN_HVM_CONFIG_HYPERCALL_MSR


def test_as_struct_builds_nested_unions_from_dicts():
    attr = uapi.as_struct(
        "struct kvm_xen_hvm_attr *",
        {"type": uapi.KVM_XEN_ATTR_TYPE_SHARED_INFO, "u": {"shared_info": {"gfn": 0x1234}}},
    )
    raw = bytes(ffi.buffer(attr))
    assert raw[0:2] == b"\x01\x00"
    assert int.from_bytes(raw[8:16], "little") == 0x1234
    assert uapi.as_struct("struct kvm_xen_hvm_attr *", attr) is attr


def test_enable_cap_struct_refuses_more_than_four_args():
    cap = uapi.enable_cap_struct(uapi.KVM_CAP_X86_USER_SPACE_MSR, [7])
    assert (cap.cap, cap.args[0], cap.args[1]) == (188, 7, 0)
    with pytest.raises(ValueError):
        uapi.enable_cap_struct(1, [1, 2, 3, 4, 5])
