"""The `pyvmm` command line.

Exit status of `pyvmm run`:
  0   the guest powered off (or --expect matched; the guest is then stopped), or the VM
      stopped after its snapshot (ctl NAME snapshot --stop, --snapshot-on REGEX,stop)
  1   VMM or usage error (one line on stderr, no traceback)
  2   the guest rebooted under --no-reboot
  3   the guest crashed
  4   the VM was destroyed (pyvmm ctl NAME destroy)
  5   the guest ended without printing the --expect pattern (or --snapshot-on REGEX,stop's)
  6   the guest triple-faulted (an unexpected CPU reset) under --no-reboot
  7   a Xen watchdog expired (SCHEDOP_watchdog), or the guest shut down with SHUTDOWN_watchdog
  124 --timeout expired
  128+N  stopped by signal N (or 130 for the console escape Ctrl-A x)
  159 (128+SIGSYS) the sandbox stopped the VMM at a forbidden system call; the line
      `pyvmm: sandbox: forbidden system call NAME (NR)` on stderr names it (docs/SANDBOX.md).
      A shell shows 159; a parent that waits for the process sees it killed by SIGSYS.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import click

from .config import (WATCHDOG_ACTIONS, ConfigError, DeviceSpec, GdbAddress, SerialSpec, VmConfig,
                     parse_limit_option, parse_size, parse_xen_version)
from .core.snapshot import SnapshotError
from .core.trace import CATEGORIES
from .xen import backends as _backends  # noqa: F401 - registers the device kinds
from .xen.backend import kind as device_kinds

EXIT_OK = 0
EXIT_VMM_ERROR = 1
EXIT_REBOOTED = 2
EXIT_CRASHED = 3
EXIT_NO_EXPECT = 5
EXIT_TRIPLE_FAULT = 6
EXIT_WATCHDOG = 7
EXIT_TIMEOUT = 124


class _Size(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ConfigError as error:
            self.fail(str(error), param, ctx)


class _Regex(click.ParamType):
    name = "regex"

    def convert(self, value, param, ctx):
        if isinstance(value, re.Pattern):
            return value
        try:
            return re.compile(value.encode())
        except re.error as error:
            self.fail(f"{value!r} is not a valid regular expression: {error}", param, ctx)


def _limit_help(ctx, param, texts):
    if "help" in texts:
        from .limits import help_text

        click.echo("\n".join(help_text()))
        ctx.exit(0)
    return texts


class _RunCommand(click.Command):
    """`pyvmm run`, with one repeatable option per registered device kind
    (--disk, --net, ...: pyvmm/xen/backend/kind.py), placed before
    --xenstore-socket and read from the registry whenever it runs."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        at = next(i for i, param in enumerate(params) if param.name == "xenstore_socket")
        devices = [click.Option([kind.option.name, kind.option.dest], multiple=True, metavar=kind.option.metavar,
                                help=kind.option.help) for kind in device_kinds.with_option()]
        return [*params[:at], *devices, *params[at:]]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyvmm")
def cli() -> None:
    """A userspace VMM that runs Xen HVM guests on KVM."""


def main() -> None:
    # Usage errors exit 1 like every other VMM error (click's default is 2,
    # which pyvmm reserves for "the guest rebooted").
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(EXIT_VMM_ERROR)
    except click.Abort:
        sys.exit(EXIT_VMM_ERROR)


@cli.command(cls=_RunCommand)
@click.argument("config_file", required=False, type=click.Path(path_type=Path))
@click.option("--kernel", type=click.Path(path_type=Path), help="bzImage or PVH ELF kernel.")
@click.option("--initrd", type=click.Path(path_type=Path), help="Initial ramdisk.")
@click.option("--firmware", type=click.Path(path_type=Path),
              help="BIOS image for a boot without --kernel (default: SeaBIOS, /usr/share/seabios/bios-256k.bin).")
