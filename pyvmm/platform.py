"""The PC platform every guest gets: where each device sits and what it is wired to.

COM1, the CMOS RTC, the keyboard controller (for reset), the ACPI PM block
(poweroff/reset), the 0xE9 debug port, the pvpanic port and the PCI host
bridge. The ports and
interrupt numbers come from pyvmm.core.layout, which the ACPI tables also use.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Protocol

from .core import layout
from .core.bus import Bus
from .core.console import ConsoleOutput, EscapeFilter
from .devices import pci
from .devices.acpi_pm import AcpiPm
from .devices.debugcon import DebugCon, LineLog
from .devices.fw_cfg import PORT_COUNT as FW_CFG_PORTS
from .devices.fw_cfg import FwCfg
from .devices.ide.ata import COMMAND_BLOCK_PORTS, AtaChannel, ImageFile
from .devices.ide.atapi import AtapiChannel, IsoImage
from .devices.ide.piix import BusMaster, PiixIde
from .devices.i8042 import I8042
from .devices.pvpanic import PANICKED, PvPanic
from .devices.rtc import CmosRtc
from .devices.serial import REGISTER_COUNT as SERIAL_PORTS
from .devices.serial import Serial16550
from .core.eventloop import EventLoop
from .kvm import Vm
from .core.stop import StopReason
from .core.trace import Tracer

log = logging.getLogger(__name__)

RTC_POLL_SECONDS = 1.0  # how soon a newly enabled RTC interrupt is noticed
STDIN_CHUNK = 4096


class GsiLine:
    """An IrqLine driving one input of KVM's in-kernel PIC/IOAPIC."""

    def __init__(self, vm, gsi: int):
        self._vm = vm
        self.gsi = gsi

    def set_level(self, asserted: bool) -> None:
        self._vm.irq_line(self.gsi, asserted)


class Board(Protocol):
    """What the platform needs of the VM it is part of (a Machine): the VM
    its interrupt lines drive, the buses its devices sit on, its tracer, and
    a way to stop when a device powers off, resets or reports a panic."""

    vm: Vm
    pio: Bus
    mmio: Bus
    trace: Tracer

    def request_stop(self, reason: StopReason, detail: str | None = None) -> None: ...


