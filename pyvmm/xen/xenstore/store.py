"""The xenstore database: a tree of nodes with permissions, transactions,
watches and per-domain quotas, following the semantics of Xen's xenstored.

Clients
    `XenStore.client(domid)` returns a `Client`, the Python API used by the
    VMM's own dom0 code (backends, the toolstack side) and, wrapped in a
    `protocol.Connection` by `XenStore.connect()`, by guests over the ring.
    Every operation raises `XenStoreError` with the errno name xenstored
    would answer.

Permissions
    A node's permission list starts with its owner, whose access letter is
    also the access of every domain not listed.  Owners and privileged
    clients may do anything.  A node created by an unprivileged client
    inherits its parent's list with the owner replaced by the creator.  A
    caller who may not read (or write) the nearest existing ancestor of a
    missing node gets EACCES rather than ENOENT, so it cannot probe what
    exists.

Transactions
    A transaction records, for every node it touches, the generation it
    first saw (or "absent"); all reads and writes go to private copies.
    Commit fails with EAGAIN if any touched node changed since, which is
    conservative but never lets a transaction commit over a change it did
    not see.  Watch events of a transaction fire only when it commits.

Watches and callbacks
    Watch events are computed when a change happens but delivered after the
    operation (for a wire client: after its reply), so no callback ever runs
    inside a half-done mutation.  A callback may call back into the store;
    the events that causes are delivered after it returns.

Threads
    The store is not thread-safe: the VMM calls it from its single event
    thread.
"""

from __future__ import annotations

import base64
import logging
import string
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator, Sequence

from ..abi import DOMID_FIRST_RESERVED
from .errors import QuotaError, XenStoreError
from .perms import Access, Permission
from .protocol import ABS_PATH_MAX, EVENT_BACKLOG_BYTES, REL_PATH_MAX, Connection
from pyvmm.limits import Limits
from pyvmm.core.faults import NULL_FAULTS, FaultInjector
from pyvmm.core.ratelimit import DEFAULT_LOG_RATE, LogRate
from pyvmm.core.trace import NULL_TRACE, Tracer
from pyvmm.core.snapshot import SnapshotError, check_version, natural, versioned

log = logging.getLogger(__name__)

WatchCallback = Callable[[str, str], None]
"""Called as callback(path, token) for each watch event."""

Observer = Callable[[int, str, "str | None", "bytes | None", int, str], None]
"""Called as observer(domid, op, path, value, tx_id, result) after each operation;
result is "OK" or the error name."""

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

_PATH_CHARS = frozenset(string.ascii_letters + string.digits + "-/_@")
_ALL_ACCESS = Access.READ | Access.WRITE | Access.OWNER
_DOM0_ONLY = (Permission(0, Access.NONE),)


@dataclass(frozen=True)
class Quotas:
    """Limits for unprivileged domains; privileged clients are never limited.
    The defaults are cxenstored's, except transaction_seconds (see docs/XEN.md)."""

    watches: int = Limits.xenstore_watches         # per domain            -> E2BIG
    nodes: int = Limits.xenstore_nodes             # owned, per domain     -> ENOSPC
    entry_size: int = Limits.xenstore_node_size    # bytes per node (node_size()) -> ENOSPC
    transactions: int = Limits.xenstore_transactions  # open, per domain   -> ENOSPC
    perms: int = Limits.xenstore_node_permissions  # entries per node      -> ENOSPC
    transaction_nodes: int = Limits.xenstore_transaction_nodes  # nodes touched by one transaction -> ENOSPC
    # Bytes a domain holds (memory_of()): nodes it owns, its watches, its
    # transactions' private copies, its queued output.  An operation that
    # would add to them starts only below the quota (else ENOMEM), and one
    # that creates nodes must fit whole, so the quota is passed by one
    # node's change at most (MEMORY_OVERSHOOT).
    memory: int = Limits.xenstore_memory
    transaction_seconds: float = Limits.xenstore_transaction_seconds  # then EAGAIN, and its copies are freed
    event_backlog: int = EVENT_BACKLOG_BYTES  # watch events queued on a connection; more are dropped

    @classmethod
    def from_limits(cls, limits: Limits) -> "Quotas":
        """The xenstore's share of a domain's limits."""
        return cls(
            watches=limits.xenstore_watches,
            nodes=limits.xenstore_nodes,
            entry_size=limits.xenstore_node_size,
            transactions=limits.xenstore_transactions,
            perms=limits.xenstore_node_permissions,
            transaction_nodes=limits.xenstore_transaction_nodes,
            memory=limits.xenstore_memory,
            transaction_seconds=limits.xenstore_transaction_seconds,
            event_backlog=limits.xenstore_event_backlog,
        )


# A transaction's first touch of an existing node: its path, then its copy
# (path and entry size); the most any one request adds past the quota.
MEMORY_OVERSHOOT = 3072 + 3072 + 2048

PERM_BYTES = 8  # a permission entry's cost in node_size(), as xenstored stores it
STATE_VERSION = 1


def node_size(value: bytes, children: tuple[str, ...], perms: tuple) -> int:
    """What a node costs against Quotas.entry_size: its value, its children's
    names (each with its NUL, as DIRECTORY sends them) and its permissions."""
    return len(value) + sum(map(len, children)) + len(children) + PERM_BYTES * len(perms)


def _node_bytes(path: str, node: "Node | None") -> int:
    """What a node held in memory costs against Quotas.memory."""
    return 0 if node is None else len(path) + node_size(node.value, node.children, node.perms)


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: tuple[Permission, ...]
    children: tuple[str, ...] = ()
    generation: int = 0

    @property
    def owner(self) -> int:
        return self.perms[0].domid


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def parent_of(path: str) -> str:
    """The parent of an absolute path; special paths hang off the root as in xenstored."""
    slash = path.rfind("/")
    return path[:slash] if slash > 0 else "/"


def child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def is_within(path: str, ancestor: str) -> bool:
    """True if path is ancestor or below it ("/" contains everything)."""
    if ancestor == "/":
        return True
    return path == ancestor or path.startswith(ancestor + "/")


def _basename(path: str) -> str:
    return path[path.rfind("/") + 1:]


def _generation_of(node: Node | None) -> int | None:
    return None if node is None else node.generation


# --- node tables: the live tree and a transaction's view of it -------------