@click.option("--cdrom", type=click.Path(path_type=Path), metavar="ISO",
              help="An ATAPI CD-ROM drive (hdc) with this ISO image, read-only, for a boot without --kernel; "
                   "the firmware boots it when there is no --disk (docs/FIRMWARE.md).")
@click.option("--boot", type=click.Choice(["disk", "cdrom"]),
              help="What the firmware boots first (default: the disk if there is one, else the CD-ROM).")
@click.option("--append", "cmdline", default="", help="Kernel command line.")
@click.option("--memory", "-m", type=_Size(), default="512M", show_default=True, help="Guest RAM (K/M/G suffix).")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--serial", default="stdio", show_default=True, help="stdio | file:PATH | none")
@click.option("--no-reboot", is_flag=True, help="Exit with status 2 when the guest reboots.")
@click.option("--on-watchdog", type=click.Choice(WATCHDOG_ACTIONS), default="destroy", show_default=True,
              help="When a Xen watchdog expires: stop (status 7), boot again (status 7 under --no-reboot), "
                   "or keep the VM paused until destroyed.")
@click.option("--timeout", type=float, help="Stop the guest after SECONDS (status 124).")
@click.option("--expect", type=_Regex(), help="Stop with status 0 once the console prints REGEX (5 if it never does).")
@click.option("--xen/--no-xen", default=True, show_default=True,
              help="Emulate Xen for the guest (an HVM domain); --no-xen boots a plain PC guest.")
@click.option("--xen-version", default="4.17", show_default=True, help="Xen version the guest sees.")
@click.option("--xen-accel/--no-xen-accel", default=True, show_default=True,
              help="Use KVM's in-kernel event-channel paths where the host has them.")
@click.option("--xen-fifo/--no-xen-fifo", default=False, show_default=True,
              help="Offer FIFO event channels (Linux then takes them); their delivery is all in pyvmm, "
                   "not KVM (docs/XEN.md).")
@click.option("--name", help="The VM's name: its control socket and xenstore name (default: from the config file, else pyvmm-PID).")
@click.option("--xenstore-socket", type=click.Path(path_type=Path),
              help="Serve the VM's xenstore to dom0 tools here (default: in the runtime directory).")
@click.option("--trace", "trace_categories", metavar="CATEGORIES",
              help=f"Trace these events (comma-separated: "
                   f"{', '.join(name for name in CATEGORIES if name not in ('fault', 'stop'))}, "
                   "or all) to --trace-file; see docs/FRONTEND-DEVELOPERS.md.")
@click.option("--trace-file", type=click.Path(path_type=Path), help="Where --trace writes (JSON lines).")
@click.option("--stats", "print_stats", is_flag=True,
              help="At the end, print exit counts and the VMM's time per kind of exit, hypercall and "
                   "xenstore request, and the start-up time, on stderr (docs/PROFILING.md).")
@click.option("--stats-json", type=click.Path(path_type=Path), metavar="FILE",
              help="Write the same statistics to FILE as JSON.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="Inject a fault, e.g. blk:error,op=write,sectors=2048-4095 "
                   "(repeatable; docs/FRONTEND-DEVELOPERS.md).")
@click.option("--gdb", "gdb", metavar="tcp:[HOST:]PORT|unix:PATH",
              help="Serve a gdb remote stub for the guest, on 127.0.0.1 unless HOST is given (docs/GDB.md).")
@click.option("--gdb-allow-remote", is_flag=True,
              help="Let --gdb listen beyond loopback; the stub has no authentication.")
@click.option("--gdb-wait", is_flag=True, help="With --gdb: start the vCPUs only when gdb continues them.")
@click.option("--gdb-breakpoints", type=click.Choice(["int3", "debugregs"]), default="int3", show_default=True,
              help="How gdb's breakpoints are set: int3 in guest memory, or debug registers (four at most).")
@click.option("--limit", "limit_settings", multiple=True, metavar="NAME=VALUE", callback=_limit_help, is_eager=True,
              help="Set a per-domain limit (repeatable); --limit help lists them.")