class Platform:
    def __init__(self, machine: Board, console: ConsoleOutput):
        self.machine = machine
        self._trace = machine.trace
        vm, pio = machine.vm, machine.pio
        stop = machine.request_stop
        self._lines: dict[int, GsiLine] = {}
        log_rate = machine.config.limits.log_rate
        self._limited = log_rate.limited(log)  # lines whose rate the guest sets

        self.serial = Serial16550(self.gsi(layout.COM1_IRQ), console.write, input_wanted=self._input_wanted)
        pio.register(layout.COM1_PORT, SERIAL_PORTS, self.serial, "COM1")
        self.rtc = CmosRtc(self.gsi(layout.RTC_IRQ))
        pio.register(layout.CMOS_PORT, 2, self.rtc, "CMOS/RTC")
        self.i8042 = I8042(on_reset=lambda: stop(StopReason.REBOOT), log_rate=log_rate)
        pio.register(layout.I8042_DATA_PORT, 1, self.i8042.data_port(), "i8042 data")
        pio.register(layout.I8042_COMMAND_PORT, 1, self.i8042.command_port(), "i8042 command")
        self.acpi_pm = AcpiPm(
            self.gsi(layout.ACPI_SCI_IRQ),
            on_poweroff=lambda: stop(StopReason.POWEROFF),
            on_reset=lambda: stop(StopReason.REBOOT),
            log_rate=log_rate,
        )
        pio.register(layout.ACPI_PM_BASE, layout.ACPI_PM_BLOCK_SIZE, self.acpi_pm, "ACPI PM")
        firmware = machine.config.firmware_boot
        self.fw_cfg: FwCfg | None = None
        if firmware:
            # SeaBIOS prints its debug log on 0x402 (QEMU's port), or on 0xE9
            # once it has seen Xen's CPUID leaves: both go to pyvmm's log,
            # never to the guest's console.
            firmware_log = LineLog(logging.getLogger("pyvmm.firmware"), "firmware: ", on_line=self._firmware_said)
            self.debugcon = DebugCon(firmware_log)
            self.firmware_debug = DebugCon(firmware_log)
            pio.register(layout.FIRMWARE_DEBUG_PORT, 1, self.firmware_debug, "firmware debug port")
            self.fw_cfg = FwCfg(machine.memory)
            pio.register(layout.FW_CFG_PORT, FW_CFG_PORTS, self.fw_cfg, "fw_cfg")
        else:
            self.debugcon = DebugCon(console.write)
        pio.register(layout.DEBUGCON_PORT, 1, self.debugcon, "debug console")
        self.pvpanic = PvPanic(self._guest_panicked)
        pio.register(layout.PVPANIC_PORT, 1, self.pvpanic, "pvpanic")
        self.pci = pci.PciHost(pio, machine.mmio, self.gsi, qemu_subsystem=firmware)
        self.ide: list[AtaChannel] = []
        self.ide_image: ImageFile | None = None
        self.cdrom_image: IsoImage | None = None
        self.ide_slot: int | None = None
        if firmware:
            self._add_ide(machine)
        pio.register(layout.PCI_CONFIG_ADDRESS_PORT, pci.CONFIG_PORT_COUNT, self.pci, "PCI config")

        # Where typed input goes: COM1 unless a Xen PV console takes over.
        self.input_sink = self.serial
        self._loop: EventLoop | None = None
        self._stdin_fd: int | None = None
        self._escape: EscapeFilter | None = None
        self._pending_input = b""
        self._reading = False
        self._polled = False

    def _guest_panicked(self, events: int) -> None:
        if self._trace.stop:
            self._trace.emit("stop", "pvpanic", events=events)
        if events & PANICKED:
            log.warning("guest reported a panic (pvpanic)")
            self.machine.request_stop(StopReason.CRASH, detail="pvpanic")
        else:
            # CRASH_LOADED: the guest is booting its crash kernel, which is
            # worth letting finish (it powers off or reboots when done).
            self._limited.warning("guest reported a panic (pvpanic) and is starting its crash kernel")

    def _add_ide(self, machine: Board) -> None:
        """The PIIX3 IDE controller, the first disk as primary master: the
        disk the firmware boots, on the same image the PV disk serves; a
        --cdrom ISO as secondary master (hdc), as QEMU and Xen place it."""
        boot = machine.config.ide_disk
        if boot is not None:
            self.ide_image = ImageFile(boot.path, readonly=boot.readonly)
        if machine.config.cdrom is not None:
            self.cdrom_image = IsoImage(machine.config.cdrom)
        masters = (BusMaster(machine.memory), BusMaster(machine.memory))
        for index, (base, control, irq) in enumerate(layout.IDE_CHANNELS):
            line = self.gsi(irq)
            if index == 1 and self.cdrom_image is not None:
                channel = AtapiChannel(self.cdrom_image, line.set_level, dma=masters[index],
                                       on_error=self._limited.warning)
            else:
                channel = AtaChannel(self.ide_image if index == 0 else None, line.set_level, dma=masters[index],
                                     on_error=self._limited.warning)
            masters[index].attach(channel)
            machine.pio.register(base, COMMAND_BLOCK_PORTS, channel, f"IDE{index}")
            machine.pio.register(control, 1, channel.control_port(), f"IDE{index} control")
            self.ide.append(channel)
        self.ide_slot = self.pci.add(PiixIde(*masters))

    def unplug_ide_disks(self, keep_primary_master: bool = False) -> None:
        """The guest's PV drivers took over (xen-platform's unplug protocol):
        the emulated disks they replace stop answering, as on Xen and QEMU.
        A CD-ROM stays: it has no PV device to take its place."""
        for index, channel in enumerate(self.ide):
            if isinstance(channel, AtapiChannel):
                continue
            if channel.disk is not None and not (keep_primary_master and index == 0) and not channel.unplugged:
                channel.unplug()
                log.info("emulated IDE disk %d unplugged: the guest uses its PV disk now", index)

    def _firmware_said(self, line: str) -> None:
        # SeaBIOS's last word when no disk boots; it would retry every minute.
        if line.startswith("No bootable device"):
            log.error("the firmware found nothing to boot: %s", line)
            self.machine.request_stop(StopReason.ERROR, detail="no bootable device")

    def gsi(self, number: int) -> GsiLine:
        line = self._lines.get(number)
        if line is None:
            line = self._lines[number] = GsiLine(self.machine.vm, number)
        return line

    def start(self, loop: EventLoop) -> None:
        self._loop = loop
        self._rtc_tick()

    def _rtc_tick(self) -> None:
        self.rtc.tick()
        deadline = self.rtc.next_deadline()
        delay = RTC_POLL_SECONDS if deadline is None else min(RTC_POLL_SECONDS, max(0.0, deadline - time.time()))
        self._loop.call_later(delay, self._rtc_tick)

    # --- console input ----------------------------------------------------

    def attach_console_input(self, loop: EventLoop, fd: int, escape: EscapeFilter | None) -> None:
        """Feed `fd` (stdin) to COM1, holding input back while its FIFO is full."""
        self._loop, self._stdin_fd, self._escape = loop, fd, escape
        self._start_reading()

    def _start_reading(self) -> None:
        if self._reading or self._stdin_fd is None:
            return
        self._reading = True
        try:
            self._loop.add_reader(self._stdin_fd, self._read_stdin)
            self._polled = True
        except PermissionError:
            # A regular file (or /dev/null) cannot be polled: it is always
            # readable, so read it from the loop until it ends.
            self._polled = False
            self._loop.call_later(0, self._read_file_input)

    def _read_file_input(self) -> None:
        if self._reading and not self._polled:
            self._read_stdin()
            if self._reading:
                self._loop.call_later(0, self._read_file_input)

    def _stop_reading(self) -> None:
        if self._reading:
            if self._polled:
                self._loop.remove_reader(self._stdin_fd)
            self._reading = False

    def _read_stdin(self) -> None:
        try:
            data = os.read(self._stdin_fd, STDIN_CHUNK)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EINTR):
                return
            data = b""
        if not data:  # end of input: the guest keeps running without it
            self._stop_reading()
            self._stdin_fd = None
            return
        if self._escape is not None:
            data = self._escape.filter(data)
        self._pending_input += data
        self._deliver_input()

    def _deliver_input(self) -> None:
        if self._pending_input:
            taken = self.input_sink.receive(self._pending_input)
            self._pending_input = self._pending_input[taken:]
        if self._pending_input:
            self._stop_reading()  # resumed by _input_wanted once the guest reads
        else:
            self._start_reading()

    def _input_wanted(self) -> None:
        # Called (from any thread) when the console sink has room again.
        if self._loop is not None and self._pending_input:
            self._loop.call_soon_threadsafe(self._deliver_input)

    def input_wanted(self) -> None:
        self._input_wanted()

    def close(self) -> None:
        self._stop_reading()
        for image in (self.ide_image, self.cdrom_image):
            if image is not None:
                image.close()
