"""A gdb remote stub for the guest: `pyvmm run --gdb tcp:HOST:PORT` (docs/GDB.md).

`protocol` frames packets and lays out registers, `breakpoints` maps gdb's
breakpoints onto KVM's guest-debug interface, `session` answers one gdb,
and `server` serves it over TCP against a running Machine.
"""

from .server import GdbServer, GdbStubError, MachineTarget, check_guest_debug, serve_gdb

__all__ = ["GdbServer", "GdbStubError", "MachineTarget", "check_guest_debug", "serve_gdb"]
