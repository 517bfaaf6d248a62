"""Xen's guest ABI: hypercall and sub-op numbers, constants and structures.

The numbers are those of Xen's public headers (xen.h, version.h, memory.h,
hvm/hvm_op.h, hvm/params.h, vcpu.h, sched.h, event_channel.h,
grant_table.h, physdev.h, features.h). Structures are described once per
ABI: a 64-bit guest uses the native x86-64 layout, a 32-bit guest the
"compat" layout, where `unsigned long`, `xen_ulong_t`, `xen_pfn_t` and guest
handles are 32 bits and 64-bit integers are only 4-byte aligned.
"""

from __future__ import annotations

import struct
from collections import namedtuple

from ..core.layout import PAGE_SHIFT, PAGE_SIZE  # Xen's page on x86 is the CPU's


# A guest-physical address meaning "no area" (KVM's convention for its attributes).
INVALID_GPA = (1 << 64) - 1

# --- hypercall numbers (xen.h) ------------------------------------------------------

HYPERCALL_set_trap_table = 0
HYPERCALL_mmu_update = 1
HYPERCALL_set_gdt = 2
HYPERCALL_stack_switch = 3
HYPERCALL_set_callbacks = 4
HYPERCALL_fpu_taskswitch = 5
HYPERCALL_sched_op_compat = 6
HYPERCALL_platform_op = 7
HYPERCALL_set_debugreg = 8
HYPERCALL_get_debugreg = 9
HYPERCALL_update_descriptor = 10
HYPERCALL_memory_op = 12
HYPERCALL_multicall = 13
HYPERCALL_update_va_mapping = 14
HYPERCALL_set_timer_op = 15
HYPERCALL_event_channel_op_compat = 16
HYPERCALL_xen_version = 17
HYPERCALL_console_io = 18
HYPERCALL_physdev_op_compat = 19
HYPERCALL_grant_table_op = 20
HYPERCALL_vm_assist = 21
HYPERCALL_update_va_mapping_otherdomain = 22
HYPERCALL_iret = 23
HYPERCALL_vcpu_op = 24
HYPERCALL_set_segment_base = 25
HYPERCALL_mmuext_op = 26
HYPERCALL_xsm_op = 27
HYPERCALL_nmi_op = 28
HYPERCALL_sched_op = 29
HYPERCALL_callback_op = 30
HYPERCALL_xenoprof_op = 31
HYPERCALL_event_channel_op = 32
HYPERCALL_physdev_op = 33
HYPERCALL_hvm_op = 34
HYPERCALL_sysctl = 35
HYPERCALL_domctl = 36
HYPERCALL_kexec_op = 37
HYPERCALL_tmem_op = 38
HYPERCALL_argo_op = 39
HYPERCALL_xenpmu_op = 40
HYPERCALL_dm_op = 41
HYPERCALL_hypfs_op = 42
HYPERCALL_arch_0 = 48
HYPERCALL_arch_1 = 49
HYPERCALL_arch_2 = 50
HYPERCALL_arch_3 = 51
HYPERCALL_arch_4 = 52
HYPERCALL_arch_5 = 53
HYPERCALL_arch_6 = 54
HYPERCALL_arch_7 = 55

# One hypercall page holds 128 32-byte stubs; nothing above that can be called.
NR_HYPERCALLS = 128

# --- xen_version (version.h, features.h) --------------------------------------------

XENVER_version = 0
XENVER_extraversion = 1
XENVER_compile_info = 2
XENVER_capabilities = 3
XENVER_changeset = 4
XENVER_platform_parameters = 5
XENVER_get_features = 6
XENVER_pagesize = 7
XENVER_guest_handle = 8
XENVER_commandline = 9
XENVER_build_id = 10
XENVER_extraversion2 = 11
XENVER_capabilities2 = 12
XENVER_changeset2 = 13
XENVER_commandline2 = 14