class _Tree:
    """The committed nodes, keyed by absolute path."""

    def __init__(self) -> None:
        self._nodes: dict[str, Node] = {}
        self._generation = 0
        self._owned: Counter[int] = Counter()
        self._owned_bytes: Counter[int] = Counter()

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def get(self, path: str) -> Node | None:
        return self._nodes.get(path)

    def set(self, path: str, node: Node) -> None:
        old = self._nodes.get(path)
        if old is not None:
            self._owned[old.owner] -= 1
            self._owned_bytes[old.owner] -= _node_bytes(path, old)
        self._owned[node.owner] += 1
        self._owned_bytes[node.owner] += _node_bytes(path, node)
        self._nodes[path] = replace(node, generation=self.next_generation())

    def delete(self, path: str) -> None:
        old = self._nodes.pop(path, None)
        if old is not None:
            self._owned[old.owner] -= 1
            self._owned_bytes[old.owner] -= _node_bytes(path, old)

    def owned_by(self, domid: int) -> int:
        return self._owned[domid]

    def bytes_owned_by(self, domid: int) -> int:
        return self._owned_bytes[domid]

    def items(self):
        return self._nodes.items()

    def load(self, path: str, node: Node) -> None:
        """Put a restored node in as it was, generation included."""
        self._owned[node.owner] += 1
        self._owned_bytes[node.owner] += _node_bytes(path, node)
        self._nodes[path] = node


@dataclass
class _Access:
    seen_generation: int | None  # None: the node did not exist
    original_perms: tuple[Permission, ...] | None
    node: Node | None
    modified: bool = False


class _Transaction:
    """Private copies of every node a transaction touched, plus what it first saw.

    `memory` counts what it holds (each path it touched, each node it
    changed) and is mirrored into `account[domid]`, so that the store sees
    a domain's total without walking its transactions."""

    def __init__(self, tree: _Tree, tx_id: int, access_limit: int | None,
                 account: Counter[int], domid: int, started: float,
                 over_quota: Callable[[int], bool] | None = None):
        self.id = tx_id
        self._tree = tree
        self._access_limit = access_limit
        self._accessed: dict[str, _Access] = {}
        self._owned_delta: Counter[int] = Counter()
        self.events: dict[str, bool] = {}  # path -> exact, in order of first change
        self._account = account
        self._domid = domid
        self.memory = 0
        self.started = started
        self.expired = False
        self._over_quota = over_quota  # over_quota(more bytes) -> True if they do not fit

    def _charge(self, delta: int) -> None:
        self.memory += delta
        self._account[self._domid] += delta

    def expire(self) -> None:
        """Drop everything it holds; it can only fail from now on."""
        self._accessed.clear()
        self._owned_delta.clear()
        self.events.clear()
        self._charge(-self.memory)
        self.expired = True

    def _entry(self, path: str) -> _Access:
        entry = self._accessed.get(path)
        if entry is None:
            if self._access_limit is not None and len(self._accessed) >= self._access_limit:
                raise QuotaError("ENOSPC", "transaction touches too many nodes", "xenstore-transaction-nodes")
            # Even reads hold a path each: a walk up a long missing chain must stop at the quota.
            if self._over_quota is not None and self._over_quota(len(path)):
                raise QuotaError("ENOMEM", "transaction at its domain's memory quota", "xenstore-memory")
            node = self._tree.get(path)
            entry = _Access(_generation_of(node), node and node.perms, node)
            self._accessed[path] = entry
            self._charge(len(path))
        return entry

    def get(self, path: str) -> Node | None:
        return self._entry(path).node

    def set(self, path: str, node: Node) -> None:
        entry = self._entry(path)
        if entry.node is not None:
            self._owned_delta[entry.node.owner] -= 1
        self._owned_delta[node.owner] += 1
        self._replace(path, entry, replace(node, generation=self._tree.next_generation()))

    def delete(self, path: str) -> None:
        entry = self._entry(path)
        if entry.node is not None:
            self._owned_delta[entry.node.owner] -= 1
        self._replace(path, entry, None)

    def _replace(self, path: str, entry: _Access, node: Node | None) -> None:
        # Only a changed node is a private copy; an unchanged one is the tree's.
        held = _node_bytes(path, entry.node) if entry.modified else 0
        self._charge(_node_bytes(path, node) - held)
        entry.node = node
        entry.modified = True

    def owned_by(self, domid: int) -> int:
        return self._tree.owned_by(domid) + self._owned_delta[domid]

    def owned_delta(self, domid: int) -> int:
        return self._owned_delta[domid]

    def note_event(self, path: str, exact: bool) -> None:
        # A subtree event (exact=False) wins over an exact one for the same path.
        self.events[path] = self.events.get(path, True) and exact

    def original_perms(self, path: str) -> tuple[Permission, ...] | None:
        entry = self._accessed.get(path)
        return entry.original_perms if entry else None

    def conflicts(self) -> bool:
        return any(_generation_of(self._tree.get(path)) != entry.seen_generation
                   for path, entry in self._accessed.items())

    def save_state(self, now: float) -> dict:
        return {
            "id": self.id, "age": max(0.0, now - self.started), "expired": self.expired,
            "accessed": [[path, entry.seen_generation, _perms_state(entry.original_perms), _node_state(entry.node),
                          entry.modified] for path, entry in self._accessed.items()],
            "owned_delta": {str(domid): count for domid, count in self._owned_delta.items() if count},
            "events": [[path, exact] for path, exact in self.events.items()],
        }

    def load(self, state: dict) -> None:
        """Take back save_state()'s copies into this new, empty transaction
        (SnapshotError for a malformed one); charged as they were."""
        accessed, owned, events = state.get("accessed"), state.get("owned_delta"), state.get("events")
        if not isinstance(accessed, list) or not isinstance(owned, dict) or not isinstance(events, list):
            raise SnapshotError("XenStore: a transaction without its copies")
        self.expired = state.get("expired") is True
        memory = 0
        for item in accessed:
            if not isinstance(item, list) or len(item) != 5 or not isinstance(item[4], bool):
                raise SnapshotError(f"XenStore: bad transaction entry {item!r:.100}")
            path, seen, perms, node, modified = item
            _check_path(path)
            if seen is not None and not natural(seen):
                raise SnapshotError(f"XenStore: bad generation {seen!r:.40}")
            entry = _Access(seen, _perms_from(perms), _node_from(node), modified)
            self._accessed[path] = entry
            memory += len(path) + (_node_bytes(path, entry.node) if modified else 0)
        for key, count in owned.items():
            if not isinstance(count, int) or isinstance(count, bool):
                raise SnapshotError(f"XenStore: bad owned count {count!r:.40}")
            self._owned_delta[_domid(key)] = count
        for item in events:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], bool):
                raise SnapshotError(f"XenStore: bad transaction event {item!r:.100}")
            _check_path(item[0])
            self.events[item[0]] = item[1]
        self._charge(memory)

    def apply(self) -> None:
        for path, entry in self._accessed.items():
            if not entry.modified:
                continue
            if entry.node is None:
                self._tree.delete(path)
            else:
                self._tree.set(path, entry.node)
        self._charge(-self.memory)  # what it held is the tree's now, or gone


