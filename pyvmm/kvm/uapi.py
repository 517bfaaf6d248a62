"""KVM's userspace ABI for x86-64: structs, constants and ioctl numbers.

The structs are declared to cffi exactly as the kernel lays them out
(natural alignment, x86-64), so a cffi object can be handed to an ioctl or
laid over the vCPU's mmap'ed `kvm_run` page without any packing step.
Every ioctl number is computed from the size of its argument struct, as the
kernel's _IO/_IOR/_IOW/_IOWR macros do; the unit tests pin both the layouts
and the numbers to the kernel's documented values.
"""

from __future__ import annotations

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from ..core.cffi_types import declared_ffi

DECLARATIONS = """
    /* --- registers ----------------------------------------------------- */
    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx;
        uint64_t rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11;
        uint64_t r12, r13, r14, r15;
        uint64_t rip, rflags;
    };

    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t type;
        uint8_t present, dpl, db, s, l, g, avl;
        uint8_t unusable;
        uint8_t padding;
    };

    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };

    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t interrupt_bitmap[4];
    };

    struct kvm_fpu {
        uint8_t fpr[8][16];
        uint16_t fcw;
        uint16_t fsw;
        uint8_t ftwx;
        uint8_t pad1;
        uint16_t last_opcode;
        uint64_t last_ip;
        uint64_t last_dp;
        uint8_t xmm[16][16];
        uint32_t mxcsr;
        uint32_t pad2;
    };

    struct kvm_msr_entry {
        uint32_t index;
        uint32_t reserved;
        uint64_t data;
    };

    struct kvm_msrs {
        uint32_t nmsrs;
        uint32_t pad;
        struct kvm_msr_entry entries[];
    };

    struct kvm_msr_list {
        uint32_t nmsrs;
        uint32_t indices[];
    };

    struct kvm_cpuid_entry2 {
        uint32_t function;
        uint32_t index;
        uint32_t flags;
        uint32_t eax, ebx, ecx, edx;
        uint32_t padding[3];
    };

    struct kvm_cpuid2 {
        uint32_t nent;
        uint32_t padding;
        struct kvm_cpuid_entry2 entries[];
    };

    struct kvm_lapic_state {
        char regs[1024];
    };

    /* --- what a snapshot saves of a vCPU beyond kvm_regs/kvm_sregs ------- */
    struct kvm_sregs2 {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t flags;
        uint64_t pdptrs[4];
    };

    struct kvm_xsave {
        uint32_t region[1024];
        uint32_t extra[];
    };

    struct kvm_xcr {
        uint32_t xcr;
        uint32_t reserved;
        uint64_t value;
    };

    struct kvm_xcrs {
        uint32_t nr_xcrs;
        uint32_t flags;
        struct kvm_xcr xcrs[16];
        uint64_t padding[16];
    };

    struct kvm_vcpu_events {
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t has_error_code;
            uint8_t pending;
            uint32_t error_code;
        } exception;
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t soft;
            uint8_t shadow;
        } interrupt;
        struct {
            uint8_t injected;
            uint8_t pending;
            uint8_t masked;
            uint8_t pad;
        } nmi;
        uint32_t sipi_vector;
        uint32_t flags;
        struct {
            uint8_t smm;
            uint8_t pending;
            uint8_t smm_inside_nmi;
            uint8_t latched_init;
        } smi;
        struct {
            uint8_t pending;
        } triple_fault;
        uint8_t reserved[26];
        uint8_t exception_has_payload;
        uint64_t exception_payload;
    };

    struct kvm_debugregs {
        uint64_t db[4];
        uint64_t dr6;
        uint64_t dr7;
        uint64_t flags;
        uint64_t reserved[9];
    };

    struct kvm_mp_state {
        uint32_t mp_state;
    };

    struct kvm_translation {
        uint64_t linear_address;
        uint64_t physical_address;
        uint8_t valid;
        uint8_t writeable;
        uint8_t usermode;
        uint8_t pad[5];
    };

    struct kvm_guest_debug_arch {
        uint64_t debugreg[8];
    };

    struct kvm_guest_debug {
        uint32_t control;
        uint32_t pad;
        struct kvm_guest_debug_arch arch;
    };

    /* --- VM-wide --------------------------------------------------------- */
    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };

    struct kvm_irq_level {
        union {
            uint32_t irq;
            int32_t status;
        };
        uint32_t level;
    };

    struct kvm_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t flags;
        uint32_t devid;
        uint8_t pad[12];
    };

    struct kvm_irqfd {
        uint32_t fd;
        uint32_t gsi;
        uint32_t flags;
        uint32_t resamplefd;
        uint8_t pad[16];
    };

    struct kvm_ioeventfd {
        uint64_t datamatch;
        uint64_t addr;
        uint32_t len;
        int32_t fd;
        uint32_t flags;
        uint8_t pad[36];
    };

    struct kvm_pit_config {
        uint32_t flags;
        uint32_t pad[15];
    };

    struct kvm_enable_cap {
        uint32_t cap;
        uint32_t flags;
        uint64_t args[4];
        uint8_t pad[64];
    };

    /* The in-kernel PIC and IOAPIC (chip_id KVM_IRQCHIP_*), saved as they are. */
    struct kvm_irqchip {
        uint32_t chip_id;
        uint32_t pad;
        union {
            char dummy[512];
        } chip;
    };

    struct kvm_pit_channel_state {
        uint32_t count;
        uint16_t latched_count;
        uint8_t count_latched;
        uint8_t status_latched;
        uint8_t status;
        uint8_t read_state;
        uint8_t write_state;
        uint8_t write_latch;
        uint8_t rw_mode;
        uint8_t mode;
        uint8_t bcd;
        uint8_t gate;
        int64_t count_load_time;
    };

    struct kvm_pit_state2 {
        struct kvm_pit_channel_state channels[3];
        uint32_t flags;
        uint32_t reserved[9];
    };

    struct kvm_clock_data {
        uint64_t clock;
        uint32_t flags;
        uint32_t pad0;
        uint64_t realtime;
        uint64_t host_tsc;
        uint32_t pad[4];
    };

    struct kvm_irq_routing_irqchip {
        uint32_t irqchip;
        uint32_t pin;
    };

    struct kvm_irq_routing_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        union {
            uint32_t pad;
            uint32_t devid;
        };
    };

    struct kvm_irq_routing_hv_sint {
        uint32_t vcpu;
        uint32_t sint;
    };

    /* Also the argument of KVM_XEN_HVM_EVTCHN_SEND. */
    struct kvm_irq_routing_xen_evtchn {
        uint32_t port;
        uint32_t vcpu;
        uint32_t priority;
    };

    struct kvm_irq_routing_entry {
        uint32_t gsi;
        uint32_t type;
        uint32_t flags;
        uint32_t pad;
        union {
            struct kvm_irq_routing_irqchip irqchip;
            struct kvm_irq_routing_msi msi;
            struct kvm_irq_routing_hv_sint hv_sint;
            struct kvm_irq_routing_xen_evtchn xen_evtchn;
            uint32_t pad[8];
        } u;
    };

    struct kvm_irq_routing {
        uint32_t nr;
        uint32_t flags;
        struct kvm_irq_routing_entry entries[];
    };

    struct kvm_msr_filter_range {
        uint32_t flags;
        uint32_t nmsrs;
        uint32_t base;
        uint8_t *bitmap;
    };

    struct kvm_msr_filter {
        uint32_t flags;
        struct kvm_msr_filter_range ranges[16];
    };

    /* --- Xen ------------------------------------------------------------- */
    struct kvm_xen_hvm_config {
        uint32_t flags;
        uint32_t msr;
        uint64_t blob_addr_32;
        uint64_t blob_addr_64;
        uint8_t blob_size_32;
        uint8_t blob_size_64;
        uint8_t pad2[30];
    };

    struct kvm_xen_hvm_attr {
        uint16_t type;
        uint16_t pad[3];
        union {
            uint8_t long_mode;
            uint8_t vector;
            uint8_t runstate_update_flag;
            union {
                uint64_t gfn;
                uint64_t hva;
            } shared_info;
            struct {
                uint32_t send_port;
                uint32_t type;
                uint32_t flags;
                union {
                    struct {
                        uint32_t port;
                        uint32_t vcpu;
                        uint32_t priority;
                    } port;
                    struct {
                        uint32_t port;
                        int32_t fd;
                    } eventfd;
                    uint32_t padding[4];
                } deliver;
            } evtchn;
            uint32_t xen_version;
            uint64_t pad[8];
        } u;
    };

    struct kvm_xen_vcpu_attr {
        uint16_t type;
        uint16_t pad[3];
        union {
            uint64_t gpa;
            uint64_t hva;
            uint64_t pad[8];
            struct {
                uint64_t state;
                uint64_t state_entry_time;
                uint64_t time_running;
                uint64_t time_runnable;
                uint64_t time_blocked;
                uint64_t time_offline;
            } runstate;
            uint32_t vcpu_id;
            struct {
                uint32_t port;
                uint32_t priority;
                uint64_t expires_ns;
            } timer;
            uint8_t vector;
        } u;
    };

    /* --- the shared vCPU page --------------------------------------------- */
    struct kvm_debug_exit_arch {
        uint32_t exception;
        uint32_t pad;
        uint64_t pc;
        uint64_t dr6;
        uint64_t dr7;
    };

    struct kvm_xen_exit {
        uint32_t type;
        union {
            struct {
                uint32_t longmode;
                uint32_t cpl;
                uint64_t input;
                uint64_t result;
                uint64_t params[6];
            } hcall;
        } u;
    };

    struct kvm_run {
        uint8_t request_interrupt_window;
        uint8_t immediate_exit;
        uint8_t padding1[6];
        uint32_t exit_reason;
        uint8_t ready_for_interrupt_injection;
        uint8_t if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct {
                uint64_t hardware_exit_reason;
            } hw;
            struct {
                uint64_t hardware_entry_failure_reason;
                uint32_t cpu;
            } fail_entry;
            struct {
                uint32_t exception;
                uint32_t error_code;
            } ex;
            struct {
                uint8_t direction;
                uint8_t size;
                uint16_t port;
                uint32_t count;
                uint64_t data_offset;
            } io;
            struct {
                struct kvm_debug_exit_arch arch;
            } debug;
            struct {
                uint64_t phys_addr;
                uint8_t data[8];
                uint32_t len;
                uint8_t is_write;
            } mmio;
            struct {
                uint32_t suberror;
                uint32_t ndata;
                uint64_t data[16];
            } internal;
            struct {
                uint32_t type;
                uint32_t ndata;
                union {
                    uint64_t flags;
                    uint64_t data[16];
                };
            } system_event;
            struct {
                uint8_t error;
                uint8_t pad[7];
                uint32_t reason;
                uint32_t index;
                uint64_t data;
            } msr;
            struct kvm_xen_exit xen;
            char padding[256];
        };
        uint64_t kvm_valid_regs;
        uint64_t kvm_dirty_regs;
        union {
            char padding[2048];
        } s;
    };
    """

