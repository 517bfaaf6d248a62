"""`pyvmm trace show FILE`: a trace file written by `pyvmm run --trace`, one event per line."""

from __future__ import annotations

import sys

import click

from ..core.trace import CATEGORIES
from ..xen import backends as _backends  # noqa: F401 - each device kind adds its trace categories (blk, net, ...)
from . import fail


@click.group("trace")
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
    from ..debug.trace_show import TraceFilter, TraceFormatError, show

    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        fail(f"unknown category {', '.join(sorted(unknown))}; choose from {', '.join(CATEGORIES)}")
    try:
        show(file, sys.stdout, TraceFilter(frozenset(categories), grep, since, until), as_json=as_json)
    except TraceFormatError as error:
        fail(f"{file.name}: {error}")
    except BrokenPipeError:
        sys.stderr.close()