XEN_EXTRAVERSION_LEN = 16
XEN_CAPABILITIES_INFO_LEN = 1024
XEN_CHANGESET_INFO_LEN = 64
XEN_COMMANDLINE_LEN = 1024
XEN_DOMAIN_HANDLE_LEN = 16

XENFEAT_writable_page_tables = 0
XENFEAT_writable_descriptor_tables = 1
XENFEAT_auto_translated_physmap = 2
XENFEAT_supervisor_mode_kernel = 3
XENFEAT_pae_pgdir_above_4gb = 4
XENFEAT_mmu_pt_update_preserve_ad = 5
XENFEAT_highmem_assist = 6
XENFEAT_gnttab_map_avail_bits = 7
XENFEAT_hvm_callback_vector = 8
XENFEAT_hvm_safe_pvclock = 9
XENFEAT_hvm_pirqs = 10
XENFEAT_dom0 = 11
XENFEAT_grant_map_identity = 12
XENFEAT_memory_op_vnode_supported = 13
XENFEAT_ARM_SMCCC_supported = 14
XENFEAT_linux_rsdp_unrestricted = 15
XENFEAT_not_direct_mapped = 16
XENFEAT_direct_mapped = 17
XENFEAT_runstate_phys_area = 18
XENFEAT_vcpu_time_phys_area = 19
XENFEAT_dm_msix_all_writes = 20
XENFEAT_NR_SUBMAPS = 1

# --- console_io, vm_assist ------------------------------------------------------------

CONSOLEIO_write = 0
CONSOLEIO_read = 1

VMASST_CMD_enable = 0
VMASST_CMD_disable = 1
VMASST_TYPE_runstate_update_flag = 5

# --- domains ----------------------------------------------------------------------------

DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_ANY = 0x7FF5
DOMID_IDLE = 0x7FFF

# --- memory_op (memory.h) -------------------------------------------------------------

XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_maximum_ram_page = 2
XENMEM_current_reservation = 3
XENMEM_maximum_reservation = 4
XENMEM_machphys_mfn_list = 5
XENMEM_populate_physmap = 6
XENMEM_add_to_physmap = 7
XENMEM_memory_map = 9
XENMEM_machine_memory_map = 10
XENMEM_exchange = 11
XENMEM_machphys_mapping = 12
XENMEM_set_memory_map = 13
XENMEM_maximum_gpfn = 14
XENMEM_remove_from_physmap = 15
XENMEM_set_pod_target = 16
XENMEM_get_pod_target = 17
XENMEM_get_sharing_freed_pages = 18
XENMEM_get_sharing_shared_pages = 19
XENMEM_paging_op = 20
XENMEM_access_op = 21
XENMEM_sharing_op = 22
XENMEM_add_to_physmap_batch = 23
XENMEM_claim_pages = 24
XENMEM_machphys_compat_mfn_list = 25
XENMEM_get_vnumainfo = 26
XENMEM_reserved_device_memory_map = 27
XENMEM_acquire_resource = 28

# The low 6 bits of memory_op's cmd are the op; the rest is Xen's own
# continuation state (start_extent), which a guest has no reason to set.
MEMOP_EXTENT_SHIFT = 6
MEMOP_CMD_MASK = (1 << MEMOP_EXTENT_SHIFT) - 1

XENMAPSPACE_shared_info = 0
XENMAPSPACE_grant_table = 1
XENMAPSPACE_gmfn = 2
XENMAPSPACE_gmfn_range = 3
XENMAPSPACE_gmfn_foreign = 4
XENMAPSPACE_dev_mmio = 5
XENMAPIDX_grant_table_status = 0x80000000

# --- hvm_op (hvm/hvm_op.h, hvm/params.h) -----------------------------------------------

