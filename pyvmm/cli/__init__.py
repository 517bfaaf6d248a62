"""The `pyvmm` command line.

Each command lives in its own module, imported only when it runs (or for
--help): `pyvmm ctl NAME status` does not import what `pyvmm run` needs,
which costs seconds of start-up in a slow, nested KVM.

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

import importlib
import sys

import click

EXIT_OK = 0
EXIT_VMM_ERROR = 1
EXIT_REBOOTED = 2
EXIT_CRASHED = 3
EXIT_NO_EXPECT = 5
EXIT_TRIPLE_FAULT = 6
EXIT_WATCHDOG = 7
EXIT_TIMEOUT = 124

# Command name -> "module:object": the module of this package that defines it.
COMMANDS = {"run": "run:run", "ctl": "ctl:ctl", "list": "ctl:list_vms_command", "check": "check:check",
            "snapshot": "snapshot:snapshot_group", "trace": "trace:trace_group"}


class Size(click.ParamType):
    """A size with a K/M/G suffix (`run --memory`, `ctl NAME mem-set`)."""

    name = "size"

    def convert(self, value, param, ctx):
        from ..config import ConfigError, parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ConfigError as error:
            self.fail(str(error), param, ctx)


class _LazyGroup(click.Group):
    """A group whose commands are imported when they are asked for."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, command = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), command)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


def fail(message: str) -> None:
    click.echo(f"pyvmm: error: {message}", err=True)
    sys.exit(EXIT_VMM_ERROR)

