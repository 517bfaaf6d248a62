"""`pyvmm check`: what this host's KVM can do for pyvmm."""

from __future__ import annotations

import sys

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--can-run-linux", is_flag=True, help="Only set the exit status: 0 if Linux guests can run here.")
@click.option("--can-run-xen", is_flag=True, help="Only set the exit status: 0 if Xen HVM guests can run here.")
def check(as_json, can_run_linux, can_run_xen) -> None:
    """Report what this host's KVM can do for pyvmm."""
    from ..hostcheck import probe

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
