"""The backend half of a xenbus device: its xenstore nodes and state machine.

A PV device is two xenstore directories and a handshake between them:

    /local/domain/<guest>/device/<type>/<devid>          the frontend's
        backend, backend-id, state (+ type-specific keys)
        owner: the guest; the backend domain may read
    /local/domain/<backend>/backend/<type>/<guest>/<devid>   the backend's
        frontend, frontend-id, online, state, hotplug-status (+ features)
        owner: the backend domain; the guest may read

as a Xen toolstack (libxl) creates them. Each side publishes its state
(Initialising 1, InitWait 2, Initialised 3, Connected 4, Closing 5,
Closed 6) and watches the other's. The backend here:

    created             -> InitWait (features already published)
    frontend Initialised or Connected, while not connected
                        -> connect(): read the frontend's keys (ring
                           references, event channels) -> Connected
    frontend Closing    -> disconnect() -> Closing
    frontend Closed     -> disconnect() -> Closed, then the reset below
    frontend Initialising while we are Closed (a frontend that starts
    over, as Linux does after kexec)   -> InitWait

The reset after the frontend closed lets a driver that is unbound and
bound again, e.g. Linux's `rmmod xen-blkfront; modprobe xen-blkfront`,
reconnect. Linux keeps such a device's own state at Closed across the
unbind, so when the new driver instance starts it ignores a backend in
InitWait; it renegotiates only with a backend that says Connected (the
path its resume code takes). After the frontend closed in order, the
backend therefore goes Closed and then advertises Connected again, with
no ring attached yet: the frontend's next Initialised (or Connected)
with fresh ring keys makes it connect for real. A device whose driver waits for
the backend to read Closed while it unloads and starts its next instance
at Initialising (Linux's netfront) sets reopen_as_connected = False and
simply stays Closed until then. A device that failed
(fail() below) does not reset; its frontend must start over explicitly
(write Initialising).

Errors: connect() raises FrontendError for a missing or bad frontend key.
fail() logs, writes "<errno> <message>" to the backend's `error` node and
moves to Closing; the frontend then closes its side. Only that device
stops: the VMM and every other device go on.

Threads: everything runs on the VMM's event thread, like the store; the
watch callbacks arrive there (from the guest's xenstore ring). Creating
the device before the guest runs (domain set-up) is also fine.
"""

from __future__ import annotations

import enum
import errno
import logging

from typing import TYPE_CHECKING

from pyvmm.core.snapshot import SnapshotError
from ..errors import XenError
from ..hv.gnttab import GrantError
from ..xenstore import Access, Client, Permission, XenStore, XenStoreError

if TYPE_CHECKING:
    from ..hv.evtchn import BackendChannel


log = logging.getLogger(__name__)

_COMMIT_ATTEMPTS = 8


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class FrontendError(Exception):
    """The frontend published something the backend cannot use."""

    def __init__(self, message: str, code: int = errno.EINVAL):
        super().__init__(message)
        self.errno = code


