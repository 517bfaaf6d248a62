"""The gdb stub's server (TCP, loopback unless allowed otherwise, or a unix
socket) and its hold on a running Machine.

One thread accepts one gdb at a time and speaks the protocol; vCPU threads
report debug exits to it. Stopping the world is the Machine's pause(): a
stopped guest is a paused one (its clock frozen too), and the vCPU ioctls
that read registers and translate addresses are then made from this
thread, which KVM allows while a vCPU is outside KVM_RUN (its vCPU lock
orders them after a KVM_RUN that a kick is ending).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import queue
import select
import socket
import stat
import sys
import threading

from pyvmm.core.kept import KEPT
from pyvmm.kvm import KvmUnavailable, uapi
from pyvmm.kvm.uapi import ffi
from pyvmm.xen.hv.guest_access import PAGE_SIZE, GuestAccess, GuestFault
from . import protocol as p
from .breakpoints import BP_VECTOR, INT3, Reinject, Stop
from .session import MemoryFault, Session

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _socket_answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class GdbStubError(Exception):
    """The stub cannot start (address in use, bad address); one line for the user."""


def check_guest_debug(kvm) -> None:
    """Refuse --gdb clearly where KVM cannot debug guests."""
    if not kvm.check_extension(uapi.KVM_CAP_SET_GUEST_DEBUG):
        raise KvmUnavailable(
            errno.EOPNOTSUPP, None,
            "this host's KVM lacks KVM_CAP_SET_GUEST_DEBUG, so --gdb cannot debug guests here",
        )


class MachineTarget:
    """The Session's view of a Machine: vCPU registers, memory, run and stop."""

    def __init__(self, machine):
        self.machine = machine
        self.vcpu_count = machine.config.vcpus
        self.breakpoints_in_debug_registers = machine.config.gdb_breakpoints == "debugregs"
        supported = machine.kvm.check_extension(uapi.KVM_CAP_SET_GUEST_DEBUG2)
        self.block_irq_on_step = bool(supported & uapi.KVM_GUESTDBG_BLOCKIRQ)
        self.debug = [(0, [0] * 8)] * self.vcpu_count  # what each vCPU was last given

    # --- registers ------------------------------------------------------------------

    def registers(self, vcpu: int) -> dict[str, int]:
        cpu = self.machine.vcpu(vcpu)
        regs, sregs, fpu = cpu.get_regs(), cpu.get_sregs(), cpu.get_fpu()
        values = {name: getattr(regs, name) for name in p.GPR_NAMES}
        values["rip"], values["eflags"] = regs.rip, regs.rflags
        for name in p.SEGMENT_NAMES:
            values[name] = getattr(sregs, name).selector
        values["fs_base"], values["gs_base"] = sregs.fs.base, sregs.gs.base
        stack = [bytes(ffi.buffer(fpu.fpr[i]))[:10] for i in range(8)]
        for i, st in enumerate(stack):
            values[f"st{i}"] = int.from_bytes(st, "little")
        values["fctrl"], values["fstat"] = fpu.fcw, fpu.fsw
        values["ftag"] = p.x87_tag_word(fpu.ftwx, fpu.fsw, stack)
        values["fiseg"], values["foseg"] = 0, 0
        values["fioff"], values["fooff"] = fpu.last_ip & 0xFFFFFFFF, fpu.last_dp & 0xFFFFFFFF
        values["fop"] = fpu.last_opcode
        for i in range(16):
            values[f"xmm{i}"] = int.from_bytes(bytes(ffi.buffer(fpu.xmm[i])), "little")
        values["mxcsr"] = fpu.mxcsr
        return values

    def set_registers(self, vcpu: int, values: dict[str, int]) -> None:
        """General registers, rip and eflags; segment and FPU state stay as they are."""
        names = set(p.GPR_NAMES) | {"rip", "eflags"}
        if not names & values.keys():
            return
        cpu = self.machine.vcpu(vcpu)
        regs = cpu.get_regs()
        for name in names & values.keys():
            setattr(regs, "rflags" if name == "eflags" else name, values[name])
        cpu.set_regs(regs)

    # --- memory (guest virtual, through the vCPU's page tables) --------------------------

    def _access(self, vcpu: int) -> GuestAccess:
        return GuestAccess(self.machine.vcpu(vcpu).translate, self.machine.memory)

    def read_memory(self, vcpu: int, address: int, length: int) -> bytes:
        try:
            return self._access(vcpu).read(address, length)
        except GuestFault as error:
            raise MemoryFault(str(error)) from None

    def write_memory(self, vcpu: int, address: int, data: bytes) -> None:
        """Writes go to the RAM behind the mapping even where the guest maps it
        read-only (kernel text): that is where breakpoints go."""
        access = self._access(vcpu)
        try:
            pieces = []
            done = 0
            while done < len(data):
                here = address + done
                count = min(len(data) - done, PAGE_SIZE - (here % PAGE_SIZE))
                pieces.append((access.translate_gpa(here, count, write=False), data[done : done + count]))
                done += count
        except GuestFault as error:
            raise MemoryFault(str(error)) from None
        for gpa, chunk in pieces:  # every page checked before the first byte changes
            self.machine.memory.write(gpa, chunk)

    # --- running -----------------------------------------------------------------------

    def stop(self) -> None:
        self.machine.pause()

    def resume(self, debug: list[tuple[int, list[int]]]) -> None:
        for index, (control, debugregs) in enumerate(debug):
            self.machine.vcpu(index).set_guest_debug(control, debugregs)
        self.debug = list(debug)
        self.machine.resume()

    def reinject(self, vcpu: int, vector: int, pc: int) -> None:
        """Give the guest back a #BP or #DB of its own (on that vCPU's thread)."""
        if vector == BP_VECTOR:
            try:
                if self.read_memory(vcpu, pc, 1) != INT3:
                    return  # our int3, removed since: the original instruction is back
            except MemoryFault:
                return
        control, debugregs = self.debug[vcpu]
        flag = uapi.KVM_GUESTDBG_INJECT_BP if vector == BP_VECTOR else uapi.KVM_GUESTDBG_INJECT_DB
        self.machine.vcpu(vcpu).set_guest_debug(control | flag | uapi.KVM_GUESTDBG_ENABLE, debugregs)

    def kill(self) -> None:
        from pyvmm.core.stop import StopReason

        self.machine.request_stop(StopReason.QUIT)


