"""The primary PV console as a device kind: only a trace category, since the
domain builds the console itself with its special pages (pyvmm/xen/domain.py)
and no option or xl.cfg key describes it."""

from __future__ import annotations

from pyvmm.xen.backend.kind import DeviceKind

CONSOLE = DeviceKind(
    name="console",
    summary="the guest's primary PV console (hvc0)",
    trace=(("console", "PV console bytes in and out, summarised"),),
)
