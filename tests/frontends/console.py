"""hvc_xen's half of the PV console page (struct xencons_interface): it
writes output into the out ring and publishes out_prod, and reads input
from the in ring and gives it back through in_cons, as domU_write_console()
and domU_read_console() do."""

from __future__ import annotations

from pyvmm.xen.backends.console.pvconsole import (
    IN_CONS,
    IN_OFFSET,
    IN_PROD,
    IN_SIZE,
    OUT_CONS,
    OUT_OFFSET,
    OUT_PROD,
    OUT_SIZE,
)

from .common import SharedPage


class ConsoleGuest(SharedPage):
    """The guest's half of the rings, as hvc_xen drives them."""

    def write(self, data: bytes) -> int:
        """Put as much of `data` as fits into the out ring; returns how much."""
        prod = self.u32(OUT_PROD)
        count = self.ring_put(OUT_OFFSET, OUT_SIZE, prod, self.u32(OUT_CONS), data)
        self.set_u32(OUT_PROD, prod + count)
        return count

    def read(self) -> bytes:
        """All the input the host put into the in ring."""
        cons = self.u32(IN_CONS)
        data = self.ring_take(IN_OFFSET, IN_SIZE, cons, self.u32(IN_PROD))
        self.set_u32(IN_CONS, cons + len(data))
        return data
