"""A stand-in for a Machine behind the gdb stub: flat memory, plain registers.

Only for the stub's pure logic: `resume()` records what KVM would have been
told, and `hit` (when set) plays a vCPU reaching an address.
"""

from __future__ import annotations

import threading

from pyvmm.debug.gdbstub.session import MemoryFault

BASE = 0xFFFFFFFF81000000
SIZE = 0x3000


class FakeTarget:
    block_irq_on_step = True
    breakpoints_in_debug_registers = False

    def __init__(self, vcpus: int = 2):
        self.vcpu_count = vcpus
        self.memory = bytearray(range(256)) * (SIZE // 256)
        self.regs = [{"rip": BASE + 0x100 * (i + 1), "rsp": 0x8000 + i, "eflags": 0x2, "cs": 0x10}
                     for i in range(vcpus)]
        self.resumes: list[list[tuple[int, list[int]]]] = []
        self.stops = 0
        self.killed = False
        self.on_resume = None  # called with the debug list, after recording it
        self.resumed = threading.Event()

    def registers(self, vcpu: int) -> dict[str, int]:
        return dict(self.regs[vcpu])

    def set_registers(self, vcpu: int, values: dict[str, int]) -> None:
        self.regs[vcpu].update(values)

    def _offset(self, address: int, length: int) -> int:
        if not (BASE <= address and address + length <= BASE + SIZE):
            raise MemoryFault(f"{address:#x}")
        return address - BASE

    def read_memory(self, vcpu: int, address: int, length: int) -> bytes:
        offset = self._offset(address, length)
        return bytes(self.memory[offset : offset + length])

    def write_memory(self, vcpu: int, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data))
        self.memory[offset : offset + len(data)] = data

    def stop(self) -> None:
        self.stops += 1

    def resume(self, debug) -> None:
        self.resumes.append(list(debug))
        self.resumed.set()
        if self.on_resume is not None:
            self.on_resume(debug)

    def reinject(self, vcpu: int, vector: int, pc: int) -> None:
        pass

    def kill(self) -> None:
        self.killed = True
