"""The guest's event-channel callback modes, as scripts/soak and scripts/bench boot them.

Each mode is what the kernel command line, pyvmm and scripts/qemu-xen get:
vcpu-vector is Linux 6.1's default (a per-vCPU upcall vector), hvm-vector
hides the per-vCPU vectors (`--xen-version 4.16`: one vector for the whole
guest), intx puts events on the platform device's PCI interrupt line
(`xen_no_vector_callback`), intx-tsc is intx with the TSC rate given, and
userspace is pyvmm's `--no-xen-accel` (QEMU has nothing like it).
"""

from __future__ import annotations

import functools

# mode: (extra kernel command line, pyvmm options, scripts/qemu-xen options or None: QEMU has no such mode)
MODES = {
    "vcpu-vector": ("", [], []),
    "hvm-vector": ("", ["--xen-version", "4.16"], ["--xen-version", "4.16"]),
    "intx": ("xen_no_vector_callback", [], []),
    # intx with the TSC rate on the command line: without the vector callback
    # Linux gets no Xen clock and calibrates the TSC against the PIT, which the
    # testbed's emulated clock defeats ("Unable to calibrate against PIT"), so
    # it falls back to reading the ACPI PM timer by port I/O for every clock read
    # and boots 5x slower. Real hosts calibrate fine; the hint restores that.
    "intx-tsc": ("xen_no_vector_callback tsc_early_khz={tsc_khz} tsc=reliable", [], []),
    "userspace": ("", ["--no-xen-accel"], None),
}


@functools.cache
def guest_tsc_khz() -> int:
    """The TSC rate KVM gives a new guest on this host (KVM_GET_TSC_KHZ)."""
    from pyvmm.kvm.system import Kvm
    return Kvm().create_vm().create_vcpu(0).get_tsc_khz()


def mode_settings(mode: str, tsc_khz=None) -> tuple[str, list[str], list[str] | None]:
    """A mode's (extra kernel command line, pyvmm options, QEMU options),
    with this host's TSC rate (`tsc_khz()`, else KVM's) filled in where the
    mode names it."""
    extra_append, pyvmm_options, qemu_options = MODES[mode]
    if "{tsc_khz}" in extra_append:
        extra_append = extra_append.format(tsc_khz=(tsc_khz or guest_tsc_khz)())
    return extra_append, pyvmm_options, qemu_options