HVMOP_set_param = 0
HVMOP_get_param = 1
HVMOP_set_pci_intx_level = 2
HVMOP_set_isa_irq_level = 3
HVMOP_set_pci_link_route = 4
HVMOP_flush_tlbs = 5
HVMOP_track_dirty_vram = 6
HVMOP_modified_memory = 7
HVMOP_set_mem_type = 8
HVMOP_pagetable_dying = 9
HVMOP_get_time = 10
HVMOP_xentrace = 11
HVMOP_set_mem_access = 12
HVMOP_get_mem_access = 13
HVMOP_inject_trap = 14
HVMOP_get_mem_type = 15
HVMOP_inject_msi = 16
HVMOP_set_evtchn_upcall_vector = 23
HVMOP_guest_request_vm_event = 24
HVMOP_altp2m = 25
# hvm_op's upper bits are Xen's continuation state; Xen masks them off.
HVMOP_op_mask = 0xFF

HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_PAE_ENABLED = 4
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_VIRIDIAN = 9
HVM_PARAM_TIMER_MODE = 10
HVM_PARAM_HPET_ENABLED = 11
HVM_PARAM_IDENT_PT = 12
HVM_PARAM_DM_DOMAIN = 13
HVM_PARAM_ACPI_S_STATE = 14
HVM_PARAM_VM86_TSS = 15
HVM_PARAM_VPT_ALIGN = 16
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_CONSOLE_EVTCHN = 18
HVM_PARAM_ACPI_IOPORTS_LOCATION = 19
HVM_PARAM_MEMORY_EVENT_CR0 = 20
HVM_PARAM_MEMORY_EVENT_CR3 = 21
HVM_PARAM_MEMORY_EVENT_CR4 = 22
HVM_PARAM_MEMORY_EVENT_INT3 = 23
HVM_PARAM_NESTEDHVM = 24
HVM_PARAM_MEMORY_EVENT_SINGLE_STEP = 25
HVM_PARAM_BUFIOREQ_EVTCHN = 26
HVM_PARAM_PAGING_RING_PFN = 27
HVM_PARAM_MONITOR_RING_PFN = 28
HVM_PARAM_SHARING_RING_PFN = 29
HVM_PARAM_MEMORY_EVENT_MSR = 30
HVM_PARAM_TRIPLE_FAULT_REASON = 31
HVM_PARAM_IOREQ_SERVER_PFN = 32
HVM_PARAM_NR_IOREQ_SERVER_PAGES = 33
HVM_PARAM_VM_GENERATION_ID_ADDR = 34
HVM_PARAM_ALTP2M = 35
HVM_PARAM_X87_FIP_WIDTH = 36
HVM_PARAM_VM86_TSS_SIZED = 37
HVM_PARAM_MCA_CAP = 38
HVM_NR_PARAMS = 39

# Xen's rules for what a guest may do with its own parameters (hvm.c).
HVM_PARAMS_GUEST_SETTABLE = frozenset({
    HVM_PARAM_CALLBACK_IRQ, HVM_PARAM_VM86_TSS, HVM_PARAM_VM86_TSS_SIZED,
    HVM_PARAM_ACPI_IOPORTS_LOCATION, HVM_PARAM_VM_GENERATION_ID_ADDR,
    HVM_PARAM_STORE_EVTCHN, HVM_PARAM_CONSOLE_EVTCHN, HVM_PARAM_X87_FIP_WIDTH,
})
HVM_PARAMS_GUEST_READABLE = HVM_PARAMS_GUEST_SETTABLE | {
    HVM_PARAM_STORE_PFN, HVM_PARAM_CONSOLE_PFN, HVM_PARAM_ALTP2M,
}
HVM_PARAMS_READ_ONLY = frozenset({HVM_PARAM_ALTP2M})  # set → EEXIST
HVM_PARAMS_DEPRECATED = frozenset({  # get or set → EINVAL
    HVM_PARAM_PAE_ENABLED, HVM_PARAM_DM_DOMAIN, HVM_PARAM_MEMORY_EVENT_CR0,
    HVM_PARAM_MEMORY_EVENT_CR3, HVM_PARAM_MEMORY_EVENT_CR4, HVM_PARAM_MEMORY_EVENT_INT3,
    HVM_PARAM_NESTEDHVM, HVM_PARAM_MEMORY_EVENT_SINGLE_STEP, HVM_PARAM_BUFIOREQ_EVTCHN,
    HVM_PARAM_MEMORY_EVENT_MSR,
})

