"""The `pyvmm` command line.

Exit status of `pyvmm run`:
  0   the guest powered off (or --expect matched; the guest is then stopped)
  1   VMM or usage error (one line on stderr, no traceback)
  2   the guest rebooted under --no-reboot
  3   the guest crashed
  5   the guest ended without printing the --expect pattern
  124 --timeout expired
  128+N  stopped by signal N (or 130 for the console escape Ctrl-A x)
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from .config import ConfigError, SerialSpec, VmConfig, parse_size, parse_xen_version

EXIT_OK = 0
EXIT_VMM_ERROR = 1
EXIT_REBOOTED = 2
EXIT_CRASHED = 3
EXIT_NO_EXPECT = 5
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


@cli.command()
@click.option("--kernel", type=click.Path(path_type=Path), required=True, help="bzImage or PVH ELF kernel.")
@click.option("--initrd", type=click.Path(path_type=Path), help="Initial ramdisk.")
@click.option("--append", "cmdline", default="", help="Kernel command line.")
@click.option("--memory", "-m", type=_Size(), default="512M", show_default=True, help="Guest RAM (K/M/G suffix).")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--serial", default="stdio", show_default=True, help="stdio | file:PATH | none")
@click.option("--no-reboot", is_flag=True, help="Exit with status 2 when the guest reboots.")
@click.option("--timeout", type=float, help="Stop the guest after SECONDS (status 124).")
@click.option("--expect", type=_Regex(), help="Stop with status 0 once the console prints REGEX (5 if it never does).")
@click.option("--xen/--no-xen", default=True, show_default=True,
              help="Emulate Xen for the guest (an HVM domain); --no-xen boots a plain PC guest.")
@click.option("--xen-version", default="4.17", show_default=True, help="Xen version the guest sees.")
@click.option("--xen-accel/--no-xen-accel", default=True, show_default=True,
              help="Use KVM's in-kernel event-channel paths where the host has them.")
@click.option("--name", default="pyvmm", show_default=True, help="The guest's name (in xenstore).")
@click.option("--verbose", "-v", count=True, help="More log output on stderr (-vv for debug).")
def run(kernel, initrd, cmdline, memory, vcpus, serial, no_reboot, timeout, expect, xen, xen_version, xen_accel,
        name, verbose) -> None:
    """Boot a guest kernel."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="pyvmm: %(levelname)s: %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = VmConfig(
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            memory=memory,
            vcpus=vcpus,
            serial=SerialSpec.parse(serial),
            no_reboot=no_reboot,
            timeout=timeout,
            expect=expect,
            xen=xen,
            xen_version=parse_xen_version(xen_version),
            xen_accel=xen_accel,
            name=name,
        )
        config.validate()
        from .runner import run_vm

        status = run_vm(config)
    except ConfigError as error:
        _fail(str(error))
    except Exception as error:  # the runner turns known failures into ConfigError-like messages
        from .runner import describe_failure

        message = describe_failure(error)
        if message is None:
            raise
        _fail(message)
    sys.exit(status)


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
    if not report.can_run_xen:
        click.echo("Use scripts/testbed to run guests in a nested KVM that has what is missing here.")


def _fail(message: str) -> None:
    click.echo(f"pyvmm: error: {message}", err=True)
    sys.exit(EXIT_VMM_ERROR)


