"""`pyvmm list` and `pyvmm ctl NAME ...`: the running VMs, through their control sockets (docs/CONTROL.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from . import Size


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_vms_command(as_json) -> None:
    """List the running VMs of this user."""
    from ..control.server import list_vms
    from ..core.runtime import runtime_dir

    vms = list_vms(runtime_dir())
    if as_json:
        click.echo(json.dumps(vms, indent=2))
        return
    click.echo(f"{'NAME':<24} {'STATE':<14} {'VCPUS':>5} {'MEMORY':>8} {'PID':>8}  XEN")
    for vm in vms:
        click.echo(f"{vm['name']:<24} {vm['state']:<14} {vm['vcpus']:>5} {vm['memory'] >> 20:>7}M {vm['pid']:>8}  "
                   f"{'yes' if vm['xen'] else 'no'}")


@click.group()
@click.argument("name")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="How long shutdown/reboot wait for the guest.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.pass_context
def ctl(ctx, name, timeout, as_json) -> None:
    """Operate the running VM NAME (see docs/CONTROL.md)."""
    ctx.obj = {"name": name, "timeout": timeout, "json": as_json}


def _control_call(ctx, command: str, **arguments):
    from ..control.server import ControlClient, ControlConnectionError, ControlError
    from ..core.runtime import RuntimeDirError, control_socket_path

    try:
        client = ControlClient(control_socket_path(ctx.obj["name"]), timeout=10)
    except (ControlConnectionError, ControlError, RuntimeDirError, OSError) as error:
        raise click.ClickException(str(error))
    try:
        return client, client.execute(command, **arguments)
    except ControlError as error:
        client.close()
        raise click.ClickException(str(error))


def _control_result(ctx, command: str, **arguments):
    """The command's result, its connection closed."""
    client, result = _control_call(ctx, command, **arguments)
    client.close()
    return result


def _print(ctx, result) -> None:
    if ctx.obj["json"] or not isinstance(result, (str, dict)):
        click.echo(json.dumps(result, indent=2))
    elif isinstance(result, dict):
        for key, value in result.items():
            click.echo(f"{key}: {value}")
    else:
        click.echo(result)


@ctl.command("status")
@click.pass_context
def ctl_status(ctx) -> None:
    """Show the VM's state."""
    _call_and_print(ctx, "status")


@ctl.command("mem-set")
@click.argument("size", type=Size())
@click.pass_context
def ctl_mem_set(ctx, size) -> None:
    """Set the guest's balloon target, as `xl mem-set` (SIZE with a K/M/G suffix; MiB without).

    pyvmm writes memory/target (in KiB) to the guest's xenstore directory; the
    guest's balloon driver gives memory back, or takes it again, up to its RAM."""
    _call_and_print(ctx, "mem-set", target=size)


@ctl.command("mem-info")
@click.pass_context
def ctl_mem_info(ctx) -> None:
    """Show the guest's RAM, its balloon target and what it has given back (bytes)."""
    _call_and_print(ctx, "mem-info")


@ctl.command("diagnose")
@click.pass_context
def ctl_diagnose(ctx) -> None:
    """Show where each vCPU is and, for Xen guests, the xenstore ring and event channels."""
    result = _control_result(ctx, "diagnose")
    if ctx.obj["json"]:
        _print(ctx, result)
    else:
        for line in result["lines"]:
            click.echo(line)


def _ctl_simple(command: str, wait_for: tuple[str, ...] = ()):
    @click.pass_context
    def run_command(ctx) -> None:
        client, result = _control_call(ctx, command, timeout=ctx.obj["timeout"])
        try:
            if wait_for:
                from ..control.server import ControlError

                try:
                    event = client.wait_event(wait_for, timeout=ctx.obj["timeout"])
                except (ControlError, TimeoutError, OSError) as error:
                    raise click.ClickException(f"{command}: the guest did not finish in {ctx.obj['timeout']:g}s ({error})")
                result = event.get("data", {})
        finally:
            client.close()
        _print(ctx, result)

    return run_command


for _name, _help, _wait in (
    ("shutdown", "Ask the guest to power off in order, and wait.", ("STOP",)),
    ("reboot", "Ask the guest to reboot in order, and wait.", ("STOP",)),
    ("destroy", "Stop the VM at once.", ()),
    ("pause", "Stop the vCPUs (and the guest's clock).", ()),
    ("resume", "Let a paused VM run again.", ()),
):
    ctl.command(_name, help=_help)(_ctl_simple(_name, _wait))