@click.option("--restore", type=click.Path(path_type=Path), metavar="FILE",
              help="Resume the guest of snapshot FILE instead of booting a kernel; --disk and --net give it "
                   "its disks (the same images) and NICs, by default the snapshot's (docs/SNAPSHOTS.md).")
@click.option("--snapshot-on", "snapshot_on", metavar="REGEX[,stop]",
              help="Write a snapshot to --snapshot-file when the console first prints REGEX; with ',stop' "
                   "the VM then stops (status 0).")
@click.option("--snapshot-file", type=click.Path(path_type=Path), metavar="FILE",
              help="Where --snapshot-on writes (created, or emptied, when pyvmm starts).")
@click.option("--no-sandbox", is_flag=True,
              help="Run without the sandbox (unprivileged user, no capabilities, seccomp); for debugging.")
@click.option("--user", "sandbox_user", metavar="NAME[:GROUP]",
              help="The sandbox's unprivileged user (default when root: nobody and its group).")
@click.option("--verbose", "-v", count=True, help="More log output on stderr (-vv for debug).")
def run(config_file, kernel, initrd, firmware, cdrom, boot, cmdline, memory, vcpus, serial, no_reboot, on_watchdog,
        timeout,
        expect, xen, xen_version,
        xen_accel, xen_fifo, name, xenstore_socket, trace_categories, trace_file, print_stats, stats_json, faults, gdb,
        gdb_allow_remote,
        gdb_wait, gdb_breakpoints, limit_settings, restore, snapshot_on, snapshot_file, no_sandbox, sandbox_user,
        verbose, **device_options) -> None:
    """Boot a guest kernel, a disk image through firmware (--disk without --kernel, or an IMAGE
    given as CONFIG_FILE), the guest an xl.cfg CONFIG_FILE describes, or a snapshot's (--restore).

    Options given on the command line override the file's values."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="pyvmm: %(levelname)s: %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        ctx = click.get_current_context()
        values = dict(kernel=kernel, initrd=initrd, cmdline=cmdline, memory=memory, vcpus=vcpus, serial=serial,
                      no_reboot=no_reboot, on_watchdog=on_watchdog, xen=xen, name=name, limits={},
                      sandbox_user=sandbox_user, cdrom=cdrom, boot=boot)
        file_devices: dict[str, tuple[DeviceSpec, ...]] = {}
        saved = None
        if restore is not None:
            saved = _restore_values(restore, ctx, config_file, values)
        if config_file is not None and _is_cdrom_image(config_file) and cdrom is None:
            # `pyvmm run ISO`: the ISO in the CD-ROM drive, booted through firmware.
            values["cdrom"] = config_file
            config_file = None
        if config_file is not None and _is_disk_image(config_file):
            # `pyvmm run IMAGE`: the image is the first disk, booted through firmware.
            dest = next(kind.option.dest for kind in device_kinds.with_option() if kind.name == "blk")
            device_options[dest] = (str(config_file), *device_options.get(dest, ()))
            config_file = None
        if config_file is not None:
            values.update(_xl_config_values(config_file, ctx, file_devices))
        snapshot_pattern, snapshot_stop = _snapshot_on(snapshot_on)
        config = VmConfig(
            kernel=values["kernel"],
            initrd=values["initrd"],
            cmdline=values["cmdline"],
            memory=values["memory"],
            vcpus=values["vcpus"],
            serial=SerialSpec.parse(values["serial"]),
            no_reboot=values["no_reboot"],
            on_watchdog=values["on_watchdog"],
            timeout=timeout,
            expect=expect,
            xen=values["xen"],
            xen_version=parse_xen_version(xen_version),
            xen_accel=xen_accel,
            xen_fifo=xen_fifo,
            name=values["name"] or f"pyvmm-{os.getpid()}",
            xenstore_socket=xenstore_socket,
            devices=_device_specs(ctx, device_options, file_devices),
            gdb=GdbAddress.parse(gdb) if gdb is not None else None,
            gdb_allow_remote=gdb_allow_remote,
            gdb_wait=gdb_wait,
            gdb_breakpoints=gdb_breakpoints,
            sandbox=_sandbox_options(no_sandbox, sandbox_user, values["sandbox_user"]),
            # the file's limits, then --limit's (the last of a name wins)
            limits=VmConfig.limits_from({**values["limits"], **dict(map(parse_limit_option, limit_settings))}),
            **_tracing_and_faults(trace_categories, trace_file, faults),
            stats=print_stats,
            stats_json=stats_json,
            firmware=firmware,
            cdrom=values["cdrom"],
            boot=values["boot"],
            restore=restore,
            snapshot_on=snapshot_pattern,
            snapshot_stop=snapshot_stop,
            snapshot_file=snapshot_file,
        )
        if saved is not None:
            from .vmm.snapshot import restored_config

            config = restored_config(restore, *saved, config, _kinds_given(ctx))
        config.validate()
        from .runner import run_vm

        status = run_vm(config)
    except ConfigError as error:
        _fail(str(error))
    except SnapshotError as error:
        _fail(str(error))
    except Exception as error:  # the runner turns known failures into ConfigError-like messages
        from .runner import describe_failure

        message = describe_failure(error)
        if message is None:
            raise
        _fail(message)
    sys.exit(status)


def _is_cdrom_image(path: Path) -> bool:
    """Whether `path` is an ISO 9660 image that is not also a disk image (a
    hybrid ISO, with a partition table, still boots as a disk)."""
    from .config import is_plain_iso9660, read_header

    return path.is_file() and is_plain_iso9660(read_header(path))


def _is_disk_image(path: Path) -> bool:
    """Whether `path` is a disk image rather than an xl.cfg file (text)."""
    from .config import foreign_image, read_header

    header = read_header(path, 4096)
    return path.is_block_device() or b"\0" in header or foreign_image(header) is not None


# The options that give a guest its shape, which a restore takes from the snapshot.
SHAPE_OPTIONS = {"kernel": "--kernel", "initrd": "--initrd", "cmdline": "--append", "memory": "--memory",
                 "vcpus": "--vcpus", "xen": "--xen/--no-xen", "xen_version": "--xen-version",
                 "xen_accel": "--xen-accel/--no-xen-accel", "xen_fifo": "--xen-fifo/--no-xen-fifo",
                 "limit_settings": "--limit", "firmware": "--firmware",
                 "cdrom": "--cdrom", "boot": "--boot"}


def _restore_values(path: Path, ctx: click.Context, config_file, values: dict) -> tuple[dict, dict]:
    """--restore: the snapshot's header and state (checked as a file), its
    shape put into `values`; options that would change the shape refused."""
    from click.core import ParameterSource

    from .vmm.snapshot import read_config, refuse_shape_options, saved_boot

    given = {option: ctx.get_parameter_source(param) is ParameterSource.COMMANDLINE
             for param, option in SHAPE_OPTIONS.items()}
    if config_file is not None:
        given["an xl.cfg file"] = True
    refuse_shape_options(given)
    header, state = read_config(path)
    saved = state["config"]
    boot = saved_boot(saved)
    values.update(kernel=boot["kernel"], cdrom=boot["cdrom"], boot=boot["boot"],
                  initrd=Path(saved["initrd"]) if saved.get("initrd") else None,
                  cmdline=saved["cmdline"], memory=saved["memory"], vcpus=saved["vcpus"], xen=saved["xen"])
    return header, state


def _kinds_given(ctx: click.Context) -> set[str]:
    """The device kinds whose option (--disk, --net) the command line gives."""
    from click.core import ParameterSource

    return {kind.name for kind in device_kinds.with_option()
            if ctx.get_parameter_source(kind.option.dest) is ParameterSource.COMMANDLINE}


def _snapshot_on(text: str | None) -> tuple[re.Pattern[bytes] | None, bool]:
    """--snapshot-on REGEX[,stop]: (the pattern, whether to stop after)."""
    if text is None:
        return None, False
    stop = text.endswith(",stop")
    pattern = text[: -len(",stop")] if stop else text
    try:
        return re.compile(pattern.encode()), stop
    except re.error as error:
        raise ConfigError(f"--snapshot-on {text!r}: {pattern!r} is not a valid regular expression: {error}")


def _sandbox_options(no_sandbox: bool, option_user: str | None, user: str | None):
    """The sandbox's options; `user` is --user, else the xl.cfg file's device_model_user."""
    if no_sandbox:
        if option_user is not None:
            raise ConfigError("--user is the sandbox's user: it cannot go with --no-sandbox")
        return None
    from .sandbox import SandboxError, SandboxOptions

    if user is not None:
        try:
            SandboxOptions.parse_user(user)
        except SandboxError as error:
            raise ConfigError(str(error))
    return SandboxOptions(user=user)


def _tracing_and_faults(categories: str | None, path: Path | None, specs: tuple[str, ...]) -> dict:
    """VmConfig's trace, trace_file and faults, checked (the runner opens the file)."""
    from .core.faults import FaultRule, FaultSpecError
    from .core.trace import TraceError, parse_categories

    if (categories is None) != (path is None):
        raise ConfigError("--trace and --trace-file go together")
    try:
        for spec in specs:
            FaultRule.parse(spec)
        wanted = parse_categories(categories) if categories is not None else frozenset()
    except (FaultSpecError, TraceError) as error:
        raise ConfigError(str(error))
    return {"trace": wanted, "trace_file": path, "faults": tuple(specs)}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--can-run-linux", is_flag=True, help="Only set the exit status: 0 if Linux guests can run here.")
