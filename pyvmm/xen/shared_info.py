"""Where things are in the guest's shared_info page and vcpu_info areas.

Xen's public xen.h declares these with `unsigned long` (xen_ulong_t on x86),
so the layout depends on the guest's ABI: 8-byte words for a 64-bit
("long mode") guest, 4-byte words for a 32-bit (compat) guest. Event-channel
bitmaps are arrays of such words, and the 2-level ABI has one selector bit
per word, hence bits_per_word ** 2 ports (4096 or 1024).

struct vcpu_info (64 bytes in both ABIs):
    0     evtchn_upcall_pending  u8
    1     evtchn_upcall_mask     u8
    8/4   evtchn_pending_sel     xen_ulong_t
    ...   arch (cr2 and padding up to 0x20)
    0x20  time                   struct vcpu_time_info (32 bytes)

struct shared_info:
    0      vcpu_info[32]        the legacy slots, vCPUs 0..31 until they register their own
    0x800  evtchn_pending[]     bits_per_word words
    0xA00 / 0x880  evtchn_mask[]
    0xC00 / 0x900  wc_version u32, wc_sec u32, wc_nsec u32
    0xC0C / 0x924  wc_sec_hi u32 (compat: after arch_shared_info's six longs)
"""

from __future__ import annotations

from .abi import VCPU_INFO_SIZE, XEN_LEGACY_MAX_VCPUS


class SharedInfoLayout:
    """Offsets for one guest ABI; attributes only, nothing mutable."""

    __slots__ = (
        "long_mode", "word_bytes", "bits_per_word", "max_ports",
        "upcall_pending", "upcall_mask", "pending_sel", "vcpu_time_info",
        "evtchn_pending", "evtchn_mask",
        "wc_version", "wc_sec", "wc_nsec", "wc_sec_hi",
    )

    def __init__(self, long_mode: bool):
        self.long_mode = bool(long_mode)
        self.word_bytes = 8 if self.long_mode else 4
        self.bits_per_word = self.word_bytes * 8
        self.max_ports = self.bits_per_word * self.bits_per_word
        bitmap_bytes = self.bits_per_word * self.word_bytes  # one word per selector bit

        # vcpu_info
        self.upcall_pending = 0
        self.upcall_mask = 1
        self.pending_sel = self.word_bytes  # aligned to its own size after two bytes
        self.vcpu_time_info = 0x20

        # shared_info
        self.evtchn_pending = XEN_LEGACY_MAX_VCPUS * VCPU_INFO_SIZE
        self.evtchn_mask = self.evtchn_pending + bitmap_bytes
        self.wc_version = self.evtchn_mask + bitmap_bytes
        self.wc_sec = self.wc_version + 4
        self.wc_nsec = self.wc_version + 8
        # 64-bit: right after wc_nsec. Compat: no room there, so it follows
        # arch_shared_info (max_pfn, pfn_to_mfn_frame_list_list, nmi_reason,
        # p2m_cr3, p2m_vaddr, p2m_generation: six 4-byte longs).
        self.wc_sec_hi = self.wc_version + 12 if self.long_mode else self.wc_version + 12 + 6 * 4

    def legacy_vcpu_info(self, vcpu: int) -> int:
        """Offset of vCPU `vcpu`'s slot in shared_info."""
        if not 0 <= vcpu < XEN_LEGACY_MAX_VCPUS:
            raise ValueError(f"vCPU {vcpu} has no vcpu_info slot in shared_info")
        return vcpu * VCPU_INFO_SIZE

    def __repr__(self) -> str:
        return f"SharedInfoLayout(long_mode={self.long_mode})"


LONG_MODE = SharedInfoLayout(True)
COMPAT = SharedInfoLayout(False)


def layout(long_mode: bool) -> SharedInfoLayout:
    return LONG_MODE if long_mode else COMPAT