_View = _Tree | _Transaction


@dataclass(eq=False)
class _Watch:
    path: str        # absolute, or a special "@..." path
    token: str
    prefix_len: int  # stripped from event paths of a watch set with a relative path
    deliver: WatchCallback
    active: bool = True


# --- the store ------------------------------------------------------------

class _DeferredEvents:
    """XenStore.deferred_events(): one reusable object, cheaper than a
    generator-based context manager on every request; nesting is counted
    in the store."""

    __slots__ = ("_store",)

    def __init__(self, store: "XenStore"):
        self._store = store

    def __enter__(self) -> None:
        self._store._depth += 1

    def __exit__(self, *exc) -> None:
        store = self._store
        store._depth -= 1
        if store._depth == 0:
            store._deliver_deferred()


class XenStore:
    """The tree, the known domains and every client's watches and transactions."""

    def __init__(self, quotas: Quotas | None = None, observer: Observer | None = None,
                 clock: Callable[[], float] = time.monotonic, log_rate: LogRate = DEFAULT_LOG_RATE,
                 trace: Tracer = NULL_TRACE, faults: FaultInjector = NULL_FAULTS):
        self.quotas = quotas or Quotas()
        self.log_rate = log_rate  # of the lines its guests' connections cause
        # The VM's tracer and fault injector, for its connections and the
        # xenbus backends built on this store (pyvmm/core/trace.py, faults.py).
        self.trace = trace
        self.faults = faults
        self.observer = observer
        self.clock = clock  # for transactions' lifetime
        self._tree = _Tree()
        for path, children in (("/", ("local",)), ("/local", ("domain",)),
                               ("/local/domain", ())):
            self._tree.set(path, Node(b"", _DOM0_ONLY, children))
        for path in SPECIAL_PATHS:
            self._tree.set(path, Node(b"", _DOM0_ONLY))
        self._clients: list[Client] = []
        self._introduced: set[int] = {0}
        self._targets: dict[int, int] = {}
        self._watch_counts: Counter[int] = Counter()
        self._transaction_counts: Counter[int] = Counter()
        # Bytes per domain besides the nodes it owns (see memory_of()).
        self._watch_bytes: Counter[int] = Counter()
        self._transaction_bytes: Counter[int] = Counter()
        self.output_bytes: Counter[int] = Counter()  # kept by protocol.Connection
        self._deferred: deque[Callable[[], None]] = deque()
        self._depth = 0
        self._deferral = _DeferredEvents(self)
        self._delivering = False
        # The store belongs to one thread (the VMM's event thread). In debug
        # runs its owner installs a check here that every operation calls.
        self.owner_check: Callable[[str], None] | None = None

    # -- clients -----------------------------------------------------------

    def client(self, domid: int = 0, privileged: bool | None = None) -> "Client":
        """A Python client; privileged defaults to True for domain 0 only."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid} is not a real domain")
        client = Client(self, domid, domid == 0 if privileged is None else privileged)
        self._clients.append(client)
        return client

    def connect(self, domid: int, privileged: bool = False,
                event_backlog_bytes: int | None = None) -> Connection:
        """A wire connection for a client speaking the xenstore protocol (a guest ring).
        Unlike client(), it is unprivileged unless asked, even for domain 0.
        Its watch-event backlog is Quotas.event_backlog unless given."""
        backlog = self.quotas.event_backlog if event_backlog_bytes is None else event_backlog_bytes
        client = self.client(domid, privileged)
        client.wire = True
        return Connection(client, event_backlog_bytes=backlog,
                          limited_log=self.log_rate.limited(logging.getLogger(Connection.__module__)),
                          trace=self.trace, faults=self.faults)

    def _forget(self, client: "Client") -> None:
        self._clients.remove(client)

    # -- deferred delivery -------------------------------------------------

    def deferred_events(self) -> "_DeferredEvents":
        """A context manager that holds watch deliveries until the outermost
        operation finishes."""
        return self._deferral

    def _deliver_deferred(self) -> None:
        if self._delivering:
            return  # a callback called back into the store; the outer loop delivers
        self._delivering = True
        try:
            while self._deferred:
                action = self._deferred.popleft()
                try:
                    action()
                except Exception:
                    log.exception("xenstore: watch callback failed")
        finally:
            self._delivering = False

    @staticmethod
    def _deliver_event(watch: _Watch, path: str) -> None:
        if watch.active:
            watch.deliver(path, watch.token)

    # -- permissions and paths ---------------------------------------------

    def access(self, client: "Client", perms: Sequence[Permission]) -> Access:
        """What `client` may do to a node with these permissions."""
        if client.privileged:
            return _ALL_ACCESS
        target = self._targets.get(client.domid)
        owner = perms[0].domid
        if owner == client.domid or owner == target:
            return _ALL_ACCESS
        for perm in perms[1:]:
            if perm.domid == client.domid or perm.domid == target:
                return perm.access
        return perms[0].access

    def canonical(self, client: "Client", path: str, allow_special: bool = False) -> tuple[str, int]:
        """(absolute path, length of the prefix added to a relative path)."""
        if not isinstance(path, str) or not _PATH_CHARS.issuperset(path):
            raise XenStoreError("EINVAL", f"invalid characters in path {path!r:.80}")
        if path.startswith("@"):
            if not allow_special:
                raise XenStoreError("EINVAL", f"special path {path!r:.80} not allowed here")
            absolute, prefix = path, 0
        elif path.startswith("/"):
            if len(path) > ABS_PATH_MAX:
                raise XenStoreError("EINVAL", "absolute path too long")
            absolute, prefix = path, 0
        else:
            if len(path) > REL_PATH_MAX:
                raise XenStoreError("EINVAL", "relative path too long")
            base = domain_path(client.domid) + "/"
            absolute, prefix = base + path, len(base)
        if (absolute.endswith("/") and absolute != "/") or "//" in absolute:
            raise XenStoreError("EINVAL", f"malformed path {path!r:.80}")
        return absolute, prefix

    def missing_error(self, client: "Client", view: _View, path: str, need: Access) -> str:
        """ENOENT if `client` has `need` on the nearest existing ancestor, else EACCES."""
        while path != "/":
            path = parent_of(path)
            node = view.get(path)
            if node is not None:
                return "ENOENT" if self.access(client, node.perms) & need else "EACCES"
        return "EACCES"

    def checked_node(self, client: "Client", view: _View, path: str, need: Access) -> Node:
        node = view.get(path)
        if node is None:
            raise XenStoreError(self.missing_error(client, view, path, need), path)
        # As plain ints: Access's operators are Python-level enum code.
        if int(need) & ~int(self.access(client, node.perms)):
            raise XenStoreError("EACCES", path)
        return node

    # -- watches -----------------------------------------------------------

    def changed(self, view: _View, path: str, exact: bool,
                perms_seen: Sequence[tuple[Permission, ...] | None]) -> None:
        """Record a change: fire watches now, or at commit for a transaction.

        A watcher hears of the change only if it may read the node under one
        of `perms_seen` (new, old, or the parent's permissions), as xenstored.
        """
        if isinstance(view, _Transaction):
            view.note_event(path, exact)
            return
        for client in self._clients:
            if not client.watches:
                continue
            if not client.privileged and not any(
                    perms and self.access(client, perms) & Access.READ for perms in perms_seen):
                continue
            for watch in client.watches.values():
                if watch.path == path if exact else is_within(path, watch.path):
                    self._deferred.append(
                        partial(self._deliver_event, watch, path[watch.prefix_len:]))

    def perms_in_tree(self, path: str) -> tuple[Permission, ...] | None:
        """A committed node's permissions (never a transaction's view: reading
        through one would count against its quota after the change was made)."""
        node = self._tree.get(path)
        return node.perms if node else None

    def fire_committed(self, tx: _Transaction) -> None:
        for path, exact in tx.events.items():
            self.changed(self._tree, path, exact,
                         (tx.original_perms(path), self.perms_in_tree(path),
                          self.perms_in_tree(parent_of(path))))

    def fire_special(self, path: str) -> None:
        self.changed(self._tree, path, True, (self.perms_in_tree(path), self.perms_in_tree("/")))

    # -- domains -----------------------------------------------------------

    def is_introduced(self, domid: int) -> bool:
        return domid in self._introduced

    def introduce(self, domid: int) -> None:
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise XenStoreError("EINVAL", f"cannot introduce domain {domid}")
        if domid not in self._introduced:
            self._introduced.add(domid)
            self.fire_special(INTRODUCE_DOMAIN)

    def release(self, domid: int) -> None:
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise XenStoreError("EINVAL", f"cannot release domain {domid}")
        if domid not in self._introduced:
            raise XenStoreError("ENOENT", f"domain {domid} not introduced")
        self._introduced.discard(domid)
        self._targets.pop(domid, None)
        for client in [c for c in self._clients if c.domid == domid and not c.privileged]:
            client.close()
        self.fire_special(RELEASE_DOMAIN)

    def set_target(self, domid: int, target: int) -> None:
        if domid not in self._introduced:
            raise XenStoreError("ENOENT", f"domain {domid} not introduced")
        self._targets[domid] = target

    # -- accounting --------------------------------------------------------

    def memory_of(self, domid: int) -> int:
        """Bytes held for a domain: nodes it owns, its watches, its
        transactions' private copies and its clients' queued output."""
        return (self._tree.bytes_owned_by(domid) + self._watch_bytes[domid]
                + self._transaction_bytes[domid] + self.output_bytes[domid])

    def expire_transactions(self) -> int:
        """Release the copies of unprivileged transactions older than
        Quotas.transaction_seconds (they fail with EAGAIN from then on);
        called on every operation of their client and by the guest's
        once-a-second check, so an idle guest's ones go too."""
        expired = 0
        for client in self._clients:
            if client._transactions and not client.privileged:
                expired += client._expire_transactions()
        return expired

    # -- snapshot (pyvmm/core/snapshot.py) --------------------------------

    def save_state(self) -> dict:
        """The tree (every node with its value, permissions, children and
        generation, and the tree's generation counter), the introduced
        domains and targets.

        Clients are not here: the VMM's own (the domain, the backends) are
        made again with their watches when the VM is built, and the guest's
        connection is saved by GuestStoreService (Connection.save_state).
        Quota accounting is not saved either: it follows from the tree and
        from what the restored clients hold."""
        if self._depth or self._deferred or self._delivering:
            raise SnapshotError("XenStore: saved in the middle of an operation")
        for client in self._clients:
            if client._transactions and not client.wire:
                raise SnapshotError(f"XenStore: {client!r} holds a transaction open")
        nodes = [[path, *_node_state(node)] for path, node in self._tree.items()]
        return versioned(STATE_VERSION, generation=self._tree._generation, nodes=nodes,
                         introduced=sorted(self._introduced),
                         targets={str(domid): target for domid, target in sorted(self._targets.items())})

    def restore_state(self, state: dict) -> None:
        """Replace the tree the VM was built with by the saved one, before
        any client restores its watches and transactions into it. Refused,
        changing nothing, unless the saved tree is whole and consistent."""
        check_version(state, "XenStore", STATE_VERSION)
        generation, nodes, introduced, targets = (state.get(key) for key in (
            "generation", "nodes", "introduced", "targets"))
        if not natural(generation) or not isinstance(nodes, list) or not isinstance(introduced, list) \
                or not isinstance(targets, dict):
            raise SnapshotError("XenStore: no tree, generation or domains")
        tree = _Tree()
        for item in nodes:
            if not isinstance(item, list) or len(item) != 5:
                raise SnapshotError(f"XenStore: bad node {item!r:.100}")
            path = item[0]
            _check_path(path)
            if tree.get(path) is not None:
                raise SnapshotError(f"XenStore: node {path!r:.80} twice")
            node = _node_from(item[1:])
            if node.generation > generation:
                raise SnapshotError(f"XenStore: {path!r:.80} is newer than the tree")
            tree.load(path, node)
        tree._generation = generation
        problems = _tree_problems(tree)
        if tree.get("/") is None or problems:
            raise SnapshotError(f"XenStore: inconsistent tree: {(problems or ['no root'])[:3]}")
        restored_introduced = {_domid(domid) for domid in introduced}
        restored_targets = {_domid(domid): _domid(target) for domid, target in targets.items()}
        if any(client._transactions for client in self._clients):
            raise SnapshotError("XenStore: restored while a client holds a transaction")
        self._tree = tree
        self._introduced = restored_introduced | {0}
        self._targets = restored_targets

    # -- self check --------------------------------------------------------

    def check(self) -> list[str]:
        """Inconsistencies in the tree (an empty list when healthy)."""
        return _tree_problems(self._tree)