@click.option("--can-run-xen", is_flag=True, help="Only set the exit status: 0 if Xen HVM guests can run here.")
def check(as_json, can_run_linux, can_run_xen) -> None:
    """Report what this host's KVM can do for pyvmm."""
    from .hostcheck import probe

    report = probe()
    if can_run_linux or can_run_xen:
        ok = (report.can_run_linux or not can_run_linux) and (report.can_run_xen or not can_run_xen)
        sys.exit(0 if ok else 1)
    if as_json:
        import json

        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    if not report.kvm_available:
        click.echo(f"KVM: unavailable: {report.problem}")
    else:
        speed = "software-only (kvm_pvm): too slow for Linux guests" if report.software_only else "hardware-assisted"
        click.echo(f"KVM: available, {speed}")
        for name, present in report.as_dict()["xen_capabilities"].items():
            click.echo(f"  Xen {name:<22} {'yes' if present else 'no'}")
    click.echo(f"Linux guests: {'yes' if report.can_run_linux else 'no'}")
    click.echo(f"Xen HVM guests: {'yes' if report.can_run_xen else 'no'}")
    click.echo(f"Sandbox: {'yes' if report.sandbox else 'no'} ({report.sandbox_detail})")
    if not report.can_run_xen:
        click.echo("Use scripts/testbed to run guests in a nested KVM that has what is missing here.")