@ctl.command("snapshot")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--stop", is_flag=True, help="Stop the VM once the snapshot is written (its run exits with status 0).")
@click.pass_context
def ctl_snapshot(ctx, file, stop) -> None:
    """Write the whole VM to FILE: RAM, vCPUs, devices (docs/SNAPSHOTS.md).

    The guest pauses while it is written, then runs on (or stops, with
    --stop). FILE appears only once the snapshot is complete; `pyvmm run
    --restore FILE` resumes the guest from it."""
    from ..control.server import ControlClient, ControlConnectionError, ControlError
    from ..core.runtime import RuntimeDirError, control_socket_path

    # Written beside FILE under another name, then renamed: FILE is never half a
    # snapshot, and a VM restored from an older FILE keeps mapping its own copy.
    partial = file.parent / f".{file.name}.{os.getpid()}.partial"
    try:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise click.ClickException(f"{partial}: {error.strerror}")
    done = False
    try:
        try:
            client = ControlClient(control_socket_path(ctx.obj["name"]), timeout=ctx.obj["timeout"])
        except (ControlConnectionError, ControlError, RuntimeDirError, OSError) as error:
            raise click.ClickException(str(error))
        try:
            result = client.execute_with_fds("snapshot", [fd], stop=stop)
        except (ControlError, ControlConnectionError, TimeoutError) as error:
            raise click.ClickException(str(error))
        finally:
            client.close()
        os.replace(partial, file)
        done = True
    finally:
        os.close(fd)
        if not done:
            try:
                os.unlink(partial)
            except OSError:
                pass
    if ctx.obj["json"]:
        click.echo(json.dumps({"file": str(file), **result}, indent=2))
        return
    click.echo(f"{file}: {_mib(result['bytes'])} ({_mib(result['data_bytes'])} of it RAM data), written in "
               f"{result['seconds']:.3f} s{'; the VM stopped' if result.get('stopped') else ''}")


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


@ctl.group("xenstore")
def ctl_xenstore() -> None:
    """Read and change the VM's xenstore as domain 0."""


@ctl_xenstore.command("read")
@click.argument("path")
@click.pass_context
def ctl_xenstore_read(ctx, path) -> None:
    click.echo(_control_result(ctx.parent, "xenstore-read", path=path))


@ctl_xenstore.command("write")
@click.argument("path")
@click.argument("value")
@click.pass_context
def ctl_xenstore_write(ctx, path, value) -> None:
    _control_result(ctx.parent, "xenstore-write", path=path, value=value)


@ctl_xenstore.command("rm")
@click.argument("path")
@click.pass_context
def ctl_xenstore_rm(ctx, path) -> None:
    _control_result(ctx.parent, "xenstore-rm", path=path)


@ctl_xenstore.command("ls")
@click.argument("path", default="/")
@click.pass_context
def ctl_xenstore_ls(ctx, path) -> None:
    _print_list(ctx.parent, "xenstore-ls", lambda node: f'{node[0]} = "{node[1]}"', path=path)


@ctl.group("evtchn")
def ctl_evtchn() -> None:
    """Inspect the VM's event channels."""


@ctl_evtchn.command("list")
@click.pass_context
def ctl_evtchn_list(ctx) -> None:
    _print_list(ctx.parent, "evtchn-list", lambda port: "  ".join(f"{key}={value}" for key, value in port.items()))


def _print_list(ctx, command: str, line, **arguments) -> None:
    """A command's list (or dict: its (key, value) items) result: JSON, or one line(item) per item."""
    result = _control_result(ctx, command, **arguments)
    if ctx.obj["json"]:
        click.echo(json.dumps(result, indent=2))
        return
    for item in (result.items() if isinstance(result, dict) else result):
        click.echo(line(item))


@ctl.group("fault")
def ctl_fault() -> None:
    """Inject faults into the running VM (docs/FRONTEND-DEVELOPERS.md)."""


def _call_and_print(ctx, command: str, **arguments) -> None:
    _print(ctx, _control_result(ctx, command, **arguments))


@ctl_fault.command("add")
@click.argument("spec")
@click.pass_context
def ctl_fault_add(ctx, spec) -> None:
    """Add a rule (like blk:error,op=write,sectors=2048-4095)."""
    _call_and_print(ctx.parent, "fault-add", spec=spec)


@ctl_fault.command("list")
@click.pass_context
def ctl_fault_list(ctx) -> None:
    """The rules, in the order they are tried, with their counters."""
    _print_list(ctx.parent, "fault-list", lambda rule: (
        f"{rule['id']:>3}  fired {rule['fired']:>6} of {rule['seen']:>6} matches  {rule['spec']}"
        f"{'  (exhausted)' if rule['exhausted'] else ''}"))


@ctl_fault.command("clear")
@click.argument("rule_id", type=int, required=False)
@click.pass_context
def ctl_fault_clear(ctx, rule_id) -> None:
    """Remove rule RULE_ID, or every rule."""
    _call_and_print(ctx.parent, "fault-clear", **({} if rule_id is None else {"id": rule_id}))


@ctl.command("xenbus-state")
@click.argument("device")
@click.argument("state", type=click.Choice(["closing", "closed"]))
@click.pass_context
def ctl_xenbus_state(ctx, device, state) -> None:
    """Move backend DEVICE (e.g. xvdb) to Closing or Closed now."""
    _call_and_print(ctx, "xenbus-state", device=device, state=state)
