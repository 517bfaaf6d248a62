"""The save/restore contract every stateful part of a VM keeps.

A part whose state the guest can see and that lives outside guest RAM and
KVM (a device's registers, the event-channel table, the xenstore tree, a
backend's xenbus state) implements `Stateful`:

    save_state() -> dict           its state, as JSON-able data
    restore_state(state) -> None   the same part, freshly built, takes it back

The rules:

- **When.** Only while the VM is paused (`Machine.pause_for_snapshot()`:
  every vCPU parked outside KVM_RUN, none in the middle of a hypercall,
  the guest's clock frozen) and on the event thread, which owns the
  xenstore, the backends' handshakes and the loop's timers. Ring workers
  are quiesced first: a backend saves no request in flight, it finishes or
  drains them before saying what it holds. restore_state() is
  called on a part that MachineBuilder has just built (steps 1 to 3 of
  `for_boot`), before any vCPU or worker thread starts.
- **What.** Everything the part would need to behave, from then on, exactly
  as the saved one would have: registers, tables, counters the guest can
  observe, deadlines (as time left, not as host clock readings: a restore
  runs in another process, maybe on another host). Not what is rebuilt from
  the config (sizes, limits, paths) nor what lives in guest RAM (rings,
  shared_info, grant entries the guest wrote), which the machine saves
  whole, nor KVM's own state (vCPU registers, irqchip, PIT, kvmclock), which
  the machine saves through KVM. Host resources (file descriptors, mappings,
  eventfds) are never saved: restore_state() opens or maps them again.
- **Form.** A dict of JSON types only (str, int, float, bool, None, lists,
  dicts with str keys; bytes as hex or base64 text), so a snapshot can be
  written as JSON and read by a later pyvmm.
- **Versioning.** Every state has `"version": N` (`versioned()`), N the
  part's own format number, raised whenever a field is added, removed or
  changes meaning. restore_state() checks it (`check_version()`): it reads
  its own version and may read older ones, and refuses a newer or unknown
  one with SnapshotError rather than guess.
- **Refusing.** A part that cannot be saved in its present state (a request
  it cannot drain) raises SnapshotError saying why; the snapshot fails and
  the VM resumes as it was. A restore that raises SnapshotError leaves the
  freshly built machine half restored: it is discarded, never run.
- **The Xen parts** are saved and restored through `XenDomain` alone, whose
  state nests theirs, in the order docs/ARCHITECTURE.md gives ("The Xen
  side"): guest RAM first, then `XenDomain.restore_state()`, then KVM's
  state, then `XenDomain.finish_restore()`.

The parts that must keep the contract are `STATEFUL` below (and in
docs/ARCHITECTURE.md); tests/unit/core/test_snapshot.py checks that each of
them declares both methods.

A whole VM is saved and restored by the machine (pyvmm/vmm/snapshot.py,
docs/SNAPSHOTS.md), through the parts `Machine.stateful_parts()` names
(the PC devices, and the Xen domain, which calls its own parts). A part
may also have `finish_restore()`: the machine calls it after every part's
restore_state() and after KVM's own state (vCPUs, clock, KVM's Xen
attributes) is back, before any vCPU runs, for what needs KVM first. And
`resume_after_save()`: a part that keeps something still after its
save_state() (so that guest RAM does not change before the machine has
saved it) is called once the snapshot is written (unless the VM stops),
or when the snapshot fails after the part was saved.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# module:Class of every part that must implement Stateful, from the bottom up.
STATEFUL = (
    "pyvmm.devices.serial:Serial16550",  # registers, FIFOs, pending interrupts
    "pyvmm.devices.rtc:CmosRtc",  # CMOS RAM, index, alarm and periodic settings, clock offset
    "pyvmm.devices.i8042:I8042",  # command byte, output buffer, pending command
    "pyvmm.devices.acpi_pm:AcpiPm",  # PM1 status/enable/control, the PM timer's origin
    "pyvmm.devices.pci:PciHost",  # config address, every device's config space (BARs as placed)
    "pyvmm.devices.fw_cfg:FwCfg",  # the selected item and the offset in it
    "pyvmm.devices.ide.piix:BusMaster",  # command, status, PRD table address (in its channel's state)
    "pyvmm.devices.ide.ata:AtaChannel",  # task file, the DRQ block in flight, the unplug
    "pyvmm.devices.ide.atapi:AtapiChannel",  # and the packet, the reply in flight, the sense
    "pyvmm.xen.hv.xen_platform:XenPlatformDevice",  # its registers, what the guest unplugged
    "pyvmm.xen.hv.timers:UserTimer",  # a vCPU's Xen timer: time left, period
    "pyvmm.xen.hv.evtchn:EventChannels",  # the port table, VIRQ and backend bindings
    "pyvmm.xen.hv.gnttab:GrantTable",  # frames in use, the table's entries, reserved refs
    "pyvmm.xen.xenstore.store:XenStore",  # the tree, domains, watches, transactions
    "pyvmm.xen.xenstore.service:GuestStoreService",  # the guest connection's partial and queued messages
    "pyvmm.xen.backends.blk.vbd:VbdDevice",  # xenbus state, the frontend's rings and channels
    "pyvmm.xen.backends.net.vif:VifDevice",  # xenbus state, rings, posted receive buffers
    "pyvmm.xen.domain:XenDomain",  # long mode, shared_info/vcpu_info places, callback, HVM params
)


class SnapshotError(Exception):
    """A state that cannot be saved now, or cannot be restored (wrong version, bad data)."""


@runtime_checkable
class Stateful(Protocol):
    def save_state(self) -> dict:
        """This part's state (see the module's rules); VM paused, event thread."""
        ...

    def restore_state(self, state: dict) -> None:
        """Take back what save_state() gave, on a freshly built part."""
        ...


def versioned(version: int, **fields) -> dict:
    """A state dict: {"version": version, **fields}."""
    return {"version": version, **fields}


def natural(value, end: int | None = None) -> bool:
    """Whether a saved value is a count, index or address: an int (not a
    bool) from 0, below `end` if given."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 and (end is None or value < end)


def check_version(state: dict, kind: str, newest: int, oldest: int = 1) -> int:
    """The state's version, if this code reads it (oldest..newest); else SnapshotError."""
    version = state.get("version") if isinstance(state, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or not oldest <= version <= newest:
        raise SnapshotError(f"{kind}: state version {version!r} is not one this pyvmm reads ({oldest}..{newest})")
    return version
