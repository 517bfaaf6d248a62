"""`pyvmm run`: boot a guest (the exit statuses are in the package's docstring)."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import click

from ..config import (WATCHDOG_ACTIONS, ConfigError, DeviceSpec, GdbAddress, SerialSpec, VmConfig,
                      parse_limit_option, parse_xen_version)
from ..core.snapshot import SnapshotError
from ..core.trace import CATEGORIES
from ..xen import backends as _backends  # noqa: F401 - registers the device kinds
from ..xen.backend import kind as device_kinds
from . import Size, fail


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
        from ..limits import help_text

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


@click.command(cls=_RunCommand)
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
@click.option("--memory", "-m", type=Size(), default="512M", show_default=True, help="Guest RAM (K/M/G suffix).")
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
            from ..vmm.snapshot import restored_config

            config = restored_config(restore, *saved, config, _kinds_given(ctx))
        config.validate()
        from ..runner import run_vm

        status = run_vm(config)
    except ConfigError as error:
        fail(str(error))
    except SnapshotError as error:
        fail(str(error))
    except Exception as error:  # the runner turns known failures into ConfigError-like messages
        from ..runner import describe_failure

        message = describe_failure(error)
        if message is None:
            raise
        fail(message)
    sys.exit(status)


def _is_cdrom_image(path: Path) -> bool:
    """Whether `path` is an ISO 9660 image that is not also a disk image (a
    hybrid ISO, with a partition table, still boots as a disk)."""
    from ..config import is_plain_iso9660, read_header

    return path.is_file() and is_plain_iso9660(read_header(path))


def _is_disk_image(path: Path) -> bool:
    """Whether `path` is a disk image rather than an xl.cfg file (text)."""
    from ..config import foreign_image, read_header

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

    from ..vmm.snapshot import read_config, refuse_shape_options, saved_boot

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
    from ..sandbox import SandboxError, SandboxOptions

    if user is not None:
        try:
            SandboxOptions.parse_user(user)
        except SandboxError as error:
            raise ConfigError(str(error))
    return SandboxOptions(user=user)


def _tracing_and_faults(categories: str | None, path: Path | None, specs: tuple[str, ...]) -> dict:
    """VmConfig's trace, trace_file and faults, checked (the runner opens the file)."""
    from ..core.faults import FaultRule, FaultSpecError
    from ..core.trace import TraceError, parse_categories

    if (categories is None) != (path is None):
        raise ConfigError("--trace and --trace-file go together")
    try:
        for spec in specs:
            FaultRule.parse(spec)
        wanted = parse_categories(categories) if categories is not None else frozenset()
    except (FaultSpecError, TraceError) as error:
        raise ConfigError(str(error))
    return {"trace": wanted, "trace_file": path, "faults": tuple(specs)}


def _xl_config_values(path: Path, ctx: click.Context, devices: dict) -> dict:
    """The xl.cfg file's settings, less those the command line gives; its
    device specs go to `devices` (by each kind's xl attribute: disks, vifs)."""
    from click.core import ParameterSource

    from ..xlcfg import load_xl_config

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