class XenbusBackendDevice:
    """A backend device's xenstore presence and handshake; subclasses add
    the device model through frontend_keys(), backend_keys(), connect()
    and disconnect(). In connect(), map_ring_page() and bind_channel() take
    the frontend's rings and channels (the subclass's `grants` and `evtchn`)
    so that release_connection() gives them back, whatever failed."""

    device_type = ""
    # After the frontend closed in order, advertise Connected again so that
    # a reloaded driver that only renegotiates with a Connected backend
    # (blkfront) reconnects. A driver that waits for the backend to read
    # Closed while it unloads, and starts its next instance at Initialising
    # (netfront), needs this False: the backend then stays Closed until the
    # frontend starts over.
    reopen_as_connected = True

    def __init__(self, store: XenStore, frontend_domid: int, devid: int, *, backend_domid: int = 0):
        if not self.device_type:
            raise TypeError("a xenbus device needs a device_type")
        self.store = store
        # The VM's tracer and fault injector come with its store; the
        # subclasses hand them to their backends.
        self.trace, self.faults = store.trace, store.faults
        # Lines whose rate the guest sets, under the subclass's logger (vbd, vif).
        self._limited = store.log_rate.limited(logging.getLogger(type(self).__module__))
        self.frontend_domid = frontend_domid
        self.backend_domid = backend_domid
        self.devid = devid
        self.frontend_path = f"/local/domain/{frontend_domid}/device/{self.device_type}/{devid}"
        self.backend_path = f"/local/domain/{backend_domid}/backend/{self.device_type}/{frontend_domid}/{devid}"
        self.state = XenbusState.UNKNOWN  # what we last published
        self.connected = False  # the frontend's rings are attached
        self.failed: str | None = None
        self.closed = False
        self.client: Client | None = None
        self._token = f"{self.device_type}-{frontend_domid}-{devid}"
        # What connect() took from the guest: BackendChannels and GrantMappings.
        self._channels: list = []
        self._mappings: list = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend_path} {self.state.name}>"

    # --- for subclasses ------------------------------------------------------------

    def frontend_keys(self) -> dict[str, str]:
        """Type-specific keys of the frontend directory (e.g. virtual-device)."""
        return {}

    def backend_keys(self) -> dict[str, str]:
        """What the backend advertises, written before InitWait."""
        return {}

    def connect(self) -> None:
        """Read the frontend's keys and attach to it; raise FrontendError.
        On any exception disconnect() is called to undo a partial attach."""
        raise NotImplementedError

    def disconnect(self) -> None:
        """Let go of everything connect() took; idempotent."""

    @property
    def name(self) -> str:
        """What an operator calls the device (pyvmm ctl NAME xenbus-state): vif1.0, or a disk's vdev."""
        return f"{self.device_type}{self.frontend_domid}.{self.devid}"

    def map_ring_page(self, what: str, ref: int) -> memoryview:
        """Map the frontend's ring page granted as `ref` (its key `what` in
        errors) through the subclass's `grants`, held until release_connection()."""
        try:
            mapping = self.grants.map(ref, writable=True)
        except GrantError as error:
            raise FrontendError(f"{what} {ref}: {error}", error.errno) from None
        self._mappings.append(mapping)
        return mapping.view

    def bind_channel(self, what: str, port: int, callback, **options) -> "BackendChannel":
        """Bind the frontend's event channel `port` (its key `what` in errors)
        through the subclass's `evtchn`, closed by release_connection()."""
        try:
            channel = self.evtchn.bind_backend(port, callback, **options)
        except XenError as error:
            raise FrontendError(f"{what} {port}: {error}", error.errno) from None
        self._channels.append(channel)
        return channel

    def release_connection(self) -> None:
        """Close the event channels and release the grant mappings connect()
        kept in _channels and _mappings."""
        channels, self._channels = self._channels, []
        mappings, self._mappings = self._mappings, []
        for channel in channels:
            channel.close()
        for mapping in mappings:
            mapping.release()

    # --- snapshot helpers (the subclasses' save_state/restore_state) -------------------

    def xenbus_state(self) -> dict:
        """What this part says on xenbus: the state it published, whether the
        rings are attached, why it failed."""
        return {"devid": self.devid, "state": int(self.state), "connected": self.connected, "failed": self.failed}

    def restore_xenbus_state(self, saved) -> bool:
        """Take back xenbus_state() into a device that was just started (its
        nodes are in the restored store already); returns `connected`, which
        the subclass makes true by attaching again."""
        if not isinstance(saved, dict) or saved.get("devid") != self.devid:
            raise SnapshotError(f"{self.backend_path}: the snapshot's device is {saved!r:.80}")
        state, connected, failed = saved.get("state"), saved.get("connected"), saved.get("failed")
        if (not isinstance(state, int) or isinstance(state, bool) or state not in set(XenbusState)
                or not isinstance(connected, bool) or not (failed is None or isinstance(failed, str))):
            raise SnapshotError(f"{self.backend_path}: bad xenbus state {saved!r:.120}")
        if self.connected or self._channels or self._mappings or self.closed:
            raise SnapshotError(f"{self.backend_path}: restored into a device that is not fresh")
        self.state = XenbusState(state)
        self.failed = failed
        return connected

    def claim_channel(self, what: str, guest_port: int | None, dom0_port: int, callback,
                      **options) -> "BackendChannel":
        """bind_channel() for a restore: the channel the event channels took
        back at `dom0_port`, still joined to `guest_port` (None: the guest had
        closed its end). Closed by release_connection() like a bound one."""
        channel = self.evtchn.claim_backend(dom0_port, callback, **options)
        self._channels.append(channel)
        if channel.guest_port != guest_port:
            raise SnapshotError(f"{self.backend_path}: {what} is guest port {channel.guest_port}, saved {guest_port}")
        return channel

    def read_frontend(self, key: str) -> str | None:
        """A frontend key, or None if it does not exist."""
        try:
            return self.client.read(f"{self.frontend_path}/{key}").decode("utf-8", "replace")
        except XenStoreError as error:
            if error.name == "ENOENT":
                return None
            raise FrontendError(f"reading {key}: {error.name}") from None

    def read_frontend_uint(self, key: str, default: int | None = None, *, maximum: int = 0xFFFF_FFFF) -> int:
        """An unsigned decimal frontend key; `default` when absent (None: required)."""
        text = self.read_frontend(key)
        if text is None:
            if default is None:
                raise FrontendError(f"the frontend did not write {key}", errno.ENOENT)
            return default
        text = text.strip()
        if not text.isascii() or not text.isdigit():
            raise FrontendError(f"{key} = {text[:32]!r} is not an unsigned number")
        value = int(text)
        if value > maximum:
            raise FrontendError(f"{key} = {value} is above {maximum}")
        return value

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Create both directories, advertise, enter InitWait, watch the frontend."""
        self.client = self.store.client(self.backend_domid)
        self._publish()
        # Fires once at once: a frontend already past Initialising is handled.
        self.client.watch(f"{self.frontend_path}/state", self._token, self._frontend_changed)

    def drop_connection(self) -> None:
        """Let go of the frontend's rings and channels now, whatever the
        states say: the domain is being soft-reset, and the toolstack takes
        its backends down before Xen resets the domain's event channels and
        grants. restart() follows."""
        self._disconnect()

    def restart(self) -> None:
        """Start over as a newly made device (after the domain's soft reset,
        as xl's soft-reset makes the devices anew): disconnected, both
        directories written afresh, the frontend's at Initialising and ours
        in InitWait. The host's side (an image, a TAP) stays open."""
        if self.closed or self.client is None:
            return
        self._disconnect()
        self.failed = None
        for path in (self.frontend_path, self.backend_path):
            try:
                self.client.rm(path)
            except XenStoreError as error:
                if error.name != "ENOENT":
                    raise
        self.state = XenbusState.UNKNOWN
        self._publish()

    def _publish(self) -> None:
        """Both directories as at creation, then InitWait."""
        frontend_perms = (Permission(self.frontend_domid, Access.NONE), Permission(self.backend_domid, Access.READ))
        backend_perms = (Permission(self.backend_domid, Access.NONE), Permission(self.frontend_domid, Access.READ))
        frontend = {
            "backend": self.backend_path,
            "backend-id": str(self.backend_domid),
            "state": str(int(XenbusState.INITIALISING)),
            **self.frontend_keys(),
        }
        backend = {
            "frontend": self.frontend_path,
            "frontend-id": str(self.frontend_domid),
            "online": "1",
            "state": str(int(XenbusState.INITIALISING)),
            "hotplug-status": "connected",
            **self.backend_keys(),
        }
        for attempt in range(_COMMIT_ATTEMPTS):
            try:
                with self.client.transaction() as tx:
                    for base, keys, perms in ((self.frontend_path, frontend, frontend_perms),
                                              (self.backend_path, backend, backend_perms)):
                        self.client.write(base, "", tx)
                        self.client.set_perms(base, perms, tx)
                        for key, value in keys.items():
                            self.client.write(f"{base}/{key}", value, tx)
                            self.client.set_perms(f"{base}/{key}", perms, tx)
                break
            except XenStoreError as error:
                if error.name != "EAGAIN" or attempt == _COMMIT_ATTEMPTS - 1:
                    raise
        self.state = XenbusState.INITIALISING
        self.switch_state(XenbusState.INIT_WAIT)

    def close(self) -> None:
        """The VMM is done with the device (the domain goes away)."""
        if self.closed:
            return
        self.closed = True
        self._disconnect()
        if self.client is not None:
            self.client.close()  # drops the watch

    def switch_state(self, state: XenbusState) -> None:
        if state == self.state or self.client is None:
            return
        log.debug("%s: %s -> %s", self.backend_path, self.state.name, state.name)
        if self.trace.xenstore:
            self.trace.emit("xenstore", "backend-state", device=self.backend_path, old=self.state.name, new=state.name)
        self.state = state
        self.client.write(f"{self.backend_path}/state", str(int(state)))

    def force_state(self, state: XenbusState) -> None:
        """Go to `state` on demand (Closing or Closed), as a backend that is
        being torn down would, so that the frontend's teardown runs."""
        if self.trace.fault:
            self.trace.emit("fault", "xenbus-state", device=self.backend_path, new=state.name)
        self._disconnect()
        self.switch_state(state)

    def fail(self, message: str, code: int = errno.EIO) -> None:
        """Give up on the connection: report, disconnect, go Closing."""
        self._limited.error("%s: %.300s; closing the device", self.backend_path, message)
        self.failed = message
        self._disconnect()
        if self.client is not None and not self.closed:
            try:
                self.client.write(f"{self.backend_path}/error", f"{code} {message}")
            except XenStoreError as error:  # pragma: no cover - a store quota, at worst
                self._limited.warning("%s: cannot write the error node: %s", self.backend_path, error)
            self.switch_state(XenbusState.CLOSING)

    def frontend_state(self) -> XenbusState:
        try:
            text = self.client.read(f"{self.frontend_path}/state").decode("ascii", "replace").strip()
            return XenbusState(int(text))
        except (XenStoreError, ValueError):
            return XenbusState.UNKNOWN

    # --- the state machine ---------------------------------------------------------

    def _frontend_changed(self, path: str, token: str) -> None:
        if self.closed:
            return
        try:
            self._on_frontend_state(self.frontend_state())
        except Exception as error:  # a bug here must not take the VMM down
            log.exception("%s: handling the frontend's state failed", self.backend_path)
            self.fail(f"internal error: {error}")

    def _on_frontend_state(self, frontend: XenbusState) -> None:
        log.debug("%s: frontend %s, backend %s", self.backend_path, frontend.name, self.state.name)
        if self.trace.xenstore:
            self.trace.emit("xenstore", "frontend-state", device=self.frontend_path, state=frontend.name,
                       backend=self.state.name)
        if frontend == XenbusState.INITIALISING:
            if self.state == XenbusState.CLOSED or (self.state == XenbusState.CONNECTED and not self.connected):
                # The frontend starts over.
                self.failed = None
                self.switch_state(XenbusState.INIT_WAIT)
        elif frontend in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            if self.connected or self.failed is not None:
                return
            if self.state in (XenbusState.INIT_WAIT, XenbusState.CONNECTED, XenbusState.CLOSED):
                self._connect()
        elif frontend == XenbusState.CLOSING:
            self._disconnect()
            self.switch_state(XenbusState.CLOSING)
        elif frontend == XenbusState.CLOSED:
            self._disconnect()
            self.switch_state(XenbusState.CLOSED)
            if self.failed is None and self.reopen_as_connected:
                # Ready for the same frontend's next driver (see the module docstring).
                self.switch_state(XenbusState.CONNECTED)
        elif frontend == XenbusState.UNKNOWN:
            # The frontend's node went away or is garbage.
            self._disconnect()
            self.switch_state(XenbusState.CLOSED)

    def _connect(self) -> None:
        try:
            self.connect()
        except FrontendError as error:
            self.fail(str(error), error.errno)
            return
        except Exception as error:
            log.exception("%s: connecting failed", self.backend_path)
            self.fail(f"internal error: {error}")
            return
        self.connected = True
        try:
            self.client.rm(f"{self.backend_path}/error")
        except XenStoreError:
            pass
        self.switch_state(XenbusState.CONNECTED)  # already so after a reset

    def _disconnect(self) -> None:
        self.connected = False
        try:
            self.disconnect()
        except Exception:
            log.exception("%s: disconnecting failed", self.backend_path)
