"""Getting a guest started: kernel loaders, the memory map and ACPI tables.

The machine builds the E820 map and the ACPI tables, loads the kernel with
load_kernel() and applies the returned BootCpuState to the boot vCPU.
"""

from .acpi import build_acpi
from .cpustate import BootCpuState, DescriptorTable, Segment
from .e820 import E820Entry, E820Type, build_e820
from .errors import BootError
from .loader import load_kernel

__all__ = [
    "BootCpuState", "BootError", "DescriptorTable", "E820Entry", "E820Type", "Segment",
    "build_acpi", "build_e820", "load_kernel",
]
