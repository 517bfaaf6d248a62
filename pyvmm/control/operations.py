"""What an operator can ask of a running VM: the control socket's commands.

Every command runs on the VM's event thread (see server.py and
docs/CONTROL.md) and returns a JSON-able result or raises ControlError.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Callable

from .server import ControlError
from ..core.faults import FaultSpecError
from ..core.snapshot import SnapshotError
from ..core.stop import StopReason

if TYPE_CHECKING:
    from ..vmm.machine import Machine


COMMAND_NAMES = (
    "status", "diagnose", "shutdown", "reboot", "destroy", "pause", "resume",
    "xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-rm", "evtchn-list",
    "fault-add", "fault-list", "fault-clear", "xenbus-state", "mem-set", "mem-info", "snapshot",
)

MEM_SET_MIN = 1 << 20  # below a MiB no guest runs: surely a unit mistake


def machine_commands(machine: "Machine") -> dict[str, Callable[[dict], object]]:
    def status(args: dict) -> dict:
        if machine.stop_reason is not None:
            state = "shutting-down"
        else:
            state = "paused" if machine.paused else "running"
        config = machine.config
        return {
            "name": config.name,
            "state": state,
            "vcpus": config.vcpus,
            "memory": config.memory,
            "xen": machine.xen is not None,
            "uptime": round(time.monotonic() - machine.started_at, 3),
            "pid": os.getpid(),
            "xenstore_socket": str(machine.xenstore_socket_path) if machine.xenstore_socket_path else None,
            "kernel": str(config.kernel) if config.kernel is not None else None,
            "restored_from": str(config.restore) if config.restore is not None else None,
            "reboots": machine.run_counts["reboots"],
            "triple_faults": machine.run_counts["triple_faults"],
        }

    def diagnose(args: dict) -> dict:
        """Where each vCPU is, and Xen's xenstore ring and event channels."""
        return {"lines": machine.diagnostics()}

    def orderly(kind: str) -> Callable[[dict], object]:
        def command(args: dict) -> dict:
            if machine.xen is None:
                if kind != "poweroff":
                    raise ControlError("Unsupported", "an orderly reboot needs a Xen guest (xenstore control/shutdown)")
                # A plain PC guest gets the ACPI power button; it powers off
                # only if its userspace handles that button.
                machine.platform.acpi_pm.press_power_button()
                return {"requested": "power-button"}
            machine.xen.request_guest_shutdown(kind)
            return {"requested": kind}

        return command

    def destroy(args: dict) -> dict:
        machine.request_stop(StopReason.DESTROYED)
        return {}

    def pause(args: dict) -> dict:
        machine.pause()
        machine.control_event("PAUSED", {})
        return {}

    def resume(args: dict) -> dict:
        machine.resume()
        machine.control_event("RESUMED", {})
        return {}

    def store_client():
        if machine.xen is None:
            raise ControlError("Unsupported", "this VM has no xenstore (--no-xen)")
        return machine.xen.dom0  # one client for the VM's life: a client per command would pile up

    def path_of(args: dict) -> str:
        path = args.get("path")
        if not isinstance(path, str) or not path:
            raise ControlError("InvalidArgument", "'path' must be a non-empty string")
        return path

    def store_op(function):
        def command(args: dict):
            client = store_client()
            # Imported with a Xen VM only: a --no-xen run leaves the xenstore unloaded.
            from ..xen.xenstore import XenStoreError

            try:
                return function(client, args)
            except XenStoreError as error:
                raise ControlError("XenstoreError", f"{error.name}: {path_of(args)}") from None

        return command

    def xs_write(client, args):
        value = args.get("value")
        if not isinstance(value, str):
            raise ControlError("InvalidArgument", "'value' must be a string")
        client.write(path_of(args), value)
        return {}

    def xs_ls(client, args):
        """The subtree as {path: value}, like xenstore-ls -f."""
        root = path_of(args).rstrip("/") or "/"
        out: dict[str, str] = {}

        def walk(path: str) -> None:
            out[path] = client.read(path).decode(errors="replace")
            for child in client.directory(path):
                walk(f"{path.rstrip('/')}/{child}")

        walk(root)
        return out

    def evtchn_list(args: dict) -> list:
        if machine.xen is None:
            raise ControlError("Unsupported", "this VM has no event channels (--no-xen)")
        return machine.xen.evtchn.snapshot()

    def fault_add(args: dict) -> dict:
        spec = args.get("spec")
        if not isinstance(spec, str):
            raise ControlError("InvalidArgument", "'spec' must be a string")
        try:
            return machine.faults.add(spec).describe()
        except FaultSpecError as error:
            raise ControlError("InvalidArgument", str(error)) from None

    def fault_clear(args: dict) -> dict:
        rule_id = args.get("id")
        if rule_id is None:
            return {"removed": machine.faults.clear()}
        if not isinstance(rule_id, int) or isinstance(rule_id, bool):
            raise ControlError("InvalidArgument", "'id' must be a rule number")
        if not machine.faults.remove(rule_id):
            raise ControlError("InvalidArgument", f"no fault rule {rule_id}")
        return {"removed": 1}

    def xenbus_state(args: dict) -> dict:
        """Move a backend device to Closing or Closed on demand."""
        device, state = args.get("device"), args.get("state")
        if state not in ("closing", "closed"):
            raise ControlError("InvalidArgument", "'state' must be closing or closed")
        if machine.xen is None:
            raise ControlError("Unsupported", "this VM has no xenbus devices (--no-xen)")
        # Only now: a --no-xen run's sandbox did not preload the Xen modules.
        from ..xen.backend.xenbus_backend import XenbusState

        states = {"closing": XenbusState.CLOSING, "closed": XenbusState.CLOSED}
        for backend in machine.xen.xenbus_devices:  # of every device kind
            if device in (backend.name, str(backend.devid), backend.backend_path):
                backend.force_state(states[state])
                return {"device": backend.backend_path, "state": states[state].name}
        raise ControlError("InvalidArgument", f"no device {device!r} (a backend device's name, e.g. a disk's vdev, "
                                              "its devid or its backend path)")

    def mem_set(args: dict) -> dict:
        """The balloon target, as `xl mem-set`: memory/target in KiB."""
        target = args.get("target")
        if not isinstance(target, int) or isinstance(target, bool):
            raise ControlError("InvalidArgument", "'target' must be a number of bytes")
        if machine.xen is None:
            raise ControlError("Unsupported", "ballooning needs a Xen guest (--no-xen has no balloon driver)")
        if not MEM_SET_MIN <= target <= machine.config.memory:
            raise ControlError("InvalidArgument",
                               f"'target' must be between {MEM_SET_MIN} and the guest's {machine.config.memory} bytes")
        machine.xen.set_memory_target(target >> 10)
        return {"target": (target >> 10) << 10}

    def mem_info(args: dict) -> dict:
        if machine.xen is None:
            raise ControlError("Unsupported", "ballooning needs a Xen guest")
        target = machine.xen.memory_target_kib()
        ballooned = machine.xen.ballooned_pages()
        return {"memory": machine.config.memory, "target": None if target is None else target << 10,
                "ballooned": ballooned << 12, "present": machine.config.memory - (ballooned << 12)}

    def snapshot(args: dict) -> dict:
        """Write the whole VM into the file sent with the request (or `path`)."""
        stop = args.get("stop", False)
        if not isinstance(stop, bool):
            raise ControlError("InvalidArgument", "'stop' must be true or false")
        path = args.get("path")
        if path is not None and (not isinstance(path, str) or not path):
            raise ControlError("InvalidArgument", "'path' must be a non-empty string")
        fd = machine.control.take_fd() if machine.control is not None else None
        if (fd is None) == (path is None):
            if fd is not None:
                os.close(fd)
            raise ControlError("InvalidArgument", "give the snapshot's file either as a descriptor sent with the "
                                                  "request (SCM_RIGHTS: pyvmm ctl NAME snapshot FILE does) or as "
                                                  "'path', not both")
        if machine.stop_reason is not None:
            if fd is not None:
                os.close(fd)
            raise ControlError("InvalidState", "the VM is stopping")
        created = fd is None
        if created:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except PermissionError:
                raise ControlError("InvalidArgument", f"{path}: the VMM may not create it (its sandbox opens no "
                                                      "file once the guest runs): send a descriptor instead, as "
                                                      "pyvmm ctl NAME snapshot FILE does") from None
            except OSError as error:
                raise ControlError("InvalidArgument", f"{path}: {error.strerror}") from None
        try:
            return machine.snapshot_to(fd, stop=stop)
        except SnapshotError as error:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise ControlError("SnapshotError", str(error)) from None
        finally:
            os.close(fd)

    return {
        "status": status,
        "mem-set": mem_set,
        "mem-info": mem_info,
        "diagnose": diagnose,
        "shutdown": orderly("poweroff"),
        "reboot": orderly("reboot"),
        "destroy": destroy,
        "pause": pause,
        "resume": resume,
        "xenstore-read": store_op(lambda c, a: c.read(path_of(a)).decode(errors="replace")),
        "xenstore-write": store_op(xs_write),
        "xenstore-ls": store_op(xs_ls),
        "xenstore-rm": store_op(lambda c, a: c.rm(path_of(a)) or {}),
        "evtchn-list": evtchn_list,
        "fault-add": fault_add,
        "fault-list": lambda args: machine.faults.rules(),
        "fault-clear": fault_clear,
        "xenbus-state": xenbus_state,
        "snapshot": snapshot,
    }