ffi = declared_ffi(__file__, "uapi", DECLARATIONS)

def as_struct(ctype: str, value):
    """`value` if it is already a cffi object, else a new `ctype` built from
    it (a dict initializer, nested for unions: {"type": 1, "u": {...}})."""
    if isinstance(value, ffi.CData):
        return value
    return ffi.new(ctype, value)


def enable_cap_struct(cap: int, args, flags: int = 0):
    args = list(args)
    if len(args) > 4:
        raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
    return ffi.new("struct kvm_enable_cap *", {"cap": cap, "flags": flags, "args": args})


# --- ioctl numbers -----------------------------------------------------------

KVMIO = 0xAE


class Ioctl(int):
    """An ioctl request number that remembers its name for error messages."""

    name: str

    def __new__(cls, name: str, number: int) -> "Ioctl":
        request = super().__new__(cls, number)
        request.name = name
        return request

    def __repr__(self) -> str:
        return f"{self.name}({int(self):#x})"


def _size(ctype: str | None) -> int:
    return 0 if ctype is None else ffi.sizeof(ctype)


def _io(name: str, nr: int) -> Ioctl:
    return Ioctl(name, IOC(IOC_NONE, KVMIO, nr, 0))


def _ior(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, IOC(IOC_READ, KVMIO, nr, _size(ctype)))