def _tree_problems(tree: _Tree) -> list[str]:
    problems = []
    owned: Counter[int] = Counter()
    for path, node in tree.items():
        owned[node.owner] += 1
        if not node.perms:
            problems.append(f"{path}: no permissions")
        if path == "/" or path.startswith("@"):
            continue
        parent = tree.get(parent_of(path))
        if parent is None or _basename(path) not in parent.children:
            problems.append(f"{path}: not listed by its parent")
    for path, node in tree.items():
        for name in node.children:
            if tree.get(child_path(path, name)) is None:
                problems.append(f"{path}: lists missing child {name}")
        if len(set(node.children)) != len(node.children):
            problems.append(f"{path}: duplicate children")
    for domid, count in owned.items():
        if tree.owned_by(domid) != count:
            problems.append(f"domain {domid}: owns {count} nodes, counted {tree.owned_by(domid)}")
    return problems


# --- saved forms (snapshots) ---------------------------------------------

def _domid(value) -> int:
    """A domid saved as an int or as a dict key's text."""
    if isinstance(value, str) and value.isdecimal() and len(value) <= 5:
        value = int(value)
    if not natural(value) or value >= DOMID_FIRST_RESERVED:
        raise SnapshotError(f"XenStore: bad domid {value!r:.40}")
    return value


