"""One gdb connection: packets in, replies out, against a Target.

gdb sees one thread per vCPU (thread id = vCPU index + 1). The session
holds the protocol state (selected threads, no-ack mode, breakpoints)
and leaves running and stopping the guest to the Target, so it is
unit-tested with a fake one. `handle()` answers a packet; it returns None
when the answer comes later (c, s, vCont: the stop reply) or never (k).
"""

from __future__ import annotations

import logging
from typing import Protocol

from . import protocol as p
from .breakpoints import BreakpointError, Breakpoints, Stop

log = logging.getLogger(__name__)

ERROR_FAULT = b"E14"  # EFAULT: memory gdb may not touch
ERROR_ARGUMENT = b"E16"  # a packet whose arguments make no sense
ERROR_FAILED = b"E01"


class MemoryFault(Exception):
    """A guest virtual address with no RAM behind it."""


class Target(Protocol):
    vcpu_count: int
    block_irq_on_step: bool
    breakpoints_in_debug_registers: bool  # no int3s: see Breakpoints

    def registers(self, vcpu: int) -> dict[str, int]: ...
    def set_registers(self, vcpu: int, values: dict[str, int]) -> None: ...
    def read_memory(self, vcpu: int, address: int, length: int) -> bytes: ...
    def write_memory(self, vcpu: int, address: int, data: bytes) -> None: ...
    def stop(self) -> None: ...
    def resume(self, debug: list[tuple[int, list[int]]]) -> None: ...
    def kill(self) -> None: ...