def _iow(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, IOC(IOC_WRITE, KVMIO, nr, _size(ctype)))


def _iowr(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, IOC(IOC_READ | IOC_WRITE, KVMIO, nr, _size(ctype)))


# /dev/kvm
KVM_GET_API_VERSION = _io("KVM_GET_API_VERSION", 0x00)
KVM_CREATE_VM = _io("KVM_CREATE_VM", 0x01)
KVM_GET_MSR_INDEX_LIST = _iowr("KVM_GET_MSR_INDEX_LIST", 0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io("KVM_CHECK_EXTENSION", 0x03)
KVM_GET_VCPU_MMAP_SIZE = _io("KVM_GET_VCPU_MMAP_SIZE", 0x04)
KVM_GET_SUPPORTED_CPUID = _iowr("KVM_GET_SUPPORTED_CPUID", 0x05, "struct kvm_cpuid2")

# VM fd
KVM_CREATE_VCPU = _io("KVM_CREATE_VCPU", 0x41)
KVM_SET_USER_MEMORY_REGION = _iow("KVM_SET_USER_MEMORY_REGION", 0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io("KVM_SET_TSS_ADDR", 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow("KVM_SET_IDENTITY_MAP_ADDR", 0x48, "uint64_t")
KVM_CREATE_IRQCHIP = _io("KVM_CREATE_IRQCHIP", 0x60)
KVM_IRQ_LINE = _iow("KVM_IRQ_LINE", 0x61, "struct kvm_irq_level")
KVM_SET_GSI_ROUTING = _iow("KVM_SET_GSI_ROUTING", 0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow("KVM_IRQFD", 0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow("KVM_CREATE_PIT2", 0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow("KVM_IOEVENTFD", 0x79, "struct kvm_ioeventfd")
KVM_XEN_HVM_CONFIG = _iow("KVM_XEN_HVM_CONFIG", 0x7A, "struct kvm_xen_hvm_config")
KVM_SET_CLOCK = _iow("KVM_SET_CLOCK", 0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior("KVM_GET_CLOCK", 0x7C, "struct kvm_clock_data")
KVM_GET_IRQCHIP = _iowr("KVM_GET_IRQCHIP", 0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior("KVM_SET_IRQCHIP", 0x63, "struct kvm_irqchip")  # (sic) _IOR in the kernel's header
KVM_GET_PIT2 = _ior("KVM_GET_PIT2", 0x9F, "struct kvm_pit_state2")
KVM_SET_PIT2 = _iow("KVM_SET_PIT2", 0xA0, "struct kvm_pit_state2")
KVM_ENABLE_CAP = _iow("KVM_ENABLE_CAP", 0xA3, "struct kvm_enable_cap")
KVM_SIGNAL_MSI = _iow("KVM_SIGNAL_MSI", 0xA5, "struct kvm_msi")
KVM_X86_SET_MSR_FILTER = _iow("KVM_X86_SET_MSR_FILTER", 0xC6, "struct kvm_msr_filter")
KVM_XEN_HVM_GET_ATTR = _iowr("KVM_XEN_HVM_GET_ATTR", 0xC8, "struct kvm_xen_hvm_attr")
KVM_XEN_HVM_SET_ATTR = _iow("KVM_XEN_HVM_SET_ATTR", 0xC9, "struct kvm_xen_hvm_attr")
KVM_XEN_HVM_EVTCHN_SEND = _iow("KVM_XEN_HVM_EVTCHN_SEND", 0xD0, "struct kvm_irq_routing_xen_evtchn")

# vCPU fd
KVM_RUN = _io("KVM_RUN", 0x80)
KVM_GET_REGS = _ior("KVM_GET_REGS", 0x81, "struct kvm_regs")
KVM_SET_REGS = _iow("KVM_SET_REGS", 0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior("KVM_GET_SREGS", 0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow("KVM_SET_SREGS", 0x84, "struct kvm_sregs")
KVM_TRANSLATE = _iowr("KVM_TRANSLATE", 0x85, "struct kvm_translation")
KVM_GET_MSRS = _iowr("KVM_GET_MSRS", 0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow("KVM_SET_MSRS", 0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior("KVM_GET_FPU", 0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow("KVM_SET_FPU", 0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior("KVM_GET_LAPIC", 0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow("KVM_SET_LAPIC", 0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow("KVM_SET_CPUID2", 0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr("KVM_GET_CPUID2", 0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior("KVM_GET_MP_STATE", 0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow("KVM_SET_MP_STATE", 0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _iow("KVM_SET_GUEST_DEBUG", 0x9B, "struct kvm_guest_debug")
KVM_GET_VCPU_EVENTS = _ior("KVM_GET_VCPU_EVENTS", 0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow("KVM_SET_VCPU_EVENTS", 0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _ior("KVM_GET_DEBUGREGS", 0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow("KVM_SET_DEBUGREGS", 0xA2, "struct kvm_debugregs")
KVM_SET_TSC_KHZ = _io("KVM_SET_TSC_KHZ", 0xA2)
KVM_GET_TSC_KHZ = _io("KVM_GET_TSC_KHZ", 0xA3)
KVM_GET_STATS_FD = _io("KVM_GET_STATS_FD", 0xCE)  # on a vCPU fd: its binary statistics
KVM_GET_XSAVE = _ior("KVM_GET_XSAVE", 0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow("KVM_SET_XSAVE", 0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior("KVM_GET_XCRS", 0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow("KVM_SET_XCRS", 0xA7, "struct kvm_xcrs")
KVM_GET_SREGS2 = _ior("KVM_GET_SREGS2", 0xCC, "struct kvm_sregs2")
KVM_SET_SREGS2 = _iow("KVM_SET_SREGS2", 0xCD, "struct kvm_sregs2")
KVM_GET_XSAVE2 = _ior("KVM_GET_XSAVE2", 0xCF, "struct kvm_xsave")
KVM_XEN_VCPU_GET_ATTR = _iowr("KVM_XEN_VCPU_GET_ATTR", 0xCA, "struct kvm_xen_vcpu_attr")
KVM_XEN_VCPU_SET_ATTR = _iow("KVM_XEN_VCPU_SET_ATTR", 0xCB, "struct kvm_xen_vcpu_attr")

# --- constants ---------------------------------------------------------------

KVM_API_VERSION = 12

# Capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_XEN_HVM = 38
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_ENABLE_CAP = 54
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_SET_GUEST_DEBUG2 = 195  # the KVM_GUESTDBG_* flags this KVM accepts
KVM_CAP_SREGS2 = 200
KVM_CAP_XSAVE2 = 208  # the kvm_xsave size KVM_GET_XSAVE2 fills (>= 4096)

# Exit reasons (kvm_run.exit_reason)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_GUESTDBG_ENABLE = 0x0000_0001
KVM_GUESTDBG_SINGLESTEP = 0x0000_0002
KVM_GUESTDBG_USE_SW_BP = 0x0001_0000
KVM_GUESTDBG_USE_HW_BP = 0x0002_0000
KVM_GUESTDBG_INJECT_DB = 0x0004_0000
KVM_GUESTDBG_INJECT_BP = 0x0008_0000
KVM_GUESTDBG_BLOCKIRQ = 0x0010_0000

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_PIT_SPEAKER_DUMMY = 1

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQ_ROUTING_HV_SINT = 4
KVM_IRQ_ROUTING_XEN_EVTCHN = 5
KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL = 0xFFFF_FFFF

KVM_SREGS2_FLAGS_PDPTRS_VALID = 1 << 0

KVM_VCPUEVENT_VALID_NMI_PENDING = 1 << 0
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 1 << 1
KVM_VCPUEVENT_VALID_SHADOW = 1 << 2
KVM_VCPUEVENT_VALID_SMM = 1 << 3
KVM_VCPUEVENT_VALID_PAYLOAD = 1 << 4
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 1 << 5

KVM_CLOCK_TSC_STABLE = 1 << 1
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic) the kernel's spelling

# Xen (KVM_CAP_XEN_HVM bitmask; only some bits are settable config flags)
KVM_XEN_HVM_CONFIG_HYPERCALL_MSR = 1 << 0
KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL = 1 << 1
KVM_XEN_HVM_CONFIG_SHARED_INFO = 1 << 2
KVM_XEN_HVM_CONFIG_RUNSTATE = 1 << 3
KVM_XEN_HVM_CONFIG_EVTCHN_2LEVEL = 1 << 4
KVM_XEN_HVM_CONFIG_EVTCHN_SEND = 1 << 5
KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG = 1 << 6
KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE = 1 << 7
KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA = 1 << 8
KVM_XEN_HVM_SETTABLE_FLAGS = (
    KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL
    | KVM_XEN_HVM_CONFIG_EVTCHN_SEND
    | KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE
)

KVM_XEN_ATTR_TYPE_LONG_MODE = 0
KVM_XEN_ATTR_TYPE_SHARED_INFO = 1
KVM_XEN_ATTR_TYPE_UPCALL_VECTOR = 2
KVM_XEN_ATTR_TYPE_EVTCHN = 3
KVM_XEN_ATTR_TYPE_XEN_VERSION = 4
KVM_XEN_ATTR_TYPE_RUNSTATE_UPDATE_FLAG = 5
KVM_XEN_ATTR_TYPE_SHARED_INFO_HVA = 6

# A shared_info gfn (or a vCPU area's gpa) of all ones turns it off.
KVM_XEN_INVALID_GFN = (1 << 64) - 1
KVM_XEN_INVALID_GPA = (1 << 64) - 1

KVM_XEN_EVTCHN_DEASSIGN = 1 << 0
KVM_XEN_EVTCHN_UPDATE = 1 << 1
KVM_XEN_EVTCHN_RESET = 1 << 2

KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO = 0
KVM_XEN_VCPU_ATTR_TYPE_VCPU_TIME_INFO = 1
KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR = 2
KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_CURRENT = 3
KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA = 4
KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADJUST = 5
KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID = 6
KVM_XEN_VCPU_ATTR_TYPE_TIMER = 7
KVM_XEN_VCPU_ATTR_TYPE_UPCALL_VECTOR = 8
KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO_HVA = 9

KVM_EXIT_XEN_HCALL = 1