def _check_path(path) -> None:
    if (not isinstance(path, str) or not path or not _PATH_CHARS.issuperset(path) or len(path) > ABS_PATH_MAX
            or not (path.startswith("/") or path in SPECIAL_PATHS) or "//" in path
            or (path.endswith("/") and path != "/")):
        raise SnapshotError(f"XenStore: bad path {path!r:.80}")


def _perms_state(perms: tuple[Permission, ...] | None) -> list[str] | None:
    return None if perms is None else [str(perm) for perm in perms]


def _perms_from(texts) -> tuple[Permission, ...] | None:
    if texts is None:
        return None
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise SnapshotError(f"XenStore: bad permissions {texts!r:.80}")
    try:
        return tuple(Permission.parse(text) for text in texts)
    except XenStoreError:
        raise SnapshotError(f"XenStore: bad permissions {texts!r:.80}") from None


def _node_state(node: Node | None) -> list | None:
    if node is None:
        return None
    return [base64.b64encode(node.value).decode("ascii"), _perms_state(node.perms), list(node.children),
            node.generation]


def _node_from(item) -> Node | None:
    if item is None:
        return None
    if not isinstance(item, list) or len(item) != 4:
        raise SnapshotError(f"XenStore: bad node {item!r:.100}")
    value, perms, children, generation = item
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except ValueError:
        data = None
    if data is None or not natural(generation) or not isinstance(children, list) or not all(
            isinstance(name, str) and name and _PATH_CHARS.issuperset(name) and "/" not in name for name in children):
        raise SnapshotError(f"XenStore: bad node {item!r:.100}")
    return Node(data, _perms_from(perms), tuple(children), generation)


# --- clients --------------------------------------------------------------