# HVM_PARAM_CALLBACK_IRQ: the type in bits 63:56, its argument below.
HVM_PARAM_CALLBACK_TYPE_SHIFT = 56
HVM_PARAM_CALLBACK_IRQ_TYPE_MASK = 0xFF << HVM_PARAM_CALLBACK_TYPE_SHIFT
HVM_PARAM_CALLBACK_TYPE_GSI = 0  # val[55:0] = GSI (0 disables the callback)
HVM_PARAM_CALLBACK_TYPE_PCI_INTX = 1  # val[31:16] segment, [15:8] bus, [7:3] device, [1:0] pin
HVM_PARAM_CALLBACK_TYPE_VECTOR = 2  # val[7:0] = vector

# Lowest vector an event-channel upcall may use (below are exceptions).
MIN_UPCALL_VECTOR = 0x10

# --- vcpu_op (vcpu.h) ---------------------------------------------------------------------

VCPUOP_initialise = 0
VCPUOP_up = 1
VCPUOP_down = 2
VCPUOP_is_up = 3
VCPUOP_get_runstate_info = 4
VCPUOP_register_runstate_memory_area = 5
VCPUOP_set_periodic_timer = 6
VCPUOP_stop_periodic_timer = 7
VCPUOP_set_singleshot_timer = 8
VCPUOP_stop_singleshot_timer = 9
VCPUOP_register_vcpu_info = 10
VCPUOP_send_nmi = 11
VCPUOP_get_physid = 12
VCPUOP_register_vcpu_time_memory_area = 13
VCPUOP_register_runstate_phys_area = 14
VCPUOP_register_vcpu_time_phys_area = 15

VCPU_SSHOTTMR_future = 1 << 0

RUNSTATE_running = 0
RUNSTATE_runnable = 1
RUNSTATE_blocked = 2
RUNSTATE_offline = 3

# Sizes of the areas a guest registers. vcpu_info is 64 bytes in both ABIs
# as far as a registration goes (Xen and KVM both map the larger one).
VCPU_INFO_SIZE = 64
VCPU_TIME_INFO_SIZE = 32
XEN_LEGACY_MAX_VCPUS = 32  # vcpu_info slots inside shared_info (xen.h)
RUNSTATE_INFO_SIZE = {False: 48, True: 44}  # keyed by "compat"

# --- sched_op (sched.h) ---------------------------------------------------------------------

SCHEDOP_yield = 0
SCHEDOP_block = 1
SCHEDOP_shutdown = 2
SCHEDOP_poll = 3
SCHEDOP_remote_shutdown = 4
SCHEDOP_shutdown_code = 5
SCHEDOP_watchdog = 6
SCHEDOP_pin_override = 7

SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_soft_reset = 5
SHUTDOWN_MAX = 5

SCHED_POLL_MAX_PORTS = 128  # Xen's limit on sched_poll.nr_ports

# --- event_channel_op (event_channel.h) -----------------------------------------------------

EVTCHNOP_bind_interdomain = 0
EVTCHNOP_bind_virq = 1
EVTCHNOP_bind_pirq = 2
EVTCHNOP_close = 3
EVTCHNOP_send = 4
EVTCHNOP_status = 5
EVTCHNOP_alloc_unbound = 6
EVTCHNOP_bind_ipi = 7
EVTCHNOP_bind_vcpu = 8
EVTCHNOP_unmask = 9
EVTCHNOP_reset = 10
EVTCHNOP_init_control = 11
EVTCHNOP_expand_array = 12
EVTCHNOP_set_priority = 13
EVTCHNOP_reset_cont = 14

EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2
EVTCHNSTAT_pirq = 3
EVTCHNSTAT_virq = 4
EVTCHNSTAT_ipi = 5

# 2-level event channels: xen_ulong_t bits squared.
EVTCHN_2L_NR_CHANNELS = {False: 4096, True: 1024}  # keyed by "compat"

VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_CONSOLE = 2
VIRQ_DOM_EXC = 3
VIRQ_TBUF = 4
VIRQ_DEBUGGER = 6
VIRQ_XENOPROF = 7
VIRQ_CON_RING = 8
VIRQ_PCPU_STATE = 9
VIRQ_MEM_EVENT = 10
VIRQ_ARGO = 11
VIRQ_ENOMEM = 12
VIRQ_XENPMU = 13
VIRQ_ARCH_0 = 16
NR_VIRQS = 24

# --- grant_table_op (grant_table.h) ---------------------------------------------------------

GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6
GNTTABOP_unmap_and_replace = 7
GNTTABOP_set_version = 8
GNTTABOP_get_status_frames = 9
GNTTABOP_get_version = 10
GNTTABOP_swap_grant_ref = 11
GNTTABOP_cache_flush = 12
# grant_table_op's cmd bits above 12 are Xen's continuation state.
GNTTABOP_CONTINUATION_ARG_SHIFT = 12
GNTTABOP_CMD_MASK = (1 << GNTTABOP_CONTINUATION_ARG_SHIFT) - 1

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13

# --- physdev_op (physdev.h) -----------------------------------------------------------------

PHYSDEVOP_irq_status_query = 5
PHYSDEVOP_set_iopl = 6
PHYSDEVOP_set_iobitmap = 7
PHYSDEVOP_apic_read = 8
PHYSDEVOP_apic_write = 9
PHYSDEVOP_alloc_irq_vector = 10
PHYSDEVOP_free_irq_vector = 11
PHYSDEVOP_eoi = 12
PHYSDEVOP_map_pirq = 13
PHYSDEVOP_unmap_pirq = 14
PHYSDEVOP_manage_pci_add = 15
PHYSDEVOP_manage_pci_remove = 16
PHYSDEVOP_pirq_eoi_gmfn_v1 = 17
PHYSDEVOP_restore_msi = 19
PHYSDEVOP_manage_pci_add_ext = 20
PHYSDEVOP_setup_gsi = 21
PHYSDEVOP_get_free_pirq = 23
PHYSDEVOP_pci_mmcfg_reserved = 24
PHYSDEVOP_pci_device_add = 25
PHYSDEVOP_pci_device_remove = 26
PHYSDEVOP_restore_msi_ext = 27
PHYSDEVOP_pirq_eoi_gmfn_v2 = 28
PHYSDEVOP_dbgp_op = 29
PHYSDEVOP_prepare_msix = 30
PHYSDEVOP_release_msix = 31
PHYSDEVOP_pci_device_reset = 32


# --- names for tracing and log lines --------------------------------------------------------