def _xl_config_values(path: Path, ctx: click.Context, devices: dict) -> dict:
    """The xl.cfg file's settings, less those the command line gives; its
    device specs go to `devices` (by each kind's xl attribute: disks, vifs)."""
    from click.core import ParameterSource

    from .xlcfg import load_xl_config

    options = load_xl_config(path).to_run_options()
    for kind in device_kinds.with_xl_key():
        if kind.xl.attr in options:
            devices[kind.xl.attr] = options.pop(kind.xl.attr)
    return {
        key: value
        for key, value in options.items()
        if ctx.get_parameter_source(key) is not ParameterSource.COMMANDLINE
    }


def _device_specs(ctx: click.Context, options: dict, file_devices: dict) -> tuple[DeviceSpec, ...]:
    """Every device kind's specs: its option's when the command line gives
    it, else the xl.cfg file's, in the order the kinds are registered."""
    from click.core import ParameterSource

    specs: list[DeviceSpec] = []
    for kind in device_kinds.kinds():
        option = kind.option
        given = option is not None and ctx.get_parameter_source(option.dest) is ParameterSource.COMMANDLINE
        if not given and kind.xl is not None and kind.xl.attr in file_devices:
            specs += file_devices[kind.xl.attr]
        elif option is not None:
            specs += [option.parse(text, index) for index, text in enumerate(options.get(option.dest, ()))]
    return tuple(specs)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_vms_command(as_json) -> None:
    """List the running VMs of this user."""
    from .control.server import list_vms
    from .core.runtime import runtime_dir

    vms = list_vms(runtime_dir())
    if as_json:
        click.echo(json.dumps(vms, indent=2))
        return
    click.echo(f"{'NAME':<24} {'STATE':<14} {'VCPUS':>5} {'MEMORY':>8} {'PID':>8}  XEN")
    for vm in vms:
        click.echo(f"{vm['name']:<24} {vm['state']:<14} {vm['vcpus']:>5} {vm['memory'] >> 20:>7}M {vm['pid']:>8}  "
                   f"{'yes' if vm['xen'] else 'no'}")