class Client:
    """One client of the store: a domain's connection, or the VMM's own code.

    Paths may be absolute or relative to the client's /local/domain/<domid>.
    `tx` selects a transaction from transaction_start(); 0 means none.
    """

    def __init__(self, store: XenStore, domid: int, privileged: bool):
        self._store = store
        self.domid = domid
        self.privileged = privileged
        self.watches: dict[tuple[str, str], _Watch] = {}
        self._transactions: dict[int, _Transaction] = {}
        self._next_tx = 1
        self.closed = False
        self.wire = False  # a protocol Connection's (XenStore.connect): its owner saves it

    def __repr__(self) -> str:
        return f"<xenstore client dom{self.domid}{' privileged' if self.privileged else ''}>"

    # -- plumbing ----------------------------------------------------------

    def deferred_events(self) -> "_DeferredEvents":
        """The store's deferral: the same reusable object at every call."""
        return self._store.deferred_events()

    def has_transaction(self, tx: int) -> bool:
        return tx in self._transactions

    def _view(self, tx: int) -> _View:
        if not tx:
            return self._store._tree
        try:
            transaction = self._transactions[tx]
        except KeyError:
            raise XenStoreError("ENOENT", f"no transaction {tx}") from None
        if transaction.expired:
            raise QuotaError("EAGAIN", f"transaction {tx} timed out", "xenstore-transaction-seconds")
        return transaction

    def _expire_transactions(self) -> int:
        deadline = self._store.clock() - self._store.quotas.transaction_seconds
        expired = [t for t in self._transactions.values() if not t.expired and t.started < deadline]
        for transaction in expired:
            log.info("xenstore: domain %d: transaction %d timed out", self.domid, transaction.id)
            transaction.expire()
        return len(expired)

    def account_output(self, delta: int) -> None:
        """A wire connection's queued output grew or shrank by delta bytes."""
        self._store.output_bytes[self.domid] += delta

    def over_memory_quota(self) -> bool:
        store = self._store
        return not self.privileged and store.memory_of(self.domid) >= store.quotas.memory

    def _over_memory_quota_by(self, more: int) -> bool:
        store = self._store
        return store.memory_of(self.domid) + more > store.quotas.memory

    def _check_memory(self) -> None:
        store = self._store
        if store.memory_of(self.domid) >= store.quotas.memory:
            raise QuotaError("ENOMEM", f"domain {self.domid} is at its memory quota", "xenstore-memory")

    def _run(self, op: str, path: str | None, value: bytes | None, tx: int, action: Callable,
             grows: bool | None = None):
        """Run one operation; `grows`: it may add to the domain's memory (so
        does everything inside a transaction), and needs room under the quota."""
        store = self._store
        if store.owner_check is not None:
            store.owner_check("the xenstore")
        if self.closed:
            raise XenStoreError("EINVAL", f"{op} on a closed client")
        with store.deferred_events():
            try:
                if not self.privileged:
                    if self._transactions:
                        self._expire_transactions()
                    if grows or (grows is None and tx):
                        self._check_memory()
                result = action()
            except XenStoreError as exc:
                if store.observer is not None:
                    store.observer(self.domid, op, path, value, tx, exc.name)
                raise
            if store.observer is not None:
                store.observer(self.domid, op, path, value, tx, "OK")
            return result

    def _require_privilege(self, op: str) -> None:
        if not self.privileged:
            raise XenStoreError("EACCES", f"{op} needs a privileged client")

    # -- reading -----------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        def action():
            store = self._store
            absolute, _ = store.canonical(self, path)
            return store.checked_node(self, self._view(tx), absolute, Access.READ).value
        return self._run("READ", path, None, tx, action)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return self.directory_with_generation(path, tx)[1]

    def directory_with_generation(self, path: str, tx: int = 0) -> tuple[int, list[str]]:
        """The children of a node and its generation, which changes whenever the node does."""
        def action():
            store = self._store
            absolute, _ = store.canonical(self, path)
            node = store.checked_node(self, self._view(tx), absolute, Access.READ)
            return node.generation, list(node.children)
        return self._run("DIRECTORY", path, None, tx, action)

    def get_perms(self, path: str, tx: int = 0) -> list[Permission]:
        def action():
            store = self._store
            absolute, _ = store.canonical(self, path, allow_special=True)
            return list(store.checked_node(self, self._view(tx), absolute, Access.READ).perms)
        return self._run("GET_PERMS", path, None, tx, action)

    def exists(self, path: str, tx: int = 0) -> bool:
        """Whether a readable node exists (a convenience for the VMM's own code)."""
        try:
            self.read(path, tx)
        except XenStoreError as exc:
            if exc.name in ("ENOENT", "EACCES"):
                return False
            raise
        return True

    # -- writing -----------------------------------------------------------

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)

        def action():
            store, view = self._store, self._view(tx)
            absolute, _ = store.canonical(self, path)
            node = view.get(absolute)
            if node is None:
                error = store.missing_error(self, view, absolute, Access.WRITE)
                if error != "ENOENT":
                    raise XenStoreError(error, absolute)
                self._create(view, absolute, data)
            else:
                if not store.access(self, node.perms) & Access.WRITE:
                    raise XenStoreError("EACCES", absolute)
                new = replace(node, value=data)
                self._check_entry_size(absolute, new)
                view.set(absolute, new)
            self._changed_with_parent(view, absolute)
        self._run("WRITE", path, data, tx, action, grows=True)

    def mkdir(self, path: str, tx: int = 0) -> None:
        def action():
            store, view = self._store, self._view(tx)
            absolute, _ = store.canonical(self, path)
            node = view.get(absolute)
            if node is not None:
                if not store.access(self, node.perms) & Access.WRITE:
                    raise XenStoreError("EACCES", absolute)
                return
            error = store.missing_error(self, view, absolute, Access.WRITE)
            if error != "ENOENT":
                raise XenStoreError(error, absolute)
            self._create(view, absolute, b"")
            self._changed_with_parent(view, absolute)
        self._run("MKDIR", path, None, tx, action, grows=True)

    def rm(self, path: str, tx: int = 0) -> None:
        """Remove a node and everything below it; removing a missing node whose
        parent exists succeeds, as in xenstored."""
        def action():
            store, view = self._store, self._view(tx)
            absolute, _ = store.canonical(self, path)
            node = view.get(absolute)
            if node is None:
                error = store.missing_error(self, view, absolute, Access.WRITE)
                if error == "ENOENT" and view.get(parent_of(absolute)) is not None:
                    return
                raise XenStoreError(error, absolute)
            if not store.access(self, node.perms) & Access.WRITE:
                raise XenStoreError("EACCES", absolute)
            if absolute == "/":
                raise XenStoreError("EINVAL", "cannot remove the root")
            self._remove_subtree(view, absolute, node)
        self._run("RM", path, None, tx, action)

    def set_perms(self, path: str, perms: Sequence[Permission], tx: int = 0) -> None:
        new_perms = tuple(perms)

        def action():
            store, view = self._store, self._view(tx)
            if not new_perms:
                raise XenStoreError("EINVAL", "empty permission list")
            if not self.privileged and len(new_perms) > store.quotas.perms:
                raise QuotaError("ENOSPC", f"more than {store.quotas.perms} permissions", "xenstore-node-permissions")
            absolute, _ = store.canonical(self, path, allow_special=True)
            node = store.checked_node(self, view, absolute, Access.WRITE | Access.OWNER)
            if not self.privileged and new_perms[0].domid != node.owner:
                # xenstored refuses with EPERM, which goes on the wire as EINVAL.
                raise XenStoreError("EINVAL", "only a privileged client may change the owner")
            new = replace(node, perms=new_perms)
            self._check_entry_size(absolute, new)
            view.set(absolute, new)
            store.changed(view, absolute, False,
                          (new_perms, node.perms, store.perms_in_tree(parent_of(absolute))))
        self._run("SET_PERMS", path, " ".join(map(str, new_perms)).encode(), tx, action, grows=True)

    def _check_entry_size(self, path: str, node: Node) -> None:
        limit = self._store.quotas.entry_size
        if not self.privileged and node_size(node.value, node.children, node.perms) > limit:
            raise QuotaError("ENOSPC", f"{path:.80}: node would exceed {limit} bytes", "xenstore-node-size")

    def _create(self, view: _View, path: str, value: bytes) -> None:
        """Create path and any missing ancestors, each inheriting its parent's permissions."""
        missing = [path]
        parent_path = parent_of(path)
        while (parent := view.get(parent_path)) is None:
            missing.append(parent_path)
            parent_path = parent_of(parent_path)
        quota = self._store.quotas.nodes
        if not self.privileged and view.owned_by(self.domid) + len(missing) > quota:
            raise QuotaError("ENOSPC", f"domain {self.domid} would own more than {quota} nodes", "xenstore-nodes")
        # Build every node first: one over the entry size (a parent with one
        # child too many) must leave nothing half-created.
        nodes = []
        for new_path in reversed(missing):
            perms = parent.perms
            if not self.privileged:
                perms = (Permission(self.domid, perms[0].access),) + perms[1:]
            nodes.append((parent_path, replace(parent, children=parent.children + (_basename(new_path),))))
            parent = Node(value if new_path == path else b"", perms)
            parent_path = new_path
        nodes.append((path, parent))
        for node_path, node in nodes:
            self._check_entry_size(node_path, node)
        if not self.privileged:
            # One write may create a whole chain of nodes: check it all, so the
            # quota is passed by one node's change at most.  A transaction holds
            # each path twice (what it touched, and its copy), the parent too.
            store = self._store
            in_transaction = isinstance(view, _Transaction)
            growth = sum(_node_bytes(p, n) + (len(p) if in_transaction else 0) for p, n in nodes[1:])
            first_parent, parent_node = nodes[0]
            growth += (2 * len(first_parent) + _node_bytes(first_parent, parent_node) if in_transaction
                       else len(parent_node.children[-1]) + 1)
            if store.memory_of(self.domid) + growth > store.quotas.memory:
                raise QuotaError("ENOMEM", f"domain {self.domid} would pass its memory quota", "xenstore-memory")
        for node_path, node in nodes:
            view.set(node_path, node)

    def _remove_subtree(self, view: _View, path: str, node: Node) -> None:
        parent_path = parent_of(path)
        parent = view.get(parent_path)
        # Walk first, mutate after: a transaction running out of its node
        # quota half-way must not leave a half-removed subtree behind.
        preorder = []
        stack = [(path, node, parent.perms)]
        while stack:
            node_path, current, parent_perms = stack.pop()
            preorder.append((node_path, current.perms, parent_perms))
            for name in current.children:
                below = child_path(node_path, name)
                child = view.get(below)
                if child is not None:
                    stack.append((below, child, current.perms))
        name = _basename(path)
        view.set(parent_path, replace(parent, children=tuple(c for c in parent.children if c != name)))
        for node_path, perms, parent_perms in reversed(preorder):
            view.delete(node_path)
            # Watches below the removed node hear of their own node only; those
            # above hear of the removed node itself.
            self._store.changed(view, node_path, node_path != path, (perms, parent_perms))

    def _changed_with_parent(self, view: _View, path: str) -> None:
        store = self._store
        store.changed(view, path, False,
                      (store.perms_in_tree(path), store.perms_in_tree(parent_of(path))))

    # -- watches -----------------------------------------------------------

    def watch(self, path: str, token: str, callback: WatchCallback) -> None:
        """Call callback(path, token) for changes at or below path, once at once.

        Events carry a relative path when `path` was relative.  Watching needs
        no permission, but changes to nodes this client may not read are not
        reported.
        """
        def action():
            store = self._store
            absolute, prefix = store.canonical(self, path, allow_special=True)
            key = (absolute, token)
            if key in self.watches:
                raise XenStoreError("EEXIST", f"already watching {path} with that token")
            if not self.privileged and store._watch_counts[self.domid] >= store.quotas.watches:
                raise QuotaError("E2BIG", f"domain {self.domid} has too many watches", "xenstore-watches")
            watch = _Watch(absolute, token, prefix, callback)
            self.watches[key] = watch
            store._watch_counts[self.domid] += 1
            store._watch_bytes[self.domid] += len(absolute) + len(token)
            store._deferred.append(partial(store._deliver_event, watch, path))
        self._run("WATCH", path, token.encode("latin-1", "replace"), 0, action, grows=True)

    def unwatch(self, path: str, token: str) -> None:
        def action():
            absolute, _ = self._store.canonical(self, path, allow_special=True)
            watch = self.watches.pop((absolute, token), None)
            if watch is None:
                raise XenStoreError("ENOENT", f"no watch on {path} with that token")
            self._drop_watch(watch)
        self._run("UNWATCH", path, token.encode("latin-1", "replace"), 0, action)

    def reset_watches(self) -> None:
        """Drop all of this client's watches and transactions."""
        self._run("RESET_WATCHES", None, None, 0, self._drop_all)

    def _drop_watch(self, watch: _Watch) -> None:
        watch.active = False
        self._store._watch_counts[self.domid] -= 1
        self._store._watch_bytes[self.domid] -= len(watch.path) + len(watch.token)

    def _drop_all(self) -> None:
        for watch in self.watches.values():
            self._drop_watch(watch)
        self.watches.clear()
        self._store._transaction_counts[self.domid] -= len(self._transactions)
        for transaction in self._transactions.values():
            transaction.expire()
        self._transactions.clear()

    # -- transactions ------------------------------------------------------

    def transaction_start(self) -> int:
        def action():
            store = self._store
            if not self.privileged and store._transaction_counts[self.domid] >= store.quotas.transactions:
                raise QuotaError("ENOSPC", f"domain {self.domid} has too many transactions", "xenstore-transactions")
            tx_id = self._next_tx
            while tx_id == 0 or tx_id in self._transactions:
                tx_id = (tx_id + 1) & 0xFFFFFFFF
            self._next_tx = (tx_id + 1) & 0xFFFFFFFF
            limit = None if self.privileged else store.quotas.transaction_nodes
            over_quota = None if self.privileged else self._over_memory_quota_by
            self._transactions[tx_id] = _Transaction(store._tree, tx_id, limit, store._transaction_bytes,
                                                     self.domid, store.clock(), over_quota)
            store._transaction_counts[self.domid] += 1
            return tx_id
        return self._run("TRANSACTION_START", None, None, 0, action, grows=True)

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        """Commit (EAGAIN if a node it touched changed meanwhile) or abort.
        Either way the transaction is over."""
        def action():
            store = self._store
            transaction = self._transactions.pop(tx, None)
            if transaction is None:
                raise XenStoreError("ENOENT", f"no transaction {tx}")
            store._transaction_counts[self.domid] -= 1
            if not commit:
                transaction.expire()
                return
            if transaction.expired:
                raise QuotaError("EAGAIN", f"transaction {tx} timed out", "xenstore-transaction-seconds")
            try:
                if transaction.conflicts():
                    raise XenStoreError("EAGAIN", f"transaction {tx} conflicts")
                growth = transaction.owned_delta(self.domid)
                if (not self.privileged and growth > 0
                        and store._tree.owned_by(self.domid) + growth > store.quotas.nodes):
                    raise QuotaError("ENOSPC", f"domain {self.domid} would own too many nodes", "xenstore-nodes")
            except XenStoreError:
                transaction.expire()
                raise
            transaction.apply()
            store.fire_committed(transaction)
        self._run("TRANSACTION_END", None, b"T" if commit else b"F", tx, action, grows=False)

    @contextmanager
    def transaction(self) -> Iterator[int]:
        """`with client.transaction() as tx:` commits on exit, aborts on an exception."""
        tx = self.transaction_start()
        try:
            yield tx
        except BaseException:
            if tx in self._transactions:
                self.transaction_end(tx, commit=False)
            raise
        self.transaction_end(tx, commit=True)

    # -- domains -----------------------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        return self._run("GET_DOMAIN_PATH", None, None, 0, lambda: domain_path(domid))

    def is_domain_introduced(self, domid: int) -> bool:
        def action():
            self._require_privilege("IS_DOMAIN_INTRODUCED")
            return self._store.is_introduced(domid)
        return self._run("IS_DOMAIN_INTRODUCED", None, None, 0, action)

    def introduce_domain(self, domid: int) -> None:
        """Mark a domain as connected and fire @introduceDomain."""
        def action():
            self._require_privilege("INTRODUCE")
            self._store.introduce(domid)
        self._run("INTRODUCE", None, None, 0, action)

    def release_domain(self, domid: int) -> None:
        """Disconnect a domain (its clients are closed) and fire @releaseDomain."""
        def action():
            self._require_privilege("RELEASE")
            self._store.release(domid)
        self._run("RELEASE", None, None, 0, action)

    def resume_domain(self, domid: int) -> None:
        def action():
            self._require_privilege("RESUME")
            if not self._store.is_introduced(domid):
                raise XenStoreError("ENOENT", f"domain {domid} not introduced")
        self._run("RESUME", None, None, 0, action)

    def set_target(self, domid: int, target: int) -> None:
        """Let `domid` act on `target`'s nodes as if it were `target` (a device-model domain)."""
        def action():
            self._require_privilege("SET_TARGET")
            self._store.set_target(domid, target)
        self._run("SET_TARGET", None, None, 0, action)

    def control(self, command: str, args: Sequence[str] = ()) -> str:
        """The few CONTROL commands that make sense in a VMM: check, print, help."""
        def action():
            self._require_privilege("CONTROL")
            if command == "check":
                problems = self._store.check()
                for problem in problems:
                    log.error("xenstore check: %s", problem)
                return "OK" if not problems else "\n".join(problems)
            if command == "print":
                log.info("xenstore: %s", " ".join(args))
                return "OK"
            if command == "help":
                return "check\nprint <text>\nhelp\n"
            raise XenStoreError("EINVAL", f"unknown control command {command!r}")
        return self._run("CONTROL", None, command.encode("latin-1", "replace"), 0, action)

    # -- snapshot ----------------------------------------------------------

    def save_state(self) -> dict:
        """Its watches (path, token, how much of the path to strip) and open
        transactions, for the owner of its connection to save."""
        now = self._store.clock()
        return {
            "watches": [[watch.path, watch.token, watch.prefix_len] for watch in self.watches.values()],
            "transactions": [transaction.save_state(now) for transaction in self._transactions.values()],
            "next_tx": self._next_tx,
        }

    def restore_state(self, state: dict, deliver: WatchCallback) -> None:
        """Take back save_state()'s watches (their events go to `deliver`; the
        event a new watch fires at once was sent before the save) and
        transactions, into the restored tree. A client that holds anything
        already, or a malformed state, is refused."""
        store = self._store
        watches, transactions, next_tx = (state.get(key) if isinstance(state, dict) else None
                                          for key in ("watches", "transactions", "next_tx"))
        if not isinstance(watches, list) or not isinstance(transactions, list) or not natural(next_tx) \
                or next_tx > 0xFFFFFFFF:
            raise SnapshotError("XenStore client: no watches, transactions or next transaction id")
        if self.watches or self._transactions or self.closed:
            raise SnapshotError(f"XenStore: {self!r} is not fresh")
        prefix = len(domain_path(self.domid)) + 1
        restored_watches = {}
        for item in watches:
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[1], str)
                    or item[2] not in (0, prefix) or (item[0], item[1]) in restored_watches):
                raise SnapshotError(f"XenStore: bad watch {item!r:.100}")
            _check_path(item[0])
            restored_watches[(item[0], item[1])] = _Watch(item[0], item[1], item[2], deliver)
        restored_transactions = {}
        limit = None if self.privileged else store.quotas.transaction_nodes
        over_quota = None if self.privileged else self._over_memory_quota_by
        now = store.clock()
        try:
            for item in transactions:
                tx_id, age = (item.get("id"), item.get("age")) if isinstance(item, dict) else (None, None)
                if (not natural(tx_id) or not 0 < tx_id <= 0xFFFFFFFF or tx_id in restored_transactions
                        or not isinstance(age, (int, float)) or isinstance(age, bool) or not 0 <= age < 1e9):
                    raise SnapshotError(f"XenStore: bad transaction {item!r:.100}")
                transaction = _Transaction(store._tree, tx_id, limit, store._transaction_bytes, self.domid,
                                           now - age, over_quota)
                restored_transactions[tx_id] = transaction
                transaction.load(item)
        except SnapshotError:
            for transaction in restored_transactions.values():
                transaction.expire()  # gives back what load() charged
            raise
        for watch in restored_watches.values():
            store._watch_counts[self.domid] += 1
            store._watch_bytes[self.domid] += len(watch.path) + len(watch.token)
        self.watches = restored_watches
        self._transactions = restored_transactions
        store._transaction_counts[self.domid] += len(restored_transactions)
        self._next_tx = next_tx

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Drop this client's watches and transactions and leave the store."""
        if self.closed:
            return
        self._drop_all()
        self.closed = True
        self._store._forget(self)