class Session:
    def __init__(self, target: Target):
        self.target = target
        self.no_ack = False
        self.running = False
        self.detached = False
        self.stepping: int | None = None
        self.vcpu = 0  # the thread Hg selected: registers and memory go through it
        self.last_stop = Stop(0, 5)
        self.gdb_features: set[bytes] = set()
        self.breakpoints = Breakpoints(self._read_current, self._write_current,
                                       target.breakpoints_in_debug_registers)

    # --- stops --------------------------------------------------------------------

    def stop_reply(self, stop: Stop) -> bytes:
        self.running = False
        self.stepping = None
        self.last_stop = stop
        self.vcpu = stop.vcpu
        reply = b"T%02xthread:%x;" % (stop.signal, stop.vcpu + 1)
        if stop.reason in ("watch", "rwatch", "awatch"):
            reply += b"%s:%x;" % (stop.reason.encode(), stop.address)
        elif stop.reason and stop.reason.encode() + b"+" in self.gdb_features:
            reply += stop.reason.encode() + b":;"
        return reply

    def classify(self, vcpu: int, exception: int, pc: int, dr6: int):
        """A vCPU's debug exit as a Stop, or a Reinject for the guest's own."""
        return self.breakpoints.classify(vcpu, exception, pc, dr6, self.stepping == vcpu)

    # --- packets --------------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes | None:
        try:
            return self._dispatch(payload)
        except p.ProtocolError as error:
            log.debug("gdb: %s in %.60r", error, payload)
            return ERROR_ARGUMENT
        except MemoryFault:
            return ERROR_FAULT
        except BreakpointError as error:
            log.warning("gdb: %s", error)
            return ERROR_FAILED

    def _dispatch(self, payload: bytes) -> bytes | None:
        if not payload:
            return b""
        command, rest = payload[:1], payload[1:]
        if command == b"q" or command == b"Q":
            return self._query(payload)
        if command == b"v":
            return self._v_packet(payload)
        handler = {
            b"?": lambda _: self.stop_reply(self.last_stop),
            b"g": lambda _: p.encode_registers(self.target.registers(self.vcpu)),
            b"G": self._write_all_registers,
            b"p": self._read_register,
            b"P": self._write_register,
            b"m": self._read_memory,
            b"M": self._write_memory_hex,
            b"X": self._write_memory_binary,
            b"c": lambda rest: self._resume_with_address(rest, None),
            b"s": lambda rest: self._resume_with_address(rest, self.vcpu),
            b"H": self._set_thread,
            b"T": self._thread_alive,
            b"Z": lambda rest: self._breakpoint(rest, True),
            b"z": lambda rest: self._breakpoint(rest, False),
            b"D": self._detach,
            b"k": self._kill,
        }.get(command)
        if handler is None:
            return b""  # unsupported: gdb falls back or does without
        return handler(rest)

    def _query(self, payload: bytes) -> bytes:
        name, _, args = payload.partition(b":")
        if name == b"qSupported":
            self.gdb_features = set(args.split(b";"))
            return (b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;vContSupported+;swbreak+;hwbreak+"
                    % p.PACKET_SIZE)
        if name == b"QStartNoAckMode":
            self.no_ack = True  # takes effect after this reply, which is still acked
            return b"OK"
        if name == b"qAttached":
            return b"1"  # detach, do not kill, when gdb quits
        if name == b"qC":
            return b"QC%x" % (self.vcpu + 1)
        if name == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (i + 1) for i in range(self.target.vcpu_count))
        if name == b"qsThreadInfo":
            return b"l"
        if name == b"qThreadExtraInfo":
            vcpu = self._vcpu_of(p.parse_thread_id(payload.partition(b",")[2]))
            return f"vCPU {vcpu}".encode().hex().encode()
        if name == b"qXfer":
            return self._xfer(args)
        return b""

    def _xfer(self, args: bytes) -> bytes:
        fields = args.split(b":")
        if len(fields) != 4 or fields[:2] != [b"features", b"read"]:
            return b""
        if fields[2] != b"target.xml":
            return b"E00"
        offset, length = p.parse_address_length(fields[3])
        return p.xfer_slice(p.target_xml(), offset, min(length, p.PACKET_SIZE - 16))

    def _v_packet(self, payload: bytes) -> bytes | None:
        if payload == b"vCont?":
            return b"vCont;c;C;s;S"
        if payload.startswith(b"vCont;"):
            return self._vcont(payload[6:])
        if payload == b"vMustReplyEmpty":
            return b""
        return b""

    # --- registers --------------------------------------------------------------------

    def _write_all_registers(self, rest: bytes) -> bytes:
        self.target.set_registers(self.vcpu, p.decode_registers(rest))
        return b"OK"

    def _read_register(self, rest: bytes) -> bytes:
        number = p.parse_hex(rest, "register", 16)
        if number >= len(p.REGISTERS):
            return ERROR_ARGUMENT
        return p.encode_register(number, self.target.registers(self.vcpu))

    def _write_register(self, rest: bytes) -> bytes:
        number, equals, value = rest.partition(b"=")
        if not equals:
            raise p.ProtocolError("expected N=VALUE")
        name, value = p.decode_register(p.parse_hex(number, "register", 16), value)
        self.target.set_registers(self.vcpu, {name: value})
        return b"OK"

    # --- memory -----------------------------------------------------------------------

    def _read_current(self, address: int, length: int) -> bytes:
        return self.target.read_memory(self.vcpu, address, length)

    def _write_current(self, address: int, data: bytes) -> None:
        self.target.write_memory(self.vcpu, address, data)

    def _read_memory(self, rest: bytes) -> bytes:
        address, length = p.parse_address_length(rest)
        length = min(length, (p.PACKET_SIZE - 8) // 2)
        data = self._read_partial(address, length)
        if length and not data:
            return ERROR_FAULT
        # gdb's own int3 bytes are not part of the guest's code: show what they hide.
        shown = bytearray(data)
        for bp_address, original in list(self.breakpoints.software.items()):
            if address <= bp_address < address + len(shown):
                shown[bp_address - address] = original[0]
        return shown.hex().encode()

    def _read_partial(self, address: int, length: int) -> bytes:
        """As much of the range as is mapped from its start (a short m reply is allowed)."""
        out = bytearray()
        while len(out) < length:
            here = address + len(out)
            count = min(length - len(out), 4096 - (here & 4095))
            try:
                out += self.target.read_memory(self.vcpu, here, count)
            except MemoryFault:
                break
        return bytes(out)

    def _write_memory_hex(self, rest: bytes) -> bytes:
        where, colon, data = rest.partition(b":")
        if not colon:
            raise p.ProtocolError("expected ADDR,LENGTH:DATA")
        address, length = p.parse_address_length(where)
        data = p.hex_bytes(data)
        if len(data) != length:
            raise p.ProtocolError("M packet length does not match its data")
        return self._write(address, data)

    def _write_memory_binary(self, rest: bytes) -> bytes:
        where, colon, data = rest.partition(b":")
        if not colon:
            raise p.ProtocolError("expected ADDR,LENGTH:DATA")
        address, length = p.parse_address_length(where)
        if len(data) != length:
            raise p.ProtocolError("X packet length does not match its data")
        return self._write(address, data)

    def _write(self, address: int, data: bytes) -> bytes:
        if data:
            self.target.write_memory(self.vcpu, address, data)
        return b"OK"

    # --- threads --------------------------------------------------------------------

    def _vcpu_of(self, thread: int) -> int:
        """The vCPU a thread id names; 0 and -1 (any, all) mean the current one."""
        if thread in (0, -1):
            return self.vcpu
        if not 1 <= thread <= self.target.vcpu_count:
            raise p.ProtocolError(f"no thread {thread}")
        return thread - 1

    def _set_thread(self, rest: bytes) -> bytes:
        kind, thread = rest[:1], p.parse_thread_id(rest[1:])
        vcpu = self._vcpu_of(thread)
        if kind == b"g":
            self.vcpu = vcpu
        elif kind != b"c":  # Hc only names the thread c/s act on: vCont does that better
            raise p.ProtocolError("expected Hg or Hc")
        return b"OK"

    def _thread_alive(self, rest: bytes) -> bytes:
        thread = p.parse_thread_id(rest)
        return b"OK" if 1 <= thread <= self.target.vcpu_count else ERROR_FAILED

    # --- running ----------------------------------------------------------------------

    def _resume_with_address(self, rest: bytes, step: int | None) -> None:
        if rest:
            self.target.set_registers(self.vcpu, {"rip": p.parse_hex(rest, "address")})
        self.resume(step)
        return None

    def _vcont(self, actions: bytes) -> bytes | None:
        step = None
        for action in actions.split(b";"):
            verb, _, thread = action.partition(b":")
            if not verb or verb[:1] not in b"cCsS":
                raise p.ProtocolError(f"vCont action {verb[:8]!r} is not supported")
            if verb[:1] in b"sS":
                vcpu = self._vcpu_of(p.parse_thread_id(thread)) if thread else self.vcpu
                step = vcpu if step is None else step
        self.resume(step)
        return None

    def resume(self, step: int | None) -> None:
        """Let every vCPU run, `step` (if any) for one instruction."""
        self.stepping = step
        debug = [
            self.breakpoints.debug_control(vcpu == step, self.target.block_irq_on_step)
            for vcpu in range(self.target.vcpu_count)
        ]
        self.running = True
        self.target.resume(debug)

    def interrupted(self) -> bytes:
        """gdb sent Ctrl-C: stop everything and say so."""
        self.target.stop()
        return self.stop_reply(Stop(self.vcpu, 2))

    def _breakpoint(self, rest: bytes, insert: bool) -> bytes:
        kind, address, length = p.parse_breakpoint(rest)
        if kind > 4:
            return b""
        if insert:
            self.breakpoints.insert(kind, address, length)
            return b"OK"
        self.breakpoints.remove(kind, address, length)
        return b"OK"

    # --- leaving ------------------------------------------------------------------------

    def release(self) -> None:
        """Take every breakpoint out and let the guest run undisturbed."""
        self.breakpoints.remove_all()
        self.stepping = None
        self.target.resume([(0, [0] * 8)] * self.target.vcpu_count)
        self.running = True
        self.detached = True

    def _detach(self, rest: bytes) -> bytes:
        self.release()
        return b"OK"

    def _kill(self, rest: bytes) -> None:
        self.breakpoints.remove_all()
        self.detached = True
        self.target.kill()
        return None