@cli.group()
@click.argument("name")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="How long shutdown/reboot wait for the guest.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.pass_context
def ctl(ctx, name, timeout, as_json) -> None:
    """Operate the running VM NAME (see docs/CONTROL.md)."""
    ctx.obj = {"name": name, "timeout": timeout, "json": as_json}


def _control_call(ctx, command: str, **arguments):
    from .control.server import ControlClient, ControlConnectionError, ControlError
    from .core.runtime import RuntimeDirError, control_socket_path

    try:
        client = ControlClient(control_socket_path(ctx.obj["name"]), timeout=10)
    except (ControlConnectionError, ControlError, RuntimeDirError, OSError) as error:
        raise click.ClickException(str(error))
    try:
        return client, client.execute(command, **arguments)
    except ControlError as error:
        client.close()
        raise click.ClickException(str(error))


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
    client, result = _control_call(ctx, "status")
    client.close()
    _print(ctx, result)


@ctl.command("mem-set")
@click.argument("size", type=_Size())
@click.pass_context
def ctl_mem_set(ctx, size) -> None:
    """Set the guest's balloon target, as `xl mem-set` (SIZE with a K/M/G suffix; MiB without).

    pyvmm writes memory/target (in KiB) to the guest's xenstore directory; the
    guest's balloon driver gives memory back, or takes it again, up to its RAM."""
    client, result = _control_call(ctx, "mem-set", target=size)
    client.close()
    _print(ctx, result)


@ctl.command("mem-info")
@click.pass_context
def ctl_mem_info(ctx) -> None:
    """Show the guest's RAM, its balloon target and what it has given back (bytes)."""
    client, result = _control_call(ctx, "mem-info")
    client.close()
    _print(ctx, result)


@ctl.command("diagnose")
@click.pass_context
def ctl_diagnose(ctx) -> None:
    """Show where each vCPU is and, for Xen guests, the xenstore ring and event channels."""
    client, result = _control_call(ctx, "diagnose")
    client.close()
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
                from .control.server import ControlError

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
    from .control.server import ControlClient, ControlConnectionError, ControlError
    from .core.runtime import RuntimeDirError, control_socket_path

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


@cli.group("snapshot")
def snapshot_group() -> None:
    """Look at snapshot files (pyvmm ctl NAME snapshot writes them)."""


