"""`pyvmm snapshot info FILE`: what a snapshot file holds, and whether this host can restore it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..core.snapshot import SnapshotError
from . import EXIT_VMM_ERROR, fail


@click.group("snapshot")
def snapshot_group() -> None:
    """Look at snapshot files (pyvmm ctl NAME snapshot writes them)."""


@snapshot_group.command("info")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the header as JSON.")
def snapshot_info(file, as_json) -> None:
    """Check FILE and say what it holds, and whether this host can restore
    it (its CPU and KVM; the disks are checked by the restore): exit 1 if not."""
    from ..core.snapfile import open_snapshot
    from ..vmm.snapshot import describe

    try:
        with open_snapshot(file) as snapshot:
            info = describe(snapshot)
    except SnapshotError as error:
        fail(str(error))
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