def _names(prefix: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for key, value in globals().items():
        if key.startswith(prefix) and isinstance(value, int) and value not in names:
            names[value] = key[len(prefix):]
    return names


HYPERCALL_NAMES: dict[int, str] = _names("HYPERCALL_")

SUBOP_NAMES: dict[int, dict[int, str]] = {
    HYPERCALL_xen_version: _names("XENVER_"),
    HYPERCALL_console_io: _names("CONSOLEIO_"),
    HYPERCALL_vm_assist: _names("VMASST_CMD_"),
    HYPERCALL_memory_op: _names("XENMEM_"),
    HYPERCALL_hvm_op: {k: v for k, v in _names("HVMOP_").items() if v != "op_mask"},
    HYPERCALL_vcpu_op: _names("VCPUOP_"),
    HYPERCALL_sched_op: _names("SCHEDOP_"),
    HYPERCALL_event_channel_op: _names("EVTCHNOP_"),
    HYPERCALL_grant_table_op: {k: v for k, v in _names("GNTTABOP_").items() if v.islower()},
    HYPERCALL_physdev_op: _names("PHYSDEVOP_"),
}


def hypercall_name(number: int) -> str:
    return HYPERCALL_NAMES.get(number, f"hypercall_{number}")


def subop_name(hypercall: int, op: int) -> str:
    return SUBOP_NAMES.get(hypercall, {}).get(op, str(op))


# --- structures -----------------------------------------------------------------------------


class Layout:
    """A guest structure in both ABIs: its fields and a struct format for each.

    `unpack` gives a namedtuple; `pack` takes one (or the field values).
    Padding is written as zeros.
    """

    def __init__(self, name: str, fields: str, native: str, compat: str | None = None):
        self.name = name
        self.record = namedtuple(name, fields)
        self._formats = (struct.Struct(native), struct.Struct(compat if compat is not None else native))

    def size(self, compat: bool) -> int:
        return self._formats[compat].size

    def unpack(self, data: bytes, compat: bool):
        return self.record._make(self._formats[compat].unpack(data))

    def pack(self, record, compat: bool) -> bytes:
        return self._formats[compat].pack(*record)

    def __repr__(self) -> str:
        return f"Layout({self.name}, {self.size(False)}/{self.size(True)} bytes)"


# version.h
FEATURE_INFO = Layout("xen_feature_info", "submap_idx submap", "<II")
PLATFORM_PARAMETERS = Layout("xen_platform_parameters", "virt_start", "<Q", "<I")
COMPILE_INFO = Layout(
    "xen_compile_info", "compiler compile_by compile_domain compile_date", "<64s16s32s32s"
)

# hvm_op.h
HVM_PARAM = Layout("xen_hvm_param", "domid index value", "<H2xIQ")
HVM_EVTCHN_UPCALL_VECTOR = Layout("xen_hvm_evtchn_upcall_vector", "vcpu vector", "<IB3x")

# vcpu.h. The area registrations are a union of a guest handle and a u64;
# a 32-bit guest's handle is the low half.
VCPU_REGISTER_VCPU_INFO = Layout("vcpu_register_vcpu_info", "mfn offset rsvd", "<QII")
VCPU_REGISTER_AREA = Layout("vcpu_register_memory_area", "addr", "<Q", "<I4x")
VCPU_SET_SINGLESHOT_TIMER = Layout(
    "vcpu_set_singleshot_timer", "timeout_abs_ns flags", "<QI4x", "<QI"
)
VCPU_SET_PERIODIC_TIMER = Layout("vcpu_set_periodic_timer", "period_ns", "<Q")

# sched.h
SCHED_SHUTDOWN = Layout("sched_shutdown", "reason", "<I")
SCHED_POLL = Layout("sched_poll", "ports nr_ports timeout", "<QI4xQ", "<IIQ")
SCHED_REMOTE_SHUTDOWN = Layout("sched_remote_shutdown", "domain_id reason", "<H2xI")
SCHED_WATCHDOG = Layout("sched_watchdog", "id timeout", "<II")

# event_channel.h: only 16/32-bit fields, so one layout serves both ABIs.
EVTCHN_ALLOC_UNBOUND = Layout("evtchn_alloc_unbound", "dom remote_dom port", "<HHI")
EVTCHN_BIND_INTERDOMAIN = Layout(
    "evtchn_bind_interdomain", "remote_dom remote_port local_port", "<H2xII"
)
EVTCHN_BIND_VIRQ = Layout("evtchn_bind_virq", "virq vcpu port", "<III")
EVTCHN_BIND_IPI = Layout("evtchn_bind_ipi", "vcpu port", "<II")
EVTCHN_PORT = Layout("evtchn_port", "port", "<I")  # close, send, unmask
# The union after vcpu: unbound {dom u16}, interdomain {dom u16, port u32},
# pirq u32, virq u32. u0 holds dom/pirq/virq, u1 the interdomain port.
EVTCHN_STATUS = Layout("evtchn_status", "dom port status vcpu u0 u1", "<H2xIIIII")
EVTCHN_BIND_VCPU = Layout("evtchn_bind_vcpu", "port vcpu", "<II")
EVTCHN_RESET = Layout("evtchn_reset", "dom", "<H")
EVTCHN_INIT_CONTROL = Layout("evtchn_init_control", "control_gfn offset vcpu link_bits", "<QIIB7x")
# struct evtchn_fifo_control_block: ready, a reserved word, a head per queue (16).
EVTCHN_FIFO_CONTROL_BLOCK_SIZE = 8 + 4 * 16
EVTCHN_EXPAND_ARRAY = Layout("evtchn_expand_array", "array_gfn", "<Q")
EVTCHN_SET_PRIORITY = Layout("evtchn_set_priority", "port priority", "<II")

# grant_table.h
GNTTAB_SET_VERSION = Layout("gnttab_set_version", "version", "<I")
GNTTAB_GET_VERSION = Layout("gnttab_get_version", "dom version", "<H2xI")
# struct gnttab_copy: two gnttab_copy_ptr {ref or gmfn (xen_pfn_t), domid, offset}, len, flags, status.
GNTTAB_COPY = Layout(
    "gnttab_copy", "source_u source_domid source_offset dest_u dest_domid dest_offset len flags status",
    "<QHH4xQHH4xHHh2x", "<IHHIHHHHh2x",
)
GNTTAB_COPY_STATUS_OFFSET = {False: 36, True: 20}  # Xen writes back only the status
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1

# frame_list is a handle to uint64_t frames in both ABIs.
GNTTAB_GET_STATUS_FRAMES = Layout(
    "gnttab_get_status_frames", "nr_frames dom status frame_list", "<IHhQ", "<IHhI"
)
# struct gnttab_setup_table: frame_list is a handle to xen_pfn_t, 8 bytes
# wide in the 64-bit ABI (the handle aligned to 16), 4 in the compat one.
GNTTAB_SETUP_TABLE = Layout(
    "gnttab_setup_table", "dom nr_frames status frame_list", "<H2xIh6xQ", "<H2xIh2xI"
)
GNTTAB_SETUP_TABLE_STATUS_OFFSET = 8  # Xen writes back only the status (compat: the whole structure)
# Xen's compat wrapper builds the 64-bit frame list in its translation
# area (COMPAT_ARG_XLAT_SIZE, two pages, after the 24-byte structure): a
# 32-bit guest asking for more frames gets GNTST_general_error.
COMPAT_SETUP_TABLE_MAX_FRAMES = (2 * 4096 - 24) // 8
GNTTAB_QUERY_SIZE = Layout(
    "gnttab_query_size", "dom nr_frames max_nr_frames status", "<H2xIIh2x"
)

# memory.h
ADD_TO_PHYSMAP = Layout("xen_add_to_physmap", "domid size space idx gpfn", "<HHIQQ", "<HHIII")
MEMORY_RESERVATION = Layout(
    "xen_memory_reservation", "extent_start nr_extents extent_order mem_flags domid", "<QQIIH6x", "<IIIIH2x"
)
XENMEMF_ADDRESS_BITS_MASK = 0xFF  # mem_flags: the widest machine address the pages may have (0: any)
XENMEMF_populate_on_demand = 1 << 16
MAX_GUEST_EXTENT_ORDER = 9  # 2 MiB: the largest extent a guest may give back or ask for
REMOVE_FROM_PHYSMAP = Layout("xen_remove_from_physmap", "domid gpfn", "<H6xQ", "<H2xI")
ADD_TO_PHYSMAP_BATCH = Layout(
    "xen_add_to_physmap_batch", "domid space size res0 idxs gpfns errs", "<HHHHQQQ", "<HHHHIII"
)

# Element sizes of the arrays those point to.
XEN_ULONG_SIZE = {False: 8, True: 4}  # xen_ulong_t, xen_pfn_t