@snapshot_group.command("info")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the header as JSON.")
def snapshot_info(file, as_json) -> None:
    """Check FILE and say what it holds, and whether this host can restore
    it (its CPU and KVM; the disks are checked by the restore): exit 1 if not."""
    from .core.snapfile import open_snapshot
    from .vmm.snapshot import describe

    try:
        with open_snapshot(file) as snapshot:
            info = describe(snapshot)
    except SnapshotError as error:
        _fail(str(error))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, list):
                click.echo(f"{key}:")
                for item in value:
                    click.echo(f"  {item}")
            else:
                click.echo(f"{key}: {value}")
    if info["restorable_here"] is False:
        sys.exit(EXIT_VMM_ERROR)


@ctl.group("xenstore")
def ctl_xenstore() -> None:
    """Read and change the VM's xenstore as domain 0."""


@ctl_xenstore.command("read")
@click.argument("path")
@click.pass_context
def ctl_xenstore_read(ctx, path) -> None:
    client, result = _control_call(ctx.parent, "xenstore-read", path=path)
    client.close()
    click.echo(result)


@ctl_xenstore.command("write")
@click.argument("path")
@click.argument("value")
@click.pass_context
def ctl_xenstore_write(ctx, path, value) -> None:
    client, _ = _control_call(ctx.parent, "xenstore-write", path=path, value=value)
    client.close()


@ctl_xenstore.command("rm")
@click.argument("path")
@click.pass_context
def ctl_xenstore_rm(ctx, path) -> None:
    client, _ = _control_call(ctx.parent, "xenstore-rm", path=path)
    client.close()


@ctl_xenstore.command("ls")
@click.argument("path", default="/")
@click.pass_context
def ctl_xenstore_ls(ctx, path) -> None:
    client, result = _control_call(ctx.parent, "xenstore-ls", path=path)
    client.close()
    if ctx.parent.obj["json"]:
        click.echo(json.dumps(result, indent=2))
        return
    for node, value in result.items():
        click.echo(f'{node} = "{value}"')


@ctl.group("evtchn")
def ctl_evtchn() -> None:
    """Inspect the VM's event channels."""


@ctl_evtchn.command("list")
@click.pass_context
def ctl_evtchn_list(ctx) -> None:
    _print_list(ctx.parent, "evtchn-list", lambda port: "  ".join(f"{key}={value}" for key, value in port.items()))


def _print_list(ctx, command: str, line) -> None:
    """A command's list result: JSON, or one line(item) per item."""
    client, result = _control_call(ctx, command)
    client.close()
    if ctx.obj["json"]:
        click.echo(json.dumps(result, indent=2))
        return
    for item in result:
        click.echo(line(item))


@ctl.group("fault")
def ctl_fault() -> None:
    """Inject faults into the running VM (docs/FRONTEND-DEVELOPERS.md)."""


def _call_and_print(ctx, command: str, **arguments) -> None:
    client, result = _control_call(ctx, command, **arguments)
    client.close()
    _print(ctx, result)


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


@cli.group("trace")
def trace_group() -> None:
    """Read trace files written by `pyvmm run --trace`."""


@trace_group.command("show")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--category", "-c", "categories", multiple=True, help="Only this category (repeatable).")
@click.option("--grep", help="Only events whose record contains TEXT.")
@click.option("--since", type=float, help="Only events at or after SECONDS from the trace's start.")
@click.option("--until", type=float, help="Only events at or before SECONDS from the trace's start.")
@click.option("--json", "as_json", is_flag=True, help="Print the kept records as they are (JSON lines).")
def trace_show(file, categories, grep, since, until, as_json) -> None:
    """Print a trace FILE one event per line, filtered."""
    from .debug.trace_show import TraceFilter, TraceFormatError, show

    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        _fail(f"unknown category {', '.join(sorted(unknown))}; choose from {', '.join(CATEGORIES)}")
    try:
        show(file, sys.stdout, TraceFilter(frozenset(categories), grep, since, until), as_json=as_json)
    except TraceFormatError as error:
        _fail(f"{file.name}: {error}")
    except BrokenPipeError:
        sys.stderr.close()


def _fail(message: str) -> None:
    click.echo(f"pyvmm: error: {message}", err=True)
    sys.exit(EXIT_VMM_ERROR)


