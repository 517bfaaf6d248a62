"""Builds a Machine, one step after another, in the order its parts need each other.

`MachineBuilder.for_boot(config, console)` makes the machine of a fresh
boot (the runner makes one per boot: a guest reboot gets a new one):

1. `create_vm`     /dev/kvm, the VM, its in-kernel irqchip and PIT, the
                   PC's GSI routes
2. `add_memory`    guest RAM (and Xen's special pages), mapped into KVM's
                   memory slots
3. `add_devices`   the port and MMIO buses, the PC platform, the Xen domain
                   (event channels, grant table, xenstore, backends): each
                   given the VM's Tracer and FaultInjector
4. `load_guest`    the E820 map, the ACPI tables and the kernel; what vCPU 0
                   starts with (`Machine.boot_state`); without a kernel, the
                   BIOS firmware and its fw_cfg items instead
5. `add_debugger`  the gdb stub, when --gdb asks for one

Nothing here listens on a socket or starts a thread: `Machine.open_listeners()`
and `Machine.run()` do, after the runner has locked the sandbox down
(runner.py, pyvmm/sandbox.py).

`from_snapshot(snapshot, config, console)` is the other way: a machine
resumed from saved state (pyvmm/vmm/snapshot.py, docs/SNAPSHOTS.md). It
checks that this host, these disks and NICs can take the snapshot, then
takes steps 1 and 3 as a boot does, step 2 from the snapshot file (RAM
mapped from it, copy-on-write), gives every stateful part its saved state
(`restore_state()`, pyvmm/core/snapshot.py) and KVM its irqchip and PIT,
and leaves the rest to `Machine.run`: each vCPU's registers on its own
thread, then the guest's clock and KVM's Xen attributes, before any
instruction runs. No kernel is loaded.
"""

from __future__ import annotations

import hashlib
import struct
import time

from ..boot.acpi import build_acpi
from ..boot.e820 import build_e820
from ..boot.acpi import build_loader_files
from ..boot.firmware import DEFAULT_FIRMWARE, firmware_e820, low_placement, read_firmware, reset_state, rom_placement
from ..boot.loader import load_kernel
from ..devices.rom import Rom
from ..devices.fw_cfg import BOOT_MENU, MAX_CPUS, NB_CPUS, NOGRAPHIC, RAM_SIZE, UUID
from ..config import VmConfig
from ..core import layout
from ..core.bus import Bus
from ..core.console import ConsoleOutput
from ..core.faults import FaultInjector
from ..core.memory import GuestMemory, MemoryRegion
from ..core.snapfile import SnapshotFile
from ..core.snapshot import SnapshotError
from ..core.trace import Tracer
from ..kvm import Kvm, map_guest_memory, pc_irqchip_routes
from ..kvm import state as kvm_state
from ..platform import Platform
from ..xen import backends as _backends  # noqa: F401 - the device kinds' trace categories and fault targets
from .machine import Machine
from .snapshot import RestorePlan, check_restore, host_identity


