"""The nodes a Xen toolstack creates for a new HVM guest under /local/domain/<domid>.

Informational nodes (domid, name, platform/*, store/*, console/*) belong to
dom0 and are only readable by the guest; the directories and flags a guest's
drivers write to (control/shutdown, control/feature-*, data, device, ...)
belong to the guest, as libxl and QEMU's Xen emulation set them up.
"""

from __future__ import annotations

from .errors import XenStoreError
from .perms import Access, Permission
from .store import Client, XenStore, domain_path

XENBUS_STATE_INITIALISED = 3

_MAX_COMMIT_ATTEMPTS = 8


def _read_only(domid: int) -> tuple[Permission, ...]:
    return (Permission(0, Access.NONE), Permission(domid, Access.READ))


def _guest_owned(domid: int) -> tuple[Permission, ...]:
    return (Permission(domid, Access.NONE),)


def default_domain_nodes(domid: int, name: str, store_port: int, store_ring_ref: int,
                         console_port: int, console_ring_ref: int, memory_kib: int | None = None,
                         ) -> list[tuple[str, str, tuple[Permission, ...]]]:
    """(relative path, value, permissions) for every default node, parents
    first. `memory_kib`: the guest's RAM, for memory/static-max and
    memory/target (the balloon driver's target, which `xl mem-set` moves)."""
    read_only = _read_only(domid)
    guest = _guest_owned(domid)
    memory = [] if memory_kib is None else [
        ("memory", "", read_only),
        ("memory/static-max", str(memory_kib), read_only),
        ("memory/target", str(memory_kib), read_only),
        ("memory/videoram", "0", read_only),
    ]
    return [
        ("", "", read_only),
        ("domid", str(domid), read_only),
        ("name", name, read_only),
        ("control", "", read_only),
        ("control/platform-feature-xs_reset_watches", "1", read_only),
        ("control/platform-feature-multiprocessor-suspend", "1", read_only),
        ("control/shutdown", "", guest),
        ("control/sysrq", "", guest),
        ("control/feature-poweroff", "1", guest),
        ("control/feature-reboot", "1", guest),
        # Made empty and left to the guest, which fills it in if it can
        # suspend (as libxl makes it): pyvmm cannot save a domain yet, so it
        # claims nothing here, and answers SHUTDOWN_suspend with "suspend
        # cancelled" (domain.py). The snapshot work advertises suspend once
        # suspend, save and restore work.
        ("control/feature-suspend", "", guest),
        ("control/feature-s3", "1", guest),
        ("control/feature-s4", "1", guest),
        ("platform", "", read_only),
        ("platform/acpi", "1", read_only),
        ("platform/acpi_s3", "1", read_only),
        ("platform/acpi_s4", "1", read_only),
        ("platform/acpi_laptop_slate", "0", read_only),
        ("store", "", read_only),
        ("store/port", str(store_port), read_only),
        ("store/ring-ref", str(store_ring_ref), read_only),
        ("console", "", read_only),
        ("console/port", str(console_port), read_only),
        ("console/ring-ref", str(console_ring_ref), read_only),
        ("console/state", str(XENBUS_STATE_INITIALISED), read_only),
        ("attr", "", guest),
        ("data", "", guest),
        ("device", "", guest),
        ("drivers", "", guest),
        ("error", "", guest),
        ("feature", "", guest),
    ] + memory


def create_domain_nodes(store: XenStore, domid: int, name: str, store_port: int,
                        store_ring_ref: int, console_port: int, console_ring_ref: int,
                        *, client: Client | None = None, memory_kib: int | None = None) -> str:
    """Create a guest's default nodes in one transaction, then introduce the
    domain (firing @introduceDomain).  Returns the domain's path.

    `client` is a privileged client to act through; one is made if omitted.
    """
    if not 0 < domid:
        raise ValueError(f"domain {domid} cannot be a guest")
    own_client = client is None
    dom0 = store.client(0) if own_client else client
    if not dom0.privileged:
        raise ValueError("default domain nodes need a privileged client")
    base = domain_path(domid)
    nodes = default_domain_nodes(domid, name, store_port, store_ring_ref,
                                 console_port, console_ring_ref, memory_kib)
    try:
        for attempt in range(_MAX_COMMIT_ATTEMPTS):
            try:
                with dom0.transaction() as tx:
                    for relative, value, perms in nodes:
                        path = f"{base}/{relative}" if relative else base
                        dom0.write(path, value, tx)
                        dom0.set_perms(path, perms, tx)
                break
            except XenStoreError as exc:
                if exc.name != "EAGAIN" or attempt == _MAX_COMMIT_ATTEMPTS - 1:
                    raise
        dom0.introduce_domain(domid)
    finally:
        if own_client:
            dom0.close()
    return base
