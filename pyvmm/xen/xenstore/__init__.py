"""A xenstore served from inside the VMM: the store, its wire protocol and ring.

    store = XenStore()
    dom0 = store.client(0)                      # the VMM's own, privileged
    create_domain_nodes(store, 1, "guest", ...)
    ring = RingServer(page, store.connect(1))   # the guest's shared page
    if ring.process(): notify_guest()
"""

from .domain import create_domain_nodes, default_domain_nodes
from .errors import XenStoreError
from .perms import Access, Permission
from .protocol import Connection, Header, Op
from .ring import RingServer
from .store import Client, Node, Quotas, XenStore, domain_path

__all__ = [
    "Access",
    "Client",
    "Connection",
    "Header",
    "Node",
    "Op",
    "Permission",
    "Quotas",
    "RingServer",
    "XenStore",
    "XenStoreError",
    "create_domain_nodes",
    "default_domain_nodes",
    "domain_path",
]