class MachineBuilder:
    """Makes one Machine. `trace` and `faults` are the VM's (the runner's,
    for the whole run); without them the machine gets its own, off and
    without rules, shared with no other machine. Either knows every device
    kind's trace category and fault target (pyvmm.xen.backends, imported
    here), with or without Xen."""

    def __init__(self, config: VmConfig, console: ConsoleOutput, *, trace: Tracer | None = None,
                 faults: FaultInjector | None = None):
        trace = trace if trace is not None else Tracer()
        faults = faults if faults is not None else FaultInjector(trace)
        self.config = config
        self.console = console
        self.machine = Machine(config, console, trace=trace, faults=faults)

    @classmethod
    def for_boot(cls, config: VmConfig, console: ConsoleOutput, *, trace: Tracer | None = None,
                 faults: FaultInjector | None = None) -> Machine:
        """The machine of a fresh boot: every step, the guest's kernel loaded."""
        builder = cls(config, console, trace=trace, faults=faults)
        builder.create_vm()
        builder.add_memory()
        builder.add_devices()
        builder.load_guest()
        builder.add_debugger()
        return builder.finish()

    @classmethod
    def from_snapshot(cls, snapshot: SnapshotFile, config: VmConfig, console: ConsoleOutput, *,
                      trace: Tracer | None = None, faults: FaultInjector | None = None,
                      state: dict | None = None) -> Machine:
        """A machine that resumes the guest of `snapshot` (opened and
        checked as a file: pyvmm/core/snapfile.py) when it runs. `config`
        is the restored VM's (vmm/snapshot.py: restored_config); `state` the
        snapshot's state if it was read already. SnapshotError, in one
        line, when this host, the disks or the NICs cannot take it."""
        started = time.monotonic()
        state = snapshot.state() if state is None else state
        builder = cls(config, console, trace=trace, faults=faults)
        steps = []
        try:
            builder.create_vm()
            check_restore(snapshot, state, config, builder.machine.kvm)
            steps.append(("VM and checks", time.monotonic()))
            builder.add_memory(snapshot)
            steps.append(("RAM mapped", time.monotonic()))
            builder.add_devices()
            if config.firmware_boot:
                builder._map_firmware()
                if builder.machine.firmware_digest != snapshot.header.get("firmware"):
                    raise SnapshotError(f"{snapshot.path}: firmware {config.firmware or DEFAULT_FIRMWARE} is not "
                                        f"the one the guest booted with (SHA-256 {snapshot.header.get('firmware')})")
            steps.append(("devices built", time.monotonic()))
            builder.restore_parts(snapshot.path, state)
            steps.append(("parts restored", time.monotonic()))
            plan = builder.machine.restore_plan
            plan.started, plan.steps = started, steps
            builder.add_debugger()
        except BaseException:
            builder.abandon()
            raise
        return builder.finish()

    # --- the steps, in order ------------------------------------------------------

    def create_vm(self) -> None:
        """1. The KVM VM, with the in-kernel irqchip and PIT a PC has."""
        machine = self.machine
        machine.kvm = Kvm()
        machine.vm = vm = machine.kvm.create_vm()
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.create_irqchip()
        # The PIT ticks on GSI 0, which a PC wires to IOAPIC pin 2 (the MADT
        # says so with an interrupt source override); KVM's default routes don't.
        vm.set_gsi_routing(pc_irqchip_routes())
        vm.create_pit2()
        host_identity(machine.kvm)  # read now: /proc/cpuinfo cannot be opened once the sandbox is locked

    def add_memory(self, snapshot: SnapshotFile | None = None) -> None:
        """2. Guest RAM, in KVM's memory slots: fresh, or mapped from a snapshot."""
        machine, config = self.machine, self.config
        ranges = layout.ram_ranges(config.memory)
        if config.xen:
            # Xen's special pages (console and xenstore rings): memory the
            # guest can map, reserved in its E820 map.
            ranges.append((layout.XEN_SPECIAL_PAGES, layout.XEN_SPECIAL_PAGES_SIZE))
        if snapshot is None:
            machine.memory = GuestMemory(ranges)
        else:
            saved = sorted((gpa, size) for gpa, size, _ in snapshot.regions)
            if saved != sorted(ranges):
                raise SnapshotError(f"{snapshot.path}: corrupt: its RAM regions are not those of a "
                                    f"{config.memory >> 20} MiB {'Xen ' if config.xen else ''}guest")
            machine.memory = snapshot.map_memory()
        map_guest_memory(machine.vm.memslots, machine.memory)

    def add_devices(self) -> None:
        """3. The buses, the PC platform on them, and the Xen domain."""
        machine = self.machine
        machine.pio = Bus("port I/O", 1 << 16)
        machine.mmio = Bus("MMIO", 1 << 64)
        machine.platform = Platform(machine, self.console)
        machine.xen = None
        if self.config.xen:
            from ..xen.domain import XenDomain

            machine.xen = XenDomain(machine)

    def restore_parts(self, path: str, state: dict) -> None:
        """3b. (from_snapshot) Every stateful part takes back its saved
        state, and KVM its PICs, IOAPIC and PIT; the vCPUs, the clock and
        KVM's Xen attributes wait for Machine.run."""
        machine = self.machine
        parts = machine.stateful_parts()
        saved = state.get("parts")
        if not isinstance(saved, dict) or set(saved) != set(parts):
            have = ", ".join(sorted(saved)) if isinstance(saved, dict) else "none"
            raise SnapshotError(f"{path}: it holds the state of {have}; this VM is made of {', '.join(parts)}")
        for name, part in parts.items():
            try:
                part.restore_state(saved[name])
            except SnapshotError as error:
                raise SnapshotError(f"{path}: {name}: {error}") from None
        try:
            kvm_state.restore_vm(machine.vm, state["kvm"]["vm"])
        except kvm_state.KvmStateError as error:
            raise SnapshotError(f"{path}: {error}") from None
        machine.boot_state = None
        machine.restore_plan = RestorePlan(path, state["kvm"], parts)

    def load_guest(self) -> None:
        """4. The firmware tables and the kernel: vCPU 0's first state."""
        machine, config = self.machine, self.config
        if config.firmware_boot:
            self._load_firmware()
            return
        e820 = build_e820(config.memory)
        rsdp = build_acpi(machine.memory, config.vcpus)
        machine.boot_state = load_kernel(
            machine.memory, config.kernel, config.initrd, config.cmdline, rsdp_address=rsdp, e820=e820
        )

    def _load_firmware(self) -> None:
        """Without a kernel: BIOS firmware, and what it learns through fw_cfg."""
        machine = self.machine
        image = self._map_firmware()
        # The copy below 1 MiB is RAM, as a BIOS leaves its shadow after it
        # has unlocked it: SeaBIOS keeps its variables there.
        machine.memory.write(*low_placement(image))
        machine.boot_state = reset_state()

    def _map_firmware(self) -> bytes:
        """The firmware's top copy, as ROM (a write exits and is dropped by
        the bus), and its fw_cfg items: what a boot and a restore of a
        firmware-booted guest both build (its copy in RAM is the guest's).
        Returns the firmware image."""
        machine, config = self.machine, self.config
        image = read_firmware(config.firmware or DEFAULT_FIRMWARE)
        machine.firmware_digest = hashlib.sha256(image).hexdigest()
        gpa, rom = rom_placement(image)
        machine.firmware_rom = region = MemoryRegion.allocate(gpa, len(rom))
        region.mapping[:] = rom
        machine.vm.memslots.map(gpa, len(rom), region.host_address, readonly=True)
        machine.mmio.register(gpa, len(rom), Rom(rom), "firmware ROM")

        fw_cfg = machine.platform.fw_cfg
        low = layout.ram_ranges(config.memory)[0][1]
        fw_cfg.add_item(RAM_SIZE, struct.pack("<Q", config.memory))
        fw_cfg.add_item(NB_CPUS, struct.pack("<H", config.vcpus))
        fw_cfg.add_item(MAX_CPUS, struct.pack("<H", config.vcpus))
        fw_cfg.add_item(NOGRAPHIC, struct.pack("<H", 1))  # SeaBIOS's console goes to COM1
        fw_cfg.add_item(BOOT_MENU, struct.pack("<H", 0))
        fw_cfg.add_item(UUID, bytes(16))
        fw_cfg.add_file("etc/e820", firmware_e820(config.memory, config.xen))
        for name, data in build_loader_files(config.vcpus).items():
            fw_cfg.add_file(name, data)
        fw_cfg.add_file("etc/boot-fail-wait", struct.pack("<I", 5))
        fw_cfg.add_file("bootorder", boot_order(machine.platform.ide_slot, config))
        assert low > layout.LOW_RESERVED_END  # VmConfig's minimum memory guarantees it
        return image

    def add_debugger(self) -> None:
        """5. The gdb stub (it listens and starts with the machine, not here)."""
        machine, config = self.machine, self.config
        if config.gdb is None:
            return
        from ..debug.gdbstub import serve_gdb

        machine.gdb = serve_gdb(machine, config.gdb, config.gdb_wait)
        if config.gdb_wait:
            machine.hold_vcpus()  # until gdb says continue

    def abandon(self) -> None:
        """Release what the steps so far made (a restore that was refused)."""
        machine = self.machine
        xen = getattr(machine, "xen", None)
        if xen is not None:
            xen.close()
        platform = getattr(machine, "platform", None)
        if platform is not None:
            platform.close()
        machine.loop.close()
        for name in ("vm", "memory", "kvm"):
            part = getattr(machine, name, None)
            if part is not None:
                part.close()

    def finish(self) -> Machine:
        self.machine.started_at = time.monotonic()
        return self.machine


def boot_order(ide_slot: int, config) -> bytes:
    """fw_cfg's `bootorder`: the IDE drives to boot, first choice first,
    then HALT. Without it SeaBIOS also tries a floppy drive it reads of in
    the CMOS. SeaBIOS names an ATA drive by its PCI path, then
    /drive@CHANNEL/disk@MASTER_OR_SLAVE (src/boot.c): the disk is the
    primary master, the CD-ROM the secondary master."""
    disk = f"/pci@i0cf8/ide@{ide_slot:x}/drive@0/disk@0"
    cdrom = f"/pci@i0cf8/ide@{ide_slot:x}/drive@1/disk@0"
    drives = []
    if config.devices_of("blk"):
        drives.append(disk)
    if config.cdrom is not None:
        drives.insert(0 if config.boots_cdrom else len(drives), cdrom)
    return "\n".join([*drives, "HALT"]).encode()