def serve_gdb(machine, address, wait: bool) -> "GdbServer":
    """The stub for `machine` (started by Machine.run once its vCPUs exist)."""
    check_guest_debug(machine.kvm)
    return GdbServer(MachineTarget(machine), address.host, address.port, wait, path=address.path)


class GdbServer:
    """Serves `target` on TCP host:port, or on the unix socket `path` (made
    mode 0600, removed on close). The caller decides whether a host beyond
    loopback is acceptable (VmConfig.validate); start() then warns."""

    def __init__(self, target, host: str, port: int, wait: bool, *, path: str | None = None):
        self.host, self.port, self.wait, self.path = host, port, wait, path
        self.target = target
        self.session: Session | None = None
        self._listener: socket.socket | None = None
        self._connection: socket.socket | None = None
        self._stops: queue.Queue = queue.Queue()
        self._wake_read, self._wake_write = os.pipe()
        self._closing = False
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen (unless listen() did) and serve; with `wait` the vCPUs stay
        parked until gdb resumes them."""
        self.listen()
        self._thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        self._thread.start()

    def listen(self) -> None:
        """Bind the listening socket (before the sandbox locks the VMM down).
        Under the sandbox it is made once and kept across reboots (pyvmm/core/kept.py)."""
        if self._listener is not None:
            return
        if self.path is not None:
            listener = KEPT.listener(("unix", os.fspath(self.path)), self._listen_unix)
            where = f"unix:{self.path}"
        else:
            try:
                listener = KEPT.listener(("tcp", self.host, self.port),
                                         lambda: socket.create_server((self.host, self.port), reuse_port=False))
            except OSError as error:
                raise GdbStubError(f"--gdb tcp:{self.host}:{self.port}: {error.strerror}") from None
            host, port = listener.getsockname()[:2]
            where = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
            if not _is_loopback(host):
                log.warning("the gdb stub listens on %s without authentication: anyone who can reach that port "
                            "controls the guest (and can read and write all its memory)", where)
        self._listener = listener
        print(f"pyvmm: gdb stub listening on {where}"
              f"{' (vCPUs wait for gdb)' if self.wait else ''}", file=sys.stderr, flush=True)

    def _listen_unix(self) -> socket.socket:
        path = self.path
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode) and not _socket_answers(path):
                os.unlink(path)  # left behind by a pyvmm that did not end cleanly
        except FileNotFoundError:
            pass
        except OSError as error:
            raise GdbStubError(f"--gdb unix:{path}: {error.strerror}") from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            os.chmod(path, 0o600)  # before listen(): nobody can connect in between
            listener.listen(1)
        except OSError as error:
            listener.close()
            raise GdbStubError(f"--gdb unix:{path}: {error.strerror}") from None
        return listener

    def close(self) -> None:
        """The VM is ending: tell gdb, and stop serving."""
        self._closing = True
        connection = self._connection
        if connection is not None and self.session is not None and not self.session.detached:
            self._send(connection, p.frame(b"W00"))
        os.write(self._wake_write, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in (self._listener, self._connection):
            if sock is not None:
                sock.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        # A listener kept across reboots stays; the run's end removes it.
        if self.path is not None and self._listener is not None \
                and not KEPT.holds_listener(("unix", os.fspath(self.path))):
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    # --- vCPU threads --------------------------------------------------------------------

    def debug_exit(self, index: int, exit) -> None:
        """A vCPU's KVM_EXIT_DEBUG, on that vCPU's thread."""
        session = self.session
        outcome = None
        if session is not None and not session.detached:
            outcome = session.classify(index, exit.exception, exit.pc, exit.dr6)
        if isinstance(outcome, Stop):
            self.target.stop()
            self._stops.put(outcome)
            os.write(self._wake_write, b"s")
        elif isinstance(outcome, Reinject):
            try:
                self.target.reinject(index, outcome.vector, exit.pc)
            except OSError as error:  # the guest loses one #BP/#DB; the VM goes on
                log.warning("vCPU %d: cannot hand exception %d back to the guest: %s",
                            index, outcome.vector, error)
        # None: a breakpoint taken out since it fired; the vCPU runs on.

    # --- the server thread ------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._closing:
                readable, _, _ = select.select([self._listener, self._wake_read], [], [])
                if self._wake_read in readable:
                    os.read(self._wake_read, 64)
                    continue
                connection, peer = self._listener.accept()
                log.info("gdb connected from %s", peer)
                self._connection = connection
                try:
                    self._converse(connection)
                finally:
                    self._connection = None
                    connection.close()
                log.info("gdb disconnected")
        except Exception:  # noqa: BLE001 - the stub must never take the VM down
            if not self._closing:
                log.exception("gdb stub failed")

    def _converse(self, connection: socket.socket) -> None:
        session = Session(self.target)
        self._drain_stops()
        self.target.stop()  # gdb finds the guest stopped
        self.session = session
        reader = p.PacketReader()
        try:
            while not self._closing and not session.detached:
                readable, _, _ = select.select([connection, self._wake_read], [], [])
                if self._wake_read in readable:
                    os.read(self._wake_read, 64)
                    self._report_stop(connection, session)
                if connection not in readable:
                    continue
                data = connection.recv(65536)
                if not data:
                    break
                for event in reader.feed(data):
                    self._on_event(connection, session, event)
                    if session.detached:
                        break
        except OSError as error:
            log.info("gdb connection lost: %s", error)
        finally:
            self.session = None
            if not session.detached and not self._closing:
                session.release()  # gdb went away: no breakpoint may stay behind

    def _on_event(self, connection, session: Session, event) -> None:
        if isinstance(event, p.Interrupt):
            if session.running:
                self._drain_stops()
                self._send(connection, p.frame(session.interrupted()))
            return
        if isinstance(event, p.BadPacket):
            log.debug("gdb: bad packet: %s", event.reason)
            if not session.no_ack:
                self._send(connection, b"-")
            return
        if not isinstance(event, p.Packet):
            return  # acks: we never retransmit, gdb's TCP is reliable
        acking = not session.no_ack
        if acking:
            self._send(connection, b"+")
        if session.running:
            return  # only Ctrl-C is meaningful while the guest runs
        self._drain_stops()  # stops that raced with the one reported: stale now
        try:
            reply = session.handle(event.payload)
        except OSError as error:  # a KVM ioctl refused: tell gdb, keep serving
            log.warning("gdb: %.40r failed: %s", event.payload, error)
            reply = b"E01"
        if reply is not None:
            self._send(connection, p.frame(reply))

    def _report_stop(self, connection, session: Session) -> None:
        try:
            stop = self._stops.get_nowait()
        except queue.Empty:
            return
        self._drain_stops()  # other vCPUs that stopped at once: they hit again on resume
        if session.running:
            self._send(connection, p.frame(session.stop_reply(stop)))

    def _drain_stops(self) -> None:
        while True:
            try:
                self._stops.get_nowait()
            except queue.Empty:
                return

    def _send(self, connection, data: bytes) -> None:
        with self._send_lock:
            try:
                connection.sendall(data)
            except OSError as error:
                log.info("gdb: send failed: %s", error)
